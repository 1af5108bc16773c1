"""geo.probing: per-peer RTT statistics, up/down hysteresis, and probe candidate selection."""
from __future__ import annotations

import numpy as np
import pytest

from geo.probing import CandidateSelector, PeerStats, ProbeStatsConfig


def test_ewma_subtracts_server_time():
    s = PeerStats(ProbeStatsConfig(ewma_alpha=0.5))
    assert s.ewma_ms is None and s.p90_ms is None and s.min_ms is None
    s.record(10.0)
    assert s.ewma_ms == 10.0  # the first sample is the estimate
    s.record(25.0, server_ms=5.0)  # 20 ms of network
    assert s.ewma_ms == pytest.approx(15.0)
    s.record(3.0, server_ms=4.0)  # a clock step: never negative
    assert s.ewma_ms == pytest.approx(7.5) and s.min_ms == 0.0
    assert s.num_samples == 3


def test_p90_over_a_sliding_window():
    s = PeerStats(ProbeStatsConfig(window=10))
    for x in range(1, 11):
        s.record(float(x))
    assert s.p90_ms == pytest.approx(np.percentile(np.arange(1, 11), 90))
    for _ in range(10):  # the window forgets the old samples entirely
        s.record(50.0)
    assert s.p90_ms == 50.0 and s.min_ms == 50.0


def test_jitter_follows_rfc3550():
    s = PeerStats()
    s.record(10.0)
    assert s.jitter_ms == 0.0
    s.record(26.0)  # |D| = 16 -> J = 16 / 16
    assert s.jitter_ms == pytest.approx(1.0)
    for _ in range(200):  # alternating 10 / 26: J tends to 16
        s.record(10.0)
        s.record(26.0)
    assert s.jitter_ms == pytest.approx(16.0, rel=0.01)
    steady = PeerStats()
    for _ in range(50):
        steady.record(30.0)
    assert steady.jitter_ms == 0.0


def test_down_after_misses_up_after_answers():
    s = PeerStats(ProbeStatsConfig(down_after=3, up_after=2))
    assert s.up  # until probes say otherwise
    assert not s.record_miss() and not s.record_miss()
    s.record(10.0)  # an answer resets the miss streak
    assert not s.record_miss() and not s.record_miss() and s.up
    assert s.record_miss() and not s.up  # third consecutive miss flips it, once
    assert not s.record_miss() and not s.up
    assert not s.record(10.0) and not s.up  # one answer is not enough
    assert s.record(10.0) and s.up
    assert s.consecutive_hits == 2 and s.consecutive_misses == 0


def test_loss_over_the_recent_window():
    s = PeerStats(ProbeStatsConfig(window=10))
    assert s.loss == 0.0
    for i in range(10):
        s.record(5.0) if i % 4 else s.record_miss()  # misses at 0, 4, 8
    assert s.loss == pytest.approx(0.3)
    for _ in range(10):
        s.record(5.0)
    assert s.loss == 0.0


def _estimates(n: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {f"s{i:04d}": float(x) for i, x in enumerate(rng.uniform(1, 300, n))}


def test_selection_is_nearest_plus_a_rotating_sample():
    est = _estimates(1000)
    sel = CandidateSelector(k_nearest=8, num_rotating=4, seed=1)
    nearest = sorted(est, key=est.get)[:8]
    for _ in range(20):
        picked = sel.select(est)
        assert len(picked) == 12  # O(K), not O(sites)
        assert picked[:8] == nearest  # nearest first, in order
        assert len(set(picked)) == 12


def test_rotation_covers_everyone():
    est = _estimates(500)
    sel = CandidateSelector(k_nearest=8, num_rotating=6, seed=2)
    seen: set[str] = set()
    periods = 0
    while len(seen) < len(est):
        seen.update(sel.select(est))
        periods += 1
        assert periods <= 2 * 500 // 6 + 2, "rotation must reach every peer within two passes"
    assert periods <= 500 // 6 + 2  # in fact one pass
    assert sel.passes <= 1


def test_small_mesh_probes_everyone_and_unknowns_rank_last():
    sel = CandidateSelector(k_nearest=4, num_rotating=2, seed=0)
    est = {"me": 0.0, "a": 30.0, "b": None, "c": 5.0, "d": float("nan")}
    assert sel.select(est, exclude=["me"]) == ["c", "a", "b", "d"]


def test_churn_keeps_the_rotation_going():
    est = _estimates(100)
    sel = CandidateSelector(k_nearest=2, num_rotating=5, seed=3)
    for _ in range(5):
        sel.select(est)
    est.pop("s0001")
    for i in range(100, 110):
        est[f"s{i:04d}"] = 500.0  # newcomers, far away
    seen: set[str] = set()
    for _ in range(60):
        picked = sel.select(est)
        assert "s0001" not in picked and len(picked) == 7
        seen.update(picked)
    assert seen == set(est)
