"""Paged KV-cache block manager: fixed-size blocks, ref counts, LRU reuse, prefix caching.

Blocks with ref count 0 sit in `free` (an LRU queue: the front is evicted first). A freed block
keeps its hash, so a later request with the same prefix can take it back from the free queue
without recomputing it; only when it is handed out for new tokens is its hash forgotten.
Invariant: len(free) + number of blocks with ref > 0 == num_blocks.
"""
from __future__ import annotations

from collections import OrderedDict

from gateway.worker.request import Request


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    # Python hashes ints and tuples of ints identically in every process (no salt), so the
    # hashes can be advertised to gateways.
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_prefix_queries = 0  # blocks looked up
        self.num_prefix_hits = 0  # blocks found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, request: Request, num_tokens: int) -> None:
        """Extend request.block_hashes to cover the full blocks among its first num_tokens."""
        bs = self.block_size
        hashes = request.block_hashes
        full = num_tokens // bs
        if len(hashes) >= full:
            return
        prompt, outs = request.prompt_token_ids, request.output_token_ids
        n_p = len(prompt)
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), full):
            a, b = i * bs, (i + 1) * bs  # sliced from prompt and outputs: no copy of all tokens a block
            block = prompt[a:b] if b <= n_p else outs[a - n_p : b - n_p] if a >= n_p else prompt[a:] + outs[: b - n_p]
            parent = chain_hash(parent, tuple(block))
            hashes.append(parent)

    def get_computed_blocks(self, request: Request) -> list[int]:
        """Cached blocks holding a prefix of the request's tokens (at least one token is left
        to compute, so the step still produces logits for it)."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._update_hashes(request, max_blocks * self.block_size)
        blocks: list[int] = []
        for h in request.block_hashes[:max_blocks]:
            b = self.hash_to_block.get(h)
            if b is None:
                break
            blocks.append(b)
        self.num_prefix_queries += max_blocks
        self.num_prefix_hits += len(blocks)
        return blocks

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[int] | None = None
    ) -> bool:
        """Give the request blocks for num_new_tokens more tokens (after its computed ones and the
        computed_blocks it takes from the cache). False, with nothing changed, when they don't fit."""
        if not computed_blocks and (
            request.num_computed_tokens + num_new_tokens <= len(request.block_ids) * self.block_size
        ):
            return True  # fits the blocks it holds (most decode steps)
        computed_blocks = computed_blocks or []
        num_tokens = (
            request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        )
        num_new_blocks = (
            self.blocks_needed(num_tokens) - len(request.block_ids) - len(computed_blocks)
        )
        # Cached blocks that are currently free leave the free queue when we take them.
        num_revived = sum(1 for b in computed_blocks if self.ref_counts[b] == 0)
        if num_new_blocks > len(self.free) - num_revived:
            return False
        for b in computed_blocks:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
        request.block_ids.extend(computed_blocks)
        for _ in range(max(num_new_blocks, 0)):
            b, _ = self.free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                if self.hash_to_block.get(h) == b:
                    del self.hash_to_block[h]
                self.block_hash[b] = None
            self.ref_counts[b] = 1
            request.block_ids.append(b)
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are now full of computed tokens."""
        full = request.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or full <= request.num_registered_blocks:
            return  # no block filled up since the last call (most decode steps)
        self._update_hashes(request, request.num_computed_tokens)
        for i in range(request.num_registered_blocks, full):
            b = request.block_ids[i]
            if self.block_hash[b] is None:
                h = request.block_hashes[i]
                # Two requests may compute the same block in one step: only one copy is cached;
                # the other stays unhashed so it is evicted first when freed.
                if self.hash_to_block.setdefault(h, b) == b:
                    self.block_hash[b] = h
        request.num_registered_blocks = max(full, request.num_registered_blocks)

    def free_request(self, request: Request) -> None:
        # Free tail blocks first so they are evicted before the prefix blocks others may share.
        for b in reversed(request.block_ids):
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0
            if self.ref_counts[b] == 0:
                self.free[b] = None
                if self.block_hash[b] is None:  # nothing to reuse: evict it first
                    self.free.move_to_end(b, last=False)
        request.block_ids.clear()
        request.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (all must be free)."""
        assert self.num_used_blocks == 0
        self.hash_to_block.clear()
        self.block_hash = [None] * self.num_blocks

    def check_invariants(self) -> None:
        used = sum(1 for r in self.ref_counts if r > 0)
        assert used + len(self.free) == self.num_blocks, (used, len(self.free))
        assert all(self.ref_counts[b] == 0 for b in self.free)
