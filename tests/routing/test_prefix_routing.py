"""Prefix- and session-aware routing: the latency model charges prefill only for what a pool is
estimated to hold (gateway/routing/prefix_index.py, latency.py)."""
from __future__ import annotations

import random
import sys
import tracemalloc

from gateway.config import RoutingOptions
from gateway.core.prefix import CHUNK_CHARS, request_chunks
from gateway.core.types import Endpoint, LoadReport, RouteRequest
from gateway.routing.plugins import build_profile
from gateway.routing.prefix_index import PrefixIndex

SYSTEM = "Rules of the house: be brief, cite sources, never guess. " * 200  # ~11,400 characters


def ep(pool_id: str, rtt_ms: float, load: LoadReport | None = None) -> Endpoint:
    e = Endpoint(pool_id, f"http://{pool_id}", pool_id, "meshgate", frozenset({"m"}))
    e.rtt_ms, e.country = rtt_ms, "DE"
    e.load = load or LoadReport(prefill_tps=2000.0, max_num_seqs=16, mean_request_s=2.0)
    return e


def request(messages: list[dict[str, str]], index: PrefixIndex, session: str = "") -> RouteRequest:
    c = request_chunks(None, None, messages)
    pool, num = index.session(session)
    return RouteRequest(model="m", prompt_chars=c.total, prefix_hashes=c.hashes,
                        tokens_per_chunk=CHUNK_CHARS * 0.25, session_key=session, session_pool=pool,
                        session_chunks=num)


def route(profile: str, req: RouteRequest, eps: list[Endpoint], **opts: object) -> list[str]:
    d = build_profile(profile, RoutingOptions(**opts), rng=random.Random(0)).route(req, eps)  # type: ignore[arg-type]
    return [e.pool_id for e in d.ranked]


def test_a_warm_pool_farther_away_wins_for_a_long_prompt_and_loses_for_a_short_one() -> None:
    index = PrefixIndex()
    near, warm = ep("near", 2.0), ep("warm", 12.0)
    index.attach([near, warm])
    long_msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
    index.record_sent(warm, request(long_msgs, index).prefix_hashes)  # the gateway sent it there before
    assert route("latency", request(long_msgs, index), [near, warm])[0] == "warm"
    assert route("latency-no-cache", request(long_msgs, index), [near, warm])[0] == "near"
    short = [{"role": "user", "content": "hello there"}]
    assert route("latency", request(short, index), [near, warm])[0] == "near"


def test_advertised_hashes_count_like_the_gateways_own_memory() -> None:
    index = PrefixIndex()
    near, warm = ep("near", 2.0), ep("warm", 12.0)
    index.attach([near, warm])
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    req = request(msgs, index)
    warm.load = LoadReport(prefill_tps=2000.0, hot_prefix_hashes=req.prefix_hashes[:10])
    d = build_profile("latency", rng=random.Random(0)).route(req, [near, warm])
    assert d.ranked[0].pool_id == "warm"
    assert d.cached_tokens["warm"] == int(10 * CHUNK_CHARS * 0.25) and d.cached_tokens["near"] == 0
    assert "cached_tokens=" in d.explain()
    # the network-blind rule picks the warm pool too, and prefers it even when it is busier
    warm.load = LoadReport(prefill_tps=2000.0, waiting=5, running=16, hot_prefix_hashes=req.prefix_hashes[:10])
    assert route("prefix", req, [near, warm])[0] == "warm"


def test_a_session_keeps_its_pool_but_is_never_a_pin() -> None:
    index = PrefixIndex()
    a, b = ep("a", 5.0), ep("b", 5.5)
    index.attach([a, b])
    msgs = [{"role": "user", "content": "turn one " * 300}]
    index.record_session("conv-1", "b", len(request(msgs, index).prefix_hashes))
    req = request(msgs + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}], index, "conv-1")
    assert route("latency", req, [a, b])[0] == "b"
    # full and with a queue: the latency model overrules the prior
    b.load = LoadReport(prefill_tps=2000.0, waiting=20, running=16, queued_prompt_tokens=20_000,
                        max_num_seqs=16, mean_request_s=2.0)
    assert route("latency", req, [a, b])[0] == "a"
    b.healthy = False
    b.load = None
    assert route("latency", req, [a, b])[0] == "a"


def test_the_memory_of_what_was_sent_is_bounded_and_ages() -> None:
    now = [0.0]
    index = PrefixIndex(RoutingOptions(prefix_index_max_entries=1000, prefix_memory_s=60.0), clock=lambda: now[0])
    pools = [ep(f"p{i}", 5.0) for i in range(20)]
    index.attach(pools)
    hashes = request([{"role": "user", "content": SYSTEM * 3}], index).prefix_hashes
    for p in pools:
        index.record_sent(p, hashes)
    assert len(index.sent) == 1000
    last = pools[-1].prefix
    assert last is not None and last.matched(hashes) == len(hashes)
    now[0] = 61.0
    assert last.matched(hashes) == 0  # aged out


def test_index_memory_at_its_bound_is_measured() -> None:
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = PrefixIndex(RoutingOptions(prefix_index_max_entries=50_000))
    pools = [ep(f"p{i}", 5.0) for i in range(100)]
    index.attach(pools)
    rng = random.Random(1)
    for i in range(600):
        index.record_sent(pools[i % 100], tuple(rng.getrandbits(63) for _ in range(128)))
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert len(index.sent) == 50_000
    per_entry = used / 50_000
    print(f"prefix index: {per_entry:.0f} bytes an entry", file=sys.stderr)
    assert per_entry < 200  # the config comment states ~150 bytes an entry


def test_what_was_sent_is_forgotten_once_a_caches_worth_followed_it() -> None:
    """Aged by the pool's cache size: 64 blocks of 16 tokens = 1,024 tokens of KV cache."""
    now = [0.0]
    index = PrefixIndex(RoutingOptions(prefix_memory_s=600.0), clock=lambda: now[0])
    small = ep("small", 5.0, LoadReport(prefill_tps=2000.0, kv_blocks_total=64, kv_block_tokens=16))
    unknown = ep("unknown", 5.0, LoadReport(prefill_tps=2000.0))  # reports no cache size: time alone
    index.attach([small, unknown])
    first = tuple(range(1, 9))
    for e in (small, unknown):
        index.record_sent(e, first, tokens=400)
    for i in range(2):  # 800 tokens more: less than the cache holds since `first`
        now[0] += 1.0
        for e in (small, unknown):
            index.record_sent(e, tuple(range(100 * (i + 2), 100 * (i + 2) + 8)), tokens=400)
    assert small.prefix is not None and unknown.prefix is not None
    assert small.prefix.matched(first) == 8 and index.match_all(first, [small]) == [8]
    now[0] += 1.0
    later = tuple(range(900, 908))
    for e in (small, unknown):
        index.record_sent(e, later, tokens=400)  # 1,200 tokens since `first`: more than 1,024
    assert small.prefix.matched(first) == 0 and index.match_all(first, [small, unknown]) == [0, 8]
    assert small.prefix.matched(later) == 8  # what came since is still held
    now[0] += 1.0
    index.record_sent(small, first, tokens=400)  # sent again: held again
    assert small.prefix.matched(first) == 8
    # the pool's own advertisement is not aged by the gateway's count
    small.load = LoadReport(prefill_tps=2000.0, kv_blocks_total=64, kv_block_tokens=16, hot_prefix_hashes=later)
    for i in range(5):
        index.record_sent(small, (7000 + i,), tokens=1000)
    assert small.prefix.matched(later) == 8 and small.prefix.matched(first) == 0


def test_the_cache_size_travels_with_the_load_reports() -> None:
    full = LoadReport(kv_blocks_used=3, kv_blocks_total=64, kv_block_tokens=16, prefill_tps=900.0)
    again = LoadReport.from_header(full.to_header(), full)  # a response header keeps the rates' report's
    assert again.kv_block_tokens == 16 and again.kv_blocks_total == 64
