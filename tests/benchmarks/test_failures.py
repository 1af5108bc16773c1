"""The mesh simulator's failure model (benchmarks/sim/failures.py) on a tiny synthetic mesh: a crash
cuts the streams in flight and each row answers as it says, a stall, determinism, the JSON."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import mesh_sim
from benchmarks.sim.demand import Arrivals, make_arrivals
from benchmarks.sim.failure_report import ROWS, failure_result, simulate_failures
from benchmarks.sim.failures import FailureSim
from benchmarks.sim.faults import CRASH, STALL, make_faults
from benchmarks.sim.mesh import Mesh
from benchmarks.sim.trace import load_trace, trace_arrivals
from gateway.config import ResilienceConfig
from tests.benchmarks.test_trace_replay import TINY as TRACE_TINY
from tests.benchmarks.test_trace_replay import make_trace

TINY = mesh_sim.Settings(num_sites=40, num_requests=2000, mean_slots=6.0, warmup_s=2.0, k_near=6, k_spill=3,
                         client_retries=0)


@pytest.fixture(scope="module")
def world() -> tuple[Mesh, Arrivals, int, float]:
    """The mesh, its arrivals, and the pool that serves the most requests with the moment halfway
    through the day (a pool with streams in flight then)."""
    mesh = mesh_sim.synthetic_mesh(TINY, num_metros=8)
    arr = make_arrivals(mesh, TINY)
    sim = mesh_sim.Simulation(mesh, arr, TINY, "latency")
    sim.run()
    busiest = int(np.bincount(sim.served[sim.served >= 0]).argmax())
    return mesh, arr, busiest, float(np.median(arr.t))


def run(world: tuple[Mesh, Arrivals, int, float], mode: str, faults: list[tuple[float, int, int, float]],
        **settings: Any) -> tuple[FailureSim, dict[str, Any]]:
    mesh, arr, _, _ = world
    s = dataclasses.replace(TINY, **settings)
    sim = FailureSim(mesh, arr, s, "latency", mode=mode, faults=faults)
    return sim, sim.run()


def test_a_crash_cuts_streams_lost_without_continuation_continued_with(world: tuple[Mesh, Arrivals, int, float]) -> None:
    _, _, p, t = world
    crash = [(t, CRASH, p, 30.0)]
    base_sim, base = run(world, "none", [])
    assert not base["cut"].any() and not base["met_failure"].any()
    none_sim, none = run(world, "none", crash)
    cont_sim, cont = run(world, "continue", crash)
    # up to the crash both runs are the same: the same streams are in flight on the pool
    lost = int(none["lost"].sum())
    assert lost > 0 and lost == int(none["cut"].sum())
    assert none_sim.fault_counts["crashes"] == cont_sim.fault_counts["crashes"] == 1
    # without continuation each stream that had tokens is lost (no client retry here); with it,
    # the same streams go on elsewhere and every request completes
    assert int(cont["resumed"].sum()) == lost
    assert not cont["cut"].any() and not cont["lost"].any()
    assert np.isfinite(cont["e2e_s"]).all()
    assert not np.isfinite(none["e2e_s"][none["lost"]]).any()
    # a client retry from scratch brings them back, later
    retry_sim, retry = run(world, "none", crash, client_retries=1)
    assert int(retry["cut"].sum()) == lost and not retry["lost"].any()
    again = retry["cut"]
    assert (retry["ttft_s"][again] > base["ttft_s"][again] + TINY.client_retry_s).all()


def test_a_stall_delays_streams_without_continuation_and_is_cut_short_with(
        world: tuple[Mesh, Arrivals, int, float]) -> None:
    _, _, p, t = world
    dur = 20.0  # past the stall bound and the detection, under the 60 s idle timeout
    stall = [(t, STALL, p, dur)]
    _, none = run(world, "none", stall)
    _, cont = run(world, "continue", stall)
    _, hedge = run(world, "continue+hedge", stall)
    # the gateway before issue 17 waits: streams on the pool see the whole stall as one gap, none is cut
    assert not none["cut"].any()
    assert none["max_gap_s"].max() == pytest.approx(dur)
    # continuation: the streams move after the stall bound (1 s floor) or when the pool is marked down
    assert cont["resumed"].sum() > 0 and not cont["cut"].any()
    met = cont["met_failure"]
    assert cont["max_gap_s"][met].max() < dur / 2
    # hedging races the requests that reached the stalled pool before it was marked down
    assert hedge["hedged"].sum() > 0
    assert hedge["hedged"].mean() <= ResilienceConfig().hedge_budget
    late = np.nan_to_num(cont["ttft_s"][met], nan=math.inf) > 1.0
    late_h = np.nan_to_num(hedge["ttft_s"][hedge["met_failure"]], nan=math.inf) > 1.0
    assert late_h.sum() <= late.sum()


def test_faults_are_seeded(world: tuple[Mesh, Arrivals, int, float]) -> None:
    a = make_faults(40, 100.0, dataclasses.replace(TINY, crash_per_pool_hour=60.0, stall_per_pool_hour=60.0))
    b = make_faults(40, 100.0, dataclasses.replace(TINY, crash_per_pool_hour=60.0, stall_per_pool_hour=60.0))
    c = make_faults(40, 100.0, dataclasses.replace(TINY, crash_per_pool_hour=60.0, stall_per_pool_hour=60.0, seed=1))
    assert a == b and a != c and len(a) > 0
    assert {k for _, k, _, _ in a} == {CRASH, STALL}
    faults = make_faults(40, 150.0, TINY)
    _, x = run(world, "continue+hedge", faults)
    _, y = run(world, "continue+hedge", faults)
    for k in ("ttft_s", "e2e_s", "max_gap_s", "cut", "resumed", "hedged"):
        assert np.array_equal(x[k], y[k], equal_nan=True), k


def test_failure_rows_json(world: tuple[Mesh, Arrivals, int, float]) -> None:
    mesh, arr, _, _ = world
    s = dataclasses.replace(TINY, crash_per_pool_hour=6.0, stall_per_pool_hour=12.0, repair_s=20.0)
    res = json.loads(json.dumps(failure_result(s, simulate_failures(mesh, arr, s))))
    assert set(res) >= {"settings", "slo", "faults", "rows", "goodput_gain"}
    assert set(res["rows"]) == set(ROWS)
    assert res["faults"]["crashes"] + res["faults"]["stalls"] > 0
    for name, row in res["rows"].items():
        assert {"goodput", "goodput_rps", "ttft_p50_s", "ttft_p99_s", "cut", "lost", "resumed", "hedged",
                "extra_requests_hedging", "met_failure"} <= set(row)
        assert 0 <= row["goodput"] <= 1 and row["num_requests"] == int(arr.measured.sum())
    rows = res["rows"]
    assert rows["no-faults"]["goodput"] >= rows["none"]["goodput"]
    assert rows["no-faults"]["met_failure"] == 0 and rows["none"]["met_failure"] > 0
    assert rows["none"]["resumed"] == rows["none"]["hedged"] == 0 and rows["continue"]["hedged"] == 0
    assert rows["continue"]["cut"] <= rows["none"]["cut"]


def test_failure_rows_over_a_trace_replay(tmp_path: Path) -> None:
    """With --trace: pools with prefix caches; a crash cuts streams that continue elsewhere."""
    s = dataclasses.replace(TRACE_TINY, crash_per_pool_hour=40.0, stall_per_pool_hour=40.0, repair_s=20.0)
    mesh = mesh_sim.synthetic_mesh(s, num_metros=8)
    arr = trace_arrivals(mesh, s, load_trace(make_trace(tmp_path / "t.jsonl")))
    res = failure_result(s, simulate_failures(mesh, arr, s, cache_blocks=64, rows=("none", "continue")))
    none, cont = res["rows"]["none"], res["rows"]["continue"]
    assert res["faults"]["crashes"] > 0 and none["met_failure"] > 0
    assert cont["resumed"] > 0 and cont["cut"] <= none["cut"]
    assert none["num_requests"] == cont["num_requests"] == int(arr.measured.sum())


@pytest.mark.parametrize("flag", ["--crash-rate=-1", "--stall-s=0", "--client-retries=-2"])
def test_bad_failure_flags_are_refused(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        mesh_sim.main(["--quick", flag])
    assert e.value.code == 2 and flag.split("=")[0] in capsys.readouterr().err


def test_mesh_sim_main_adds_the_failure_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default run: the routing table's JSON keys unchanged, a "failures" section and its PNG beside."""
    monkeypatch.setattr(mesh_sim, "QUICK", dataclasses.replace(TINY, num_requests=800))
    out = tmp_path / "ms.json"
    assert mesh_sim.main(["--quick", "--synthetic", "--no-variants", "--workers", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["policies"]) == set(mesh_sim.POLICIES) and "goals" in res and "floor" in res
    assert set(res["failures"]["rows"]) == set(ROWS)
    assert res["settings"]["crash_per_pool_hour"] == TINY.crash_per_pool_hour
    if (tmp_path / "ms.png").exists():  # matplotlib installed
        assert (tmp_path / "ms_failures.png").exists()
    out2 = tmp_path / "only.json"
    assert mesh_sim.main(["--quick", "--synthetic", "--failures-only", "--workers", "1", "--crash-rate", "30",
                          "--json", str(out2)]) == 0
    only = json.loads(out2.read_text())
    assert "policies" not in only and only["failures"]["settings"]["crash_per_pool_hour"] == 30.0
