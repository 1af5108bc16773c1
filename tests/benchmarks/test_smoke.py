"""Smoke tests of benchmarks/mesh_sim.py and benchmarks/routing_scale.py on tiny synthetic meshes
(no ../shared data): the result shapes, and behaviour rather than timings (tests never assert goals)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import mesh_sim, routing_scale
from gateway.core.types import Endpoint, LoadReport, RouteRequest

TINY = mesh_sim.Settings(num_sites=40, num_requests=1500, mean_slots=6.0, warmup_s=2.0, k_near=6, k_spill=3)
SUMMARY_KEYS = {"ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "goodput", "cross_border"}


@pytest.fixture(scope="module")
def sim_result() -> dict:
    mesh = mesh_sim.synthetic_mesh(TINY, num_metros=8)
    results = mesh_sim.simulate(mesh, TINY, mesh_sim.jobs_for(variants=True), workers=1, show_progress=False)
    return mesh_sim.result_dict(mesh, TINY, results)


def test_mesh_sim_json_shape(sim_result: dict) -> None:
    res = json.loads(json.dumps(sim_result))  # what write_json stores
    assert set(res["policies"]) == set(mesh_sim.POLICIES)
    assert set(res["variants"]) == set(mesh_sim.VARIANTS)
    for row in [*res["policies"].values(), *res["variants"].values()]:
        assert SUMMARY_KEYS <= set(row)
        assert all(math.isfinite(row[k]) for k in SUMMARY_KEYS)
        assert row["ttft_p50_s"] <= row["ttft_p90_s"] <= row["ttft_p99_s"]
        assert 0 <= row["goodput"] <= 1 and 0 <= row["cross_border"] <= 1
        assert row["num_requests"] == res["num_requests_measured"] > 0
    assert {"latency_p99_over_oracle", "latency_p99_reduction_vs_nearest"} <= set(res["goals"])
    assert res["settings"]["num_sites"] == TINY.num_sites and res["mesh"]["num_sites"] == TINY.num_sites


def test_oracle_no_worse_than_random(sim_result: dict) -> None:
    pol = sim_result["policies"]
    assert pol["oracle"]["ttft_p50_s"] <= pol["random"]["ttft_p50_s"]
    assert pol["nearest"]["cross_border"] <= pol["random"]["cross_border"]


def test_failover_variant_refuses_some(sim_result: dict) -> None:
    refused = {n: v["refused"] for n, v in sim_result["variants"].items()}
    assert all(r == 0 for n, r in refused.items() if "max_waiting" not in mesh_sim.VARIANTS[n])
    assert refused["latency+merge+failover"] > 0
    assert sim_result["policies"]["latency"]["refused"] == 0


def test_pool_is_fifo_with_slots() -> None:
    pool = mesh_sim.PoolSim(slots=2, ptps=1000.0, dtps=10.0, mean_service_s=1.0)
    ends = [pool.admit(0.0, 100, 10, 10)[1] for _ in range(3)]  # prefill 0.1 s each, decode 1 s
    assert ends[0] == pytest.approx(1.1) and ends[1] == pytest.approx(1.2)
    first3, _ = pool.admit(0.5, 100, 10, 10)  # the 4th: after the 3rd, which waits for slot 1 at 1.1
    assert first3 == pytest.approx(1.3)
    rep = pool.report(0.5)
    assert (rep.waiting, rep.running) == (2, 2)
    # two prompts of 100 tokens at 1000 tokens/s, then a slot: the running have 6 and 7 tokens left
    # at 10 tokens/s, and 3 requests (2 waiting + the new one) need the 2nd of them to finish
    assert rep.queue_wait_s == pytest.approx(0.2 + 0.7)
    assert pool.report(0.5, mean_wait=True).queue_wait_s == pytest.approx(0.2 + 3 * 1.0 / 2)


def test_skips_without_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mesh_sim, "WONDERPROXY", tmp_path / "absent")
    out = tmp_path / "mesh_sim.json"
    assert mesh_sim.main(["--quick", "--json", str(out)]) == 0
    assert "skipped" in json.loads(out.read_text())


def test_candidate_set_rules() -> None:
    eps = []
    for i in range(30):
        e = Endpoint(f"p{i:02d}", "", None, "meshgate", frozenset({"m"}))
        e.rtt_ms, e.country = float(i + 1), "AA" if i % 2 else "BB"
        e.load = LoadReport(queue_wait_s=0.0 if i == 29 else 1.0)  # the farthest is the only idle one
        eps.append(e)
    eps[0].healthy = False
    eps[1].breaker_open = True
    cs = routing_scale.CandidateSet(eps, k_near=4, k_spill=2)
    got = cs.select(RouteRequest("m"))
    assert [e.pool_id for e in got[:4]] == ["p02", "p03", "p04", "p05"]
    assert "p29" in [e.pool_id for e in got[4:]] and len(got) == 6
    pinned = cs.select(RouteRequest("m", countries=frozenset({"AA"})))
    assert all(e.country == "AA" for e in pinned) and pinned[0].pool_id == "p03"
    assert cs.select(RouteRequest("other")) == []


def test_routing_scale_shape() -> None:
    res = routing_scale.run(num_sites=60, quick=True, synthetic=True, num_decisions=(5, 100))
    res = json.loads(json.dumps(res))
    assert res["num_sites"] == 60
    for name in ("latency", "nearest", "least-load", "round-robin", "random", "p2c"):
        row = res["profiles"][name]
        assert row["all"]["p50_us"] > 0 and row["candidates"]["p99_us"] >= row["candidates"]["p50_us"]
    assert res["memory"]["num_endpoints"] == 60 and res["memory"]["peak_mb"] > 0
    assert {"latency_decision_p99_us", "mesh_view_mb"} <= set(res["goals"])
