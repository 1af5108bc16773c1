"""The command line: `meshgate up | serve | worker | hash-key | build-engine` (DESIGN.md §8)."""
