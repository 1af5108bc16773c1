"""The trace replay of benchmarks/mesh_sim.py (--trace) on a tiny synthetic mesh and a made-up trace
in the Mooncake format; and, when ../shared is there, that the real trace loads."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from benchmarks import mesh_sim
from benchmarks.sim.trace import CachedPool, conversations, load_trace, trace_arrivals
from benchmarks.sim.trace_run import TRACE_POLICIES, TRACE_VARIANTS, simulate_trace, trace_jobs, trace_result

TINY = mesh_sim.Settings(num_sites=40, num_requests=1500, mean_slots=6.0, warmup_s=0.0, k_near=6, k_spill=3,
                         mean_util=0.3, residency_share=0.0)
REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "traces" / "mooncake-fast25"


def make_trace(path: Path, num_conversations: int = 60, seed: int = 0) -> Path:
    """Multi-turn conversations: each turn's blocks extend the last turn's; block 0 shared by all."""
    rng = random.Random(seed)
    rows, next_id = [], 1
    for c in range(num_conversations):
        blocks = [0]
        t = rng.uniform(0, 60_000)
        for _ in range(rng.randint(1, 5)):
            grow = rng.randint(2, 8)
            blocks += list(range(next_id, next_id + grow))
            next_id += grow
            rows.append({"timestamp": int(t), "input_length": 512 * len(blocks) - rng.randint(0, 400),
                         "output_length": rng.randint(20, 300), "hash_ids": list(blocks), "extra": "ignored"})
            t += rng.uniform(5_000, 30_000)
    rows.sort(key=lambda r: r["timestamp"])
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = make_trace(tmp_path_factory.mktemp("trace") / "t.jsonl")
    mesh = mesh_sim.synthetic_mesh(TINY, num_metros=8)
    arr = trace_arrivals(mesh, TINY, load_trace(path))
    results = simulate_trace(mesh, arr, TINY, cache_blocks=64, workers=1)
    return trace_result(mesh, arr, TINY, 64, str(path), results)


def test_every_row_reports_todays_fields_plus_mean_and_cache_hit_rate(replay: dict) -> None:
    assert set(replay["policies"]) == set(TRACE_POLICIES) and set(replay["variants"]) == set(TRACE_VARIANTS)
    for row in (*replay["policies"].values(), *replay["variants"].values()):
        for key in ("ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "cache_hit_rate", "cross_border", "refused"):
            assert not math.isnan(row[key]), key
        assert 0.0 <= row["cache_hit_rate"] < 1.0
        assert row["ttft_p50_s"] <= row["ttft_p99_s"]
    assert set(replay["goals"]) >= {"latency_mean_over_oracle_cache", "latency_p99_over_oracle_cache",
                                     "latency_no_cache_mean_over_latency"}


def test_conversations_find_their_prefix_cached(replay: dict) -> None:
    pol = replay["policies"]
    # later turns repeat earlier turns' blocks: routing that follows the cache finds them
    assert pol["oracle-cache"]["cache_hit_rate"] > 0.2
    assert pol["latency"]["cache_hit_rate"] > 0.2
    assert pol["latency"]["prefill_mean_s"] < pol["latency-no-cache"]["prefill_mean_s"]


def test_cached_pool_is_an_lru_of_blocks_and_keeps_the_oracles_index() -> None:
    holders: dict[int, set[int]] = {}
    pool = CachedPool(4, 1000.0, 50.0, 1.0, True, capacity=4, index=7, holders=holders)
    pool.insert((1, 2, 3))
    assert pool.lookup((1, 2, 3, 9)) == 3 and pool.lookup((2, 3)) == 2 and pool.lookup((9, 1)) == 0
    pool.insert((1, 5, 6))  # 2 and 3 are the least recently used: 2 goes
    assert pool.lookup((1, 2)) == 1 and holders[2] == set() and holders[6] == {7}
    assert pool.advertises(6) and not pool.advertises(2)


def test_conversations_link_by_their_first_two_blocks() -> None:
    conv = conversations([(0, 1, 2), (0, 1, 2, 3), (0, 5), (0,), (0,)])
    assert conv[0] == conv[1] and conv[2] != conv[0] and conv[3] != conv[4]


def test_jobs_name_the_rows() -> None:
    assert [j[0] for j in trace_jobs()] == [*TRACE_POLICIES, *TRACE_VARIANTS]


@pytest.mark.skipif(not (REAL / "conversation_trace.jsonl").is_file(), reason="no ../shared trace data here")
def test_the_real_trace_loads_in_order() -> None:
    tr = load_trace(REAL / "conversation_trace.jsonl", limit=500)
    assert len(tr.t_ms) == 500 and np.all(np.diff(tr.t_ms) >= 0)
    assert all(len(h) >= 1 for h in tr.hash_ids) and int(tr.prompt.min()) >= 1
