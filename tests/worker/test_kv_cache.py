"""BlockManager: allocation, ref counts, LRU reuse, prefix caching with chained hashes."""
from __future__ import annotations

import itertools

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway.worker.kv_cache import BlockManager
from gateway.worker.request import Request, SamplingParams

_ids = itertools.count()


def req(tokens: list[int]) -> Request:
    return Request(f"r{next(_ids)}", list(tokens), SamplingParams())


def compute(kv: BlockManager, r: Request, n: int | None = None) -> None:
    """What a step does after the model ran: mark tokens computed, register full blocks."""
    r.num_computed_tokens += r.num_tokens - r.num_computed_tokens if n is None else n
    kv.cache_full_blocks(r)


def admit(kv: BlockManager, r: Request, n: int | None = None) -> bool:
    """What the scheduler does on admission: take cached prefix blocks, allocate the rest."""
    blocks = kv.get_computed_blocks(r)
    cached = len(blocks) * kv.block_size
    n = r.num_tokens - cached if n is None else n
    if not kv.allocate_slots(r, n, blocks):
        return False
    r.num_computed_tokens = cached
    return True


def snapshot(kv: BlockManager, *reqs: Request) -> tuple:
    return (
        list(kv.free),
        list(kv.ref_counts),
        list(kv.block_hash),
        dict(kv.hash_to_block),
        [list(r.block_ids) for r in reqs],
    )


def test_allocation_counts_blocks_and_keeps_invariant() -> None:
    kv = BlockManager(num_blocks=8, block_size=4)
    a = req(range(10))
    assert kv.allocate_slots(a, 10)
    assert len(a.block_ids) == 3 and len(set(a.block_ids)) == 3
    assert all(kv.ref_counts[b] == 1 for b in a.block_ids)
    assert kv.num_free_blocks == 5 and kv.num_used_blocks == 3
    a.num_computed_tokens = 10
    assert kv.allocate_slots(a, 2)  # 12 tokens still fit in 3 blocks
    assert len(a.block_ids) == 3
    a.num_computed_tokens = 12
    assert kv.allocate_slots(a, 1)  # the 13th token needs a 4th block
    assert len(a.block_ids) == 4 and kv.num_free_blocks == 4
    kv.check_invariants()
    kv.free_request(a)
    assert a.block_ids == [] and kv.num_free_blocks == 8
    kv.check_invariants()


def test_allocate_returns_false_and_changes_nothing_when_it_does_not_fit() -> None:
    kv = BlockManager(num_blocks=4, block_size=4)
    a = req(range(12))
    assert admit(kv, a)
    compute(kv, a)
    a_blocks = list(a.block_ids)
    kv.free_request(a)  # its 3 full blocks stay cached in the free queue
    c = req([100 + i for i in range(4)])
    assert admit(kv, c)  # takes the never-used block: the 3 free ones are a's cached blocks
    b = req(list(range(12)) + [99] * 8)  # 20 tokens: 3 cached blocks + 2 new ones
    blocks = kv.get_computed_blocks(b)
    assert blocks == a_blocks
    before = snapshot(kv, b, c)
    # Reviving the 3 cached blocks empties the free queue: no room for the 2 new blocks.
    assert not kv.allocate_slots(b, 8, blocks)
    assert snapshot(kv, b, c) == before
    kv.check_invariants()
    # Without revived blocks: a request larger than the whole cache.
    d = req(range(40))
    before = snapshot(kv, d)
    assert not kv.allocate_slots(d, 40)
    assert snapshot(kv, d) == before
    kv.free_request(c)


def test_shared_prefix_blocks_are_ref_counted() -> None:
    kv = BlockManager(num_blocks=8, block_size=4)
    a = req(range(10))
    assert admit(kv, a)
    compute(kv, a)
    b = req(list(range(8)) + [50, 51, 52])
    assert admit(kv, b)
    assert b.num_computed_tokens == 8
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    assert [kv.ref_counts[x] for x in b.block_ids[:2]] == [2, 2]
    kv.free_request(a)
    assert [kv.ref_counts[x] for x in b.block_ids[:2]] == [1, 1]
    assert not set(b.block_ids) & set(kv.free)
    kv.check_invariants()
    kv.free_request(b)
    assert kv.num_free_blocks == 8
    kv.check_invariants()


def test_prefix_hit_needs_the_same_chain_from_the_first_block() -> None:
    kv = BlockManager(num_blocks=16, block_size=4)
    a = req(range(16))
    assert admit(kv, a)
    compute(kv, a)
    same_start = req(list(range(12)) + [7, 7, 7, 7, 7])
    assert kv.get_computed_blocks(same_start) == a.block_ids[:3]
    # Blocks 1..2 hold the same tokens as `a`, but the first block differs: the chained hash
    # of every later block differs too, so nothing is reused.
    other_start = req([9, 9, 9, 9] + list(range(4, 16)) + [1])
    assert kv.get_computed_blocks(other_start) == []
    differs_in_middle = req(list(range(4)) + [9, 9, 9, 9] + list(range(8, 16)) + [1])
    assert kv.get_computed_blocks(differs_in_middle) == a.block_ids[:1]
    kv.free_request(a)


def test_at_least_one_token_is_left_to_compute() -> None:
    kv = BlockManager(num_blocks=8, block_size=4)
    a = req(range(12))
    assert admit(kv, a)
    compute(kv, a)
    kv.free_request(a)
    twin = req(range(12))  # exactly 3 full cached blocks
    blocks = kv.get_computed_blocks(twin)
    assert len(blocks) == 2, "the last block is recomputed so the step yields logits"
    assert admit(kv, twin)
    assert twin.num_computed_tokens == 8 < twin.num_tokens
    kv.free_request(twin)
    kv.check_invariants()


def test_partial_prefix_blocks_are_not_cached() -> None:
    kv = BlockManager(num_blocks=8, block_size=4)
    a = req(range(6))
    assert admit(kv, a)
    compute(kv, a)  # 1 full block, 1 half block
    b = req(list(range(6)) + [42, 43, 44])
    assert kv.get_computed_blocks(b) == a.block_ids[:1]
    kv.free_request(a)


def test_prefix_caching_disabled_never_hits() -> None:
    kv = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = req(range(12))
    assert admit(kv, a)
    compute(kv, a)
    assert kv.get_computed_blocks(req(range(13))) == []
    kv.free_request(a)


def test_lru_evicts_tail_blocks_before_head_blocks() -> None:
    kv = BlockManager(num_blocks=3, block_size=4)
    a = req(range(12))
    assert kv.allocate_slots(a, 12)
    head, mid, tail = a.block_ids
    compute(kv, a)
    kv.free_request(a)
    b = req([100, 101, 102])
    assert kv.allocate_slots(b, 3)
    assert b.block_ids == [tail]
    # The prefix blocks survived: a request extending `a` still hits them.
    again = req(list(range(12)) + [5])
    assert kv.get_computed_blocks(again) == [head, mid]
    c = req([200])
    assert kv.allocate_slots(c, 1)
    assert c.block_ids == [mid]
    # The reused block forgot a's content and is cached under its new one.
    assert kv.get_computed_blocks(req(list(range(12)) + [5])) == [head]
    b.prompt_token_ids.append(103)
    compute(kv, b)
    assert kv.get_computed_blocks(req([100, 101, 102, 103, 0])) == [tail]
    kv.free_request(b)
    kv.free_request(c)
    kv.check_invariants()


def test_lru_evicts_blocks_without_hash_first_and_older_requests_first() -> None:
    kv = BlockManager(num_blocks=5, block_size=4)
    a = req(range(6))  # 1 full (hashed) block + 1 partial block
    assert kv.allocate_slots(a, 6)
    compute(kv, a)
    b = req(range(50, 58))  # 2 full blocks
    assert kv.allocate_slots(b, 8)
    compute(kv, b)
    (never_used,) = kv.free
    a_full, a_partial = a.block_ids
    b_head, b_tail = b.block_ids
    kv.free_request(b)  # freed first: older
    kv.free_request(a)
    held = [req([1]) for _ in range(5)]
    for r in held:
        assert kv.allocate_slots(r, 1)
    order = [r.block_ids[0] for r in held]
    # Blocks with nothing to reuse go first (even a's partial block, freed last), then cached
    # blocks in LRU order: `b` (freed earlier) before `a`, and b's tail before its head.
    assert set(order[:2]) == {a_partial, never_used}
    assert order[2:] == [b_tail, b_head, a_full]
    for r in held:
        kv.free_request(r)
    kv.check_invariants()


# -- random sequences of admit / compute / extend / free ------------------------------------------

BS = 2


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives the block manager like the scheduler and model do, with a shadow of what each KV
    slot holds, to check that a request only ever reads its own tokens and never writes into a
    block another live request holds."""

    def __init__(self) -> None:
        super().__init__()
        self.kv = BlockManager(num_blocks=10, block_size=BS)
        self.live: list[Request] = []
        self.scheduled: dict[str, int] = {}  # allocated but not yet computed tokens
        self.shadow: list[list[int | None]] = [[None] * BS for _ in range(10)]

    def _pick(self, i: int) -> Request:
        return self.live[i % len(self.live)]

    def _allocate(self, r: Request, n: int, blocks: list[int]) -> bool:
        before = snapshot(self.kv, r)
        refs = list(self.kv.ref_counts)
        held = len(r.block_ids)
        if not self.kv.allocate_slots(r, n, blocks):
            assert snapshot(self.kv, r) == before
            return False
        fresh = r.block_ids[held + len(blocks) :]
        assert all(refs[b] == 0 for b in fresh), "a new block was still held by someone"
        end = r.num_computed_tokens + len(blocks) * BS + n
        assert len(r.block_ids) == self.kv.blocks_needed(end)
        return True

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=14), chunk=st.integers(1, 14))
    def admit(self, tokens: list[int], chunk: int) -> None:
        r = req(tokens)
        blocks = self.kv.get_computed_blocks(r)
        cached = len(blocks) * BS
        assert cached < r.num_tokens
        for i, b in enumerate(blocks):  # a prefix hit must hold exactly these tokens
            assert self.shadow[b] == tokens[i * BS : (i + 1) * BS]
        n = min(chunk, r.num_tokens - cached)
        if self._allocate(r, n, blocks):
            r.num_computed_tokens = cached
            self.live.append(r)
            self.scheduled[r.request_id] = n

    @precondition(lambda self: any(self.scheduled[r.request_id] for r in self.live))
    @rule(i=st.integers(0, 50), sampled=st.integers(0, 2))
    def run_step(self, i: int, sampled: int) -> None:
        r = next(r for r in self.live[i % len(self.live) :] + self.live if self.scheduled[r.request_id])
        n = self.scheduled[r.request_id]
        tokens = r.all_token_ids
        for p in range(r.num_computed_tokens, r.num_computed_tokens + n):
            b = r.block_ids[p // BS]
            assert self.kv.ref_counts[b] == 1, "writing into a block another request holds"
            self.shadow[b][p % BS] = tokens[p]
        r.num_computed_tokens += n
        self.kv.cache_full_blocks(r)
        self.scheduled[r.request_id] = 0
        if r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(sampled)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 50), chunk=st.integers(1, 14))
    def schedule_more(self, i: int, chunk: int) -> None:
        r = self._pick(i)
        if self.scheduled[r.request_id]:
            return
        n = min(chunk, r.num_tokens - r.num_computed_tokens)
        assert n > 0
        if self._allocate(r, n, []):
            self.scheduled[r.request_id] = n

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 50))
    def free(self, i: int) -> None:
        r = self._pick(i)
        self.kv.free_request(r)
        assert r.block_ids == []
        self.live.remove(r)

    @invariant()
    def blocks_are_accounted_for(self) -> None:
        kv = self.kv
        kv.check_invariants()
        assert kv.num_free_blocks + kv.num_used_blocks == kv.num_blocks
        holders = [0] * kv.num_blocks
        for r in self.live:
            assert len(set(r.block_ids)) == len(r.block_ids)
            for b in r.block_ids:
                holders[b] += 1
        assert holders == kv.ref_counts
        for h, b in kv.hash_to_block.items():
            assert kv.block_hash[b] == h
        for r in self.live:  # a full computed block is registered under its own content, or is an
            for i in range(r.num_computed_tokens // BS):  # unhashed duplicate of a cached block
                assert kv.block_hash[r.block_ids[i]] in (r.block_hashes[i], None)

    @invariant()
    def requests_read_their_own_tokens(self) -> None:
        for r in self.live:
            tokens = r.all_token_ids
            for p in range(r.num_computed_tokens):
                assert self.shadow[r.block_ids[p // BS]][p % BS] == tokens[p]

    @invariant()
    def shared_blocks_are_full_cached_prefix_blocks(self) -> None:
        for r in self.live:
            for i, b in enumerate(r.block_ids):
                if self.kv.ref_counts[b] > 1:
                    assert self.kv.block_hash[b] is not None
                    assert (i + 1) * BS <= r.num_computed_tokens


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
