"""Prefix chunks: the one scheme the gateway and the pool worker both use to name a prompt's prefix.

The gateway does not tokenize, so both sides cut the request's *canonical text* into fixed-size
chunks and chain-hash them: chunk i's hash covers chunks 0..i, so two requests share their first k
hashes exactly when their canonical texts share the first k chunks. A pool advertises the hashes
its KV cache still backs; the gateway matches a request's hashes against them (DESIGN §3).

Canonical forms (fixed: changing one invalidates every pool's advertisement, so bump SCHEME):
- chat: for each message in order, RS (U+001E), the role, US (U+001F), the content as text;
- completion with a text prompt: the prompt itself;
- completion with token ids: the ids, IDS_PER_CHUNK to a chunk (each chunk hashed as signed 64-bit
  little-endian integers), hashed under a different salt than text so no text collides with ids.
Only whole chunks are hashed (a partial last chunk would not match the same prefix once it grows),
and only the first MAX_CHUNKS: the cost is bounded whatever the prompt's length (a 1 MB prompt
hashes MAX_CHUNKS * CHUNK_CHARS characters, and chat rendering stops once it has that many).
Hashes are 63-bit non-negative ints (they fit a signed 64-bit JSON number everywhere).
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

SCHEME = 1
CHUNK_CHARS = 512  # characters of canonical text a chunk (~128 tokens at 4 chars a token)
IDS_PER_CHUNK = 128  # token ids a chunk, for prompts given as ids
MAX_CHUNKS = 128  # hash at most this many chunks of a prompt (64 Ki characters, ~16 Ki tokens)
MAX_TEXT_CHARS = CHUNK_CHARS * MAX_CHUNKS
MAX_ADVERTISED = 256  # the most chunk hashes a pool's load report carries (gateway/worker/prefix_summary.py)
RS, US = "\x1e", "\x1f"
_MASK63 = (1 << 63) - 1
_TEXT_SALT = b"meshgate-text-%d" % SCHEME
_IDS_SALT = b"meshgate-ids-%d" % SCHEME


@dataclass(frozen=True, slots=True)
class PrefixChunks:
    """A request's chunk hashes. unit: "chars" (chunks of CHUNK_CHARS canonical characters) or
    "ids" (chunks of IDS_PER_CHUNK token ids); total: the canonical length in that unit (whole
    prompt, not only the hashed part), so a side that knows the token count can place chunk ends."""

    hashes: tuple[int, ...]
    unit: str
    total: int

    @property
    def per_chunk(self) -> int:
        return CHUNK_CHARS if self.unit == "chars" else IDS_PER_CHUNK


EMPTY = PrefixChunks((), "chars", 0)


class PrefixHolder(Protocol):
    """What routing asks of the gateway's memory of one pool's cache (gateway/routing/prefix_index.py)."""

    def matched(self, hashes: Sequence[int], oldest: float | None = None) -> int:
        """How many leading chunks the pool likely holds (oldest: horizon() when already known)."""

    def horizon(self) -> float:
        """The time before which what the gateway sent there is forgotten (for matched)."""


def _chain(salt: bytes, parts: Sequence[bytes]) -> tuple[int, ...]:
    out: list[int] = []
    prev = salt[:16]
    for data in parts:
        d = hashlib.blake2b(data, digest_size=8, salt=prev[:16]).digest()
        out.append(int.from_bytes(d, "little") & _MASK63)
        prev = d
    return tuple(out)


def text_chunks(text: str, total: int | None = None) -> PrefixChunks:
    """Chunk hashes of a canonical text (its first MAX_TEXT_CHARS characters). total: the whole
    canonical length when `text` is already cut short."""
    n = min(len(text), MAX_TEXT_CHARS) // CHUNK_CHARS
    parts = [text[i * CHUNK_CHARS:(i + 1) * CHUNK_CHARS].encode("utf-8", "surrogatepass") for i in range(n)]
    return PrefixChunks(_chain(_TEXT_SALT, parts), "chars", len(text) if total is None else total)


def id_chunks(ids: Sequence[int]) -> PrefixChunks:
    n = min(len(ids) // IDS_PER_CHUNK, MAX_CHUNKS)
    parts = [array("q", ids[i * IDS_PER_CHUNK:(i + 1) * IDS_PER_CHUNK]).tobytes() for i in range(n)]
    return PrefixChunks(_chain(_IDS_SALT, parts), "ids", len(ids))


def chat_text(messages: Sequence[dict[str, str]], limit_chars: int = MAX_TEXT_CHARS) -> tuple[str, int]:
    """The canonical text of chat messages, cut at limit_chars (rendering stops there: bounded),
    and the whole canonical length (counted, not rendered)."""
    parts: list[str] = []
    have = total = 0
    for m in messages:
        role, content = m["role"], m["content"]
        size = 2 + len(role) + len(content)
        total += size
        if have < limit_chars:
            piece = f"{RS}{role}{US}{content[:limit_chars - have]}"
            parts.append(piece)
            have += len(piece)
    return "".join(parts)[:limit_chars], total


def request_chunks(prompt: str | None, prompt_token_ids: Sequence[int] | None,
                   messages: Sequence[dict[str, str]] | None) -> PrefixChunks:
    """The chunk hashes of a request, from the fields of core.protocol.GenerationRequest."""
    if messages:
        text, total = chat_text(messages)
        return text_chunks(text, total)
    if prompt_token_ids:
        return id_chunks(prompt_token_ids)
    if prompt:
        return text_chunks(prompt[:MAX_TEXT_CHARS], len(prompt))
    return EMPTY


def longest_match(hashes: Sequence[int], holds: object) -> int:
    """How many leading hashes `holds` (a set, or anything with __contains__) has, assuming that a
    held chunk's predecessors are held too (chained hashes: a cache holding chunk k was filled
    through chunks 0..k-1, and evicts a sequence's tail first): a binary search, O(log n) lookups."""
    lo, hi = 0, len(hashes)  # hashes[:lo] held; hashes[hi:] not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if hashes[mid - 1] in holds:  # type: ignore[operator]
            lo = mid
        else:
            hi = mid - 1
    return lo
