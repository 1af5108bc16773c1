"""Running the failure rows of mesh_sim (benchmarks/sim/failures.py) side by side, and their table,
JSON ("failures" in mesh_sim's JSON) and PNG."""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import multiprocessing
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from benchmarks import common
from benchmarks.sim.demand import Arrivals
from benchmarks.sim.failures import MODES, FailureSim
from benchmarks.sim.faults import make_faults
from benchmarks.sim.mesh import Mesh
from benchmarks.sim.settings import Settings
from benchmarks.sim.trace_run import TraceSimulation

ROWS = ("no-faults", *MODES)  # no-faults: the same rows' metrics on a mesh that never fails
_SHARED: dict[str, Any] = {}
Out = dict[str, Any]


class TraceFailureSim(FailureSim, TraceSimulation):
    """The failure rows over a trace replay: pools with prefix caches (a continuation's prompt is
    found in the new pool's cache as any prompt is; a crashed pool restarts with none)."""


def horizon_s(arr: Arrivals) -> float:
    """Faults fall while requests arrive (after the last, a fault meets only the last answers draining)."""
    return float(arr.t.max()) if len(arr.t) else 0.0


def _job(row: str) -> tuple[str, Out, float]:
    mesh, arr, s, blocks = _SHARED["mesh"], _SHARED["arr"], _SHARED["settings"], _SHARED["cache_blocks"]
    faults = [] if row == "no-faults" else _SHARED["faults"]
    mode = "none" if row == "no-faults" else row
    t0 = time.perf_counter()
    sim: FailureSim
    if blocks is None:
        sim = FailureSim(mesh, arr, s, "latency", mode=mode, faults=faults)
    else:
        sim = TraceFailureSim(mesh, arr, s, "latency", blocks, mode=mode, faults=faults)
    out = sim.run()
    out["faults"] = dict(sim.fault_counts)
    out["hedges"] = sim.num_hedges
    out["hedges_skipped_budget"] = sim.num_hedge_skipped
    return row, out, time.perf_counter() - t0


def simulate_failures(mesh: Mesh, arr: Arrivals, s: Settings, workers: int = 1, cache_blocks: int | None = None,
                      rows: tuple[str, ...] = ROWS) -> dict[str, tuple[Out, float]]:
    """Each row over the same arrivals and the same fault schedule (forked workers share them)."""
    _SHARED.update(mesh=mesh, arr=arr, settings=s, cache_blocks=cache_blocks,
                   faults=make_faults(len(mesh.sites), horizon_s(arr), s))
    if workers <= 1:
        results = [_job(r) for r in rows]
    else:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as ex:
            results = list(ex.map(_job, rows))
    return {row: (out, el) for row, out, el in results}


def summarize_failures(out: Out, s: Settings) -> dict[str, float]:
    """One row: goodput (count, share, per second of the measured window), TTFT of the answers
    completed, what the failures did to the requests."""
    n = len(out["ttft_s"])
    done = np.isfinite(out["e2e_s"])
    ttft = out["ttft_s"][done]
    good = done & ~out["cut"] & (np.nan_to_num(out["ttft_s"], nan=math.inf) <= s.slo_s) & (out["max_gap_s"] <= s.gap_slo_s)
    t = out["arrival_s"]
    window = float(t.max() - t.min()) if n > 1 else math.nan
    met = out["met_failure"]
    q = np.percentile(ttft, [50, 99]) if len(ttft) else (math.nan, math.nan)
    qm = np.percentile(out["ttft_s"][met & done], 99) if np.any(met & done) else math.nan
    gaps = out["max_gap_s"][met & done]
    return {"num_requests": int(n), "goodput": float(np.mean(good)) if n else math.nan,
            "goodput_rps": float(np.sum(good) / window) if window and window > 0 else math.nan,
            "good": int(np.sum(good)), "ttft_p50_s": float(q[0]), "ttft_p99_s": float(q[1]),
            "e2e_p99_s": float(np.percentile(out["e2e_s"][done], 99)) if np.any(done) else math.nan,
            "met_failure": int(np.sum(met)), "ttft_p99_met_failure_s": float(qm),
            "max_gap_p99_met_failure_s": float(np.percentile(gaps, 99)) if len(gaps) else math.nan,
            "cut": int(np.sum(out["cut"])), "lost": int(np.sum(out["lost"])),
            "resumed": int(np.sum(out["resumed"])), "hedged": int(np.sum(out["hedged"])),
            "hedge_won": int(np.sum(out["hedge_won"])),
            "extra_requests_hedging": float(np.mean(out["hedged"])) if n else math.nan,
            "failovers": int(np.sum(out["failovers"] > 0)), "measured_window_s": window}


def failure_result(s: Settings, results: dict[str, tuple[Out, float]]) -> dict[str, Any]:
    """The JSON's "failures" section."""
    faulty = next((r[0] for n, r in results.items() if n != "no-faults"), None)
    rc = {k: v for k, v in dataclasses.asdict(s).items()
          if k in ("crash_per_pool_hour", "repair_s", "stall_per_pool_hour", "stall_s", "gap_slo_s", "slo_s",
                   "client_retries", "client_retry_s")}
    return {"settings": rc,
            "slo": (f"answered in full, no error reached the client, TTFT <= {s.slo_s:g} s from its first try, "
                    f"no gap between tokens > {s.gap_slo_s:g} s"),
            "faults": faulty["faults"] if faulty is not None else {},
            "rows": {n: {**summarize_failures(r[0], s), "run_s": round(r[1], 2)} for n, r in results.items()},
            "goodput_gain": _gains(results, s)}


def _gains(results: dict[str, tuple[Out, float]], s: Settings) -> dict[str, float]:
    rows = {n: summarize_failures(r[0], s) for n, r in results.items()}
    base = rows.get("none")
    if base is None:
        return {}
    return {f"{n}_good_over_none": common.ratio(v["good"], base["good"]) for n, v in rows.items() if n != "none"}


COLUMNS = ("goodput", "goodput_rps", "ttft_p50_s", "ttft_p99_s", "ttft_p99_met_failure_s",
           "max_gap_p99_met_failure_s", "met_failure", "cut", "lost", "resumed", "hedged", "extra_requests_hedging")


def print_failures(fres: dict[str, Any]) -> None:
    head = ["row", "goodput", "good/s", "TTFT p50 s", "p99 s", "p99 (met failure)", "gap p99 (met)", "met failure",
            "cut", "lost", "resumed", "hedged", "extra (hedges)"]
    f = fres["faults"]
    st = fres["settings"]
    common.print_table(f"pool failures ({f.get('crashes', 0)} crashes at {st['crash_per_pool_hour']:g}/pool-hour, "
                       f"{f.get('stalls', 0)} stalls at {st['stall_per_pool_hour']:g}/pool-hour); goodput: "
                       f"{fres['slo']}", head, [[n, *(v[c] for c in COLUMNS)] for n, v in fres["rows"].items()])


def write_failure_png(path: Path, results: dict[str, tuple[Out, float]], s: Settings) -> bool:
    """TTFT CDF of each row (answers completed; requests that met a failure dashed) and goodput bars."""
    plt = common.pyplot()
    if plt is None:
        return False
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    q = np.linspace(0, 1, 1001)
    for i, (name, (out, _)) in enumerate(results.items()):
        done = np.isfinite(out["e2e_s"])
        t: NDArray[np.float64] = out["ttft_s"][done]
        if len(t):
            line = ax.plot(np.quantile(t, q), q, "-", lw=1.2, label=name)
        met = out["ttft_s"][done & out["met_failure"]]
        if len(met):
            ax.plot(np.quantile(met, q), q, "--", lw=1.0, color=line[0].get_color(), label=f"{name} (met a failure)")
        summary = summarize_failures(out, s)
        bx.bar(i, summary["goodput"], color=line[0].get_color() if len(t) else None)
    ax.axvline(s.slo_s, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("time to first token, from the first try (s, log)")
    ax.set_ylabel("share of answers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    bx.set_xticks(range(len(results)), list(results), rotation=20, fontsize=8)
    bx.set_ylabel("goodput (share of requests in the SLO)")
    lo = min(summarize_failures(o, s)["goodput"] for o, _ in results.values())
    bx.set_ylim(max(0.0, lo - 0.02), 1.0)
    fig.suptitle(f"mesh_sim: pool failures (crash {s.crash_per_pool_hour:g}, stall {s.stall_per_pool_hour:g} "
                 "per pool-hour)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
