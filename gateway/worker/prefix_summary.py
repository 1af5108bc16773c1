"""Which prefix chunks (gateway/core/prefix.py) of the requests this pool served its KV cache still
backs: the bounded summary the load report advertises to gateways (`hot_prefix_hashes`).

When a request's prefill is done (its first token), each of its chunk hashes is tied to the KV
block hash (kv_cache.py's chained token-block hash) of the last whole block inside that chunk: the
chunk's end in tokens is exact for token-id prompts, and for text placed in proportion (chunk end
in canonical characters x prompt tokens / canonical characters: the chat template's tokens are
spread evenly, so a chunk is advertised only once the block a little past or before its end is
cached; an estimate, which the gateway treats as one). A chunk is advertised while that block is
resident (in use, or free but not yet reused): evictions drop it from the next report by
themselves. `cached_tokens` in usage stays the engine's exact count.

Bounds: at most MAX_TRACKED chunks remembered (least recently served forgotten first), at most
MAX_ADVERTISED in a report, i.e. at most MAX_ADVERTISED x 17 bytes on a /load/stream line (hex) and
x 20 in /load's JSON, whatever the cache size. A request's chunks are remembered deepest first, so
that a cut keeps the leading chunks that other requests share (system prompts).
"""
from __future__ import annotations

from collections import OrderedDict

from gateway.core.prefix import MAX_ADVERTISED, PrefixChunks
from gateway.worker.kv_cache import BlockManager
from gateway.worker.request import Request

MAX_TRACKED = 2048


class PrefixSummary:
    def __init__(self, max_tracked: int = MAX_TRACKED, max_advertised: int = MAX_ADVERTISED):
        self.max_tracked, self.max_advertised = max_tracked, max_advertised
        self.tracked: OrderedDict[int, int] = OrderedDict()  # chunk hash -> KV block hash backing it

    def served(self, req: Request, chunks: PrefixChunks | None, block_size: int) -> None:
        """req's prompt is prefilled (its whole blocks hashed and cached): tie its chunks to them."""
        if chunks is None or not chunks.hashes or not req.block_hashes:
            return
        num_tokens, blocks = req.num_prompt_tokens, req.block_hashes
        scale = 1.0 if chunks.unit == "ids" else num_tokens / max(chunks.total, 1)
        pairs = []
        for i, h in enumerate(chunks.hashes):
            b = int((i + 1) * chunks.per_chunk * scale) // block_size - 1  # last whole block in the chunk
            if b >= len(blocks) or b * block_size >= num_tokens:
                break
            if b >= 0:
                pairs.append((h, blocks[b]))
        tracked = self.tracked
        for h, bh in reversed(pairs):  # deepest first: the leading chunks end up most recent
            tracked[h] = bh
            tracked.move_to_end(h)
        while len(tracked) > self.max_tracked:
            tracked.popitem(last=False)

    def advertise(self, kv: BlockManager) -> tuple[int, ...]:
        """Chunk hashes whose block is still resident, most recently served first (bounded)."""
        out: list[int] = []
        resident = kv.hash_to_block
        for h, bh in reversed(self.tracked.items()):
            if bh in resident:
                out.append(h)
                if len(out) >= self.max_advertised:
                    break
        return tuple(out)
