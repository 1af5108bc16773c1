"""The mesh simulator's parts; `python -m benchmarks.mesh_sim` runs it (see that module's docstring)."""
