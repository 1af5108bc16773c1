"""Mesh simulator: the real routing plug-ins over ~1,100 GPU pools in 31 countries, on a simulated clock.

    python -m benchmarks.mesh_sim [--quick] [--json PATH] [--workers N] [--no-variants] [--synthetic]
    python -m benchmarks.mesh_sim --trace PATH [--quick] [--json PATH] [--cache-blocks N] [--util U]
    python -m benchmarks.mesh_sim [--failures-only | --no-failures] [--crash-rate R] [--repair-s S]
                                  [--stall-rate R] [--stall-s S] [--gap-slo-s S] [...]

With --trace, a production trace in the Mooncake format replaces the synthetic demand, and pools
hold prefix caches: benchmarks/sim/trace.py (the mapping) and trace_run.py (the rows).

A discrete-event simulation (the modules in benchmarks/sim/):
- mesh.py: metros from the 246-city WonderProxy matrix and the AWS CloudFront metros of 31
  countries, ~1,100 sites, true RTTs (the matrix, else the fitted distance prior with per-pair
  noise), pool slots and speeds (calibrated from benchmarks/results/engine.json).
- demand.py: Poisson arrivals per metro under a diurnal curve whose peak sweeps round the globe in
  one compressed day; 20 % of requests pinned to their own country; log-uniform prompt and answer
  lengths; clients send max_tokens 1024.
- pool.py: each pool a continuous-batching FIFO multi-server queue, and the load report its worker
  would give (gateway/worker/engine.py's queue_wait_s: prefill backlog + slot wait from max_tokens).
- gateway.py: each metro's gateway keeps real `Endpoint`s as gateway/pools/upstream.py does: probe
  rounds of its ProbeConfig.k_nearest nearest pools plus num_rotating others in turn, a period
  apart plus the round's slowest probe (as Upstreams._probe_loop waits), with noisy RTT samples;
  load headers on every answer and refusal (keeping the probe's rates); in-flight crediting; load
  streams (gateway/pools/load_stream.py) from its nearest pools and its spill list's, whose
  state reaches it one one-way delay after a change (in steps of stream_step_s, 20 ms). It
  routes over the candidate set (gateway/routing/candidates.py's rule: 16 nearest + 8 from a spill
  list by RTT + the wait last reported, refreshed after each round).
- run.py: every decision is `build_profile(name).route(...)` of gateway/routing, and requests are
  sent as gateway/edge/forward.py sends them: every attempt but the last of
  UpstreamConfig.max_attempts carries x-meshgate-may-refuse, and a pool whose predicted wait
  exceeds EngineConfig.refuse_queue_wait_s answers 429 (gateway/worker/server.py), so the gateway
  tries its next-ranked pool. Every profile goes through this same forwarder.
- oracle.py: the two rows that are not profiles. `oracle` is a central scheduler that knows every
  pool's true state now (true RTT, running and waiting requests, its own requests in transit,
  slots freeing as they free, no staleness or probe noise) but not the future: it estimates when a
  slot frees from the pool's mean request duration, as the pool itself could. `clairvoyant` also
  knows the output lengths of running requests (so when each slot frees). It is not a bound: it
  schedules greedily like the oracle, and its p99 can be above the fair oracle's (it is, 0.059 s
  against 0.053 s, in benchmarks/RESULTS.md); the goal is judged against the fair oracle.
- report.py: percentiles, goals, the floor (each request alone in the mesh: the least TTFT any
  policy could give it), the table, JSON and PNG.

Variants (benchmarks/sim/settings.py VARIANTS) change one setting of a row each: no refusal, pools
without slot figures (routing without the headroom model), other refusal bounds, more attempts,
the former 1 s probe period, probing every pool, no spill candidates, pools estimating from mean
durations, perfectly fresh reports at each decision (the spill list still from probes), the
oracle estimating from max_tokens, no load streams (the gateway before them), streams to the
nearest pools only, pushed state in 50 ms steps; and least-load and round-robin over pools drawn
from the whole mesh (`/anywhere`: blind to the network; the main rows run them over the gateway's
candidate set, which is chosen by RTT). The "≥ 2× lower p50 than least-load and round-robin" goal is
judged on the main rows, the baselines in their strongest form; the `/anywhere` ratios are printed
as extra comparisons ("extra" in the JSON), not goals.

Pool failures (benchmarks/sim/failures.py, failure_report.py; with or without --trace): crashes and
stalls at the rates of the flags (per pool-hour), and the latency row run again over the same
arrivals and faults answering them three ways: `none` (the gateway before issue 17: cut streams
are lost and the client retries from scratch), `continue` (gateway/edge/resume.py: continued on the
next pool, stall bound, first-byte bound) and `continue+hedge` (and gateway/edge/hedge.py's late
first-token hedging, 5% budget); `no-faults` is the same row on a mesh that never fails. Goodput:
answered in full, no error reached the client, TTFT <= slo_s from the first try, no gap > gap_slo_s.
Its own table, a "failures" section in the JSON and `<json stem>_failures.png` (with
--failures-only, the JSON's own PNG).

Limits: one day is compressed into ~70 s, so a far pool's report from the rotating probes (one
pass: ~134 rounds) is a day old here, while in a real day it would still tell a far metro's peak
from its trough; RTTs do not drift; pools fail only in the failure rows.

JSON: {"policies": {NAME: {"ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "goodput", "cross_border",
...}}, "variants": {...}, "floor": {...}, "p50_bound": {...}, "goals": {...}, "extra": {...},
"failures": {"settings", "slo", "faults", "rows": {ROW: {"goodput", "goodput_rps", "ttft_p50_s",
"ttft_p99_s", "cut", "lost", "resumed", "hedged", "extra_requests_hedging", ...}}, "goodput_gain"}, ...}
(--failures-only: the "failures" section and the run's settings and mesh only).
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from benchmarks import common
from benchmarks.sim import report
from benchmarks.sim.failure_report import failure_result, print_failures, simulate_failures, write_failure_png
from benchmarks.sim.demand import Arrivals, make_arrivals
from benchmarks.sim.mesh import (CDN_CSV, WONDERPROXY, Calibration, Mesh, Metro, build_mesh, engine_calibration,
                                 mean_service_s, real_mesh, synthetic_mesh)
from benchmarks.sim.pool import PoolSim
from benchmarks.sim.report import Result, print_results, summarize, write_png
from benchmarks.sim.run import Simulation
from benchmarks.sim.settings import FULL, ORACLES, POLICIES, PROFILES, QUICK, VARIANTS, Settings
from benchmarks.sim.trace import load_trace, trace_arrivals
from benchmarks.sim.trace_run import TRACE_POLICIES, TRACE_VARIANTS, print_trace, simulate_trace, trace_result

__all__ = ["CDN_CSV", "FULL", "ORACLES", "POLICIES", "PROFILES", "QUICK", "VARIANTS", "WONDERPROXY", "Arrivals",
           "Calibration", "Mesh", "Metro", "PoolSim", "Settings", "Simulation", "build_mesh", "engine_calibration",
           "jobs_for", "main", "make_arrivals", "mean_service_s", "real_mesh", "result_dict", "simulate",
           "synthetic_mesh"]

log = logging.getLogger("meshgate.bench.mesh_sim")
Job = tuple[str, str, dict[str, Any]]  # (row name, policy, Settings overrides)
_SHARED: dict[str, Any] = {}  # the mesh and arrivals, set before worker processes fork


def _run_job(job: Job, show_progress: bool = True) -> tuple[str, dict[str, float], NDArray[np.float32], float]:
    name, policy, overrides = job
    mesh, arr, base = _SHARED["mesh"], _SHARED["arrivals"], _SHARED["settings"]
    s = dataclasses.replace(base, **overrides)
    t0 = time.perf_counter()
    sim = Simulation(mesh, arr, s, policy)
    if show_progress:
        with common.Progress(len(arr.t), f"mesh_sim {name}", unit="req") as bar:
            out = sim.run(bar)
    else:
        out = sim.run()
    return name, summarize(out, s.slo_s), out["ttft_s"].astype(np.float32), time.perf_counter() - t0


def jobs_for(policies: tuple[str, ...] = POLICIES, variants: bool = True) -> list[Job]:
    jobs: list[Job] = [(p, p, {}) for p in policies]
    return jobs + ([(v, row, o) for v, (row, o) in VARIANTS.items()] if variants else [])


def simulate(mesh: Mesh, s: Settings, jobs: list[Job], workers: int = 1, show_progress: bool = True
             ) -> dict[str, Result]:
    """Run each job (a policy, or a variant of one) over the same arrivals."""
    _SHARED.update(mesh=mesh, arrivals=make_arrivals(mesh, s), settings=s)
    arr = _SHARED["arrivals"]
    log.info("mesh: %d sites, %d gateways, %d countries, %d slots; %d requests (%d measured) over a %.0f s day",
             len(mesh.sites), len(mesh.gateways), mesh.info["num_countries"], int(mesh.slots.sum()), len(arr.t),
             int(arr.measured.sum()), mesh.info["day_s"])
    results: dict[str, Result] = {}
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            name, summary, ttft, el = _run_job(job, show_progress)
            results[name] = (summary, ttft, el)
        return results
    # fork: the children inherit the mesh and arrivals instead of unpickling them
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as ex:
        futures = [ex.submit(_run_job, job, show_progress) for job in jobs]
        for f in cf.as_completed(futures):
            name, summary, ttft, el = f.result()
            results[name] = (summary, ttft, el)
    return {j[0]: results[j[0]] for j in jobs}


def result_dict(mesh: Mesh, s: Settings, results: dict[str, Result]) -> dict[str, Any]:
    """The JSON of the last simulate() run."""
    return report.result_dict(mesh, _SHARED["arrivals"], s, results)


def main(argv: list[str] | None = None) -> int:
    p = common.arg_parser("mesh_sim", (__doc__ or "").split("\n")[0])
    p.add_argument("--workers", type=int, default=min(2, common.num_cpus()),
                   help="processes running policies side by side (default: min(2, CPUs))")
    p.add_argument("--no-variants", action="store_true", help="only the profiles and the oracles")
    p.add_argument("--synthetic", action="store_true", help="a made-up mesh (no ../shared data needed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", type=Path, default=None,
                   help="replay a trace in the Mooncake format (benchmarks/sim/trace.py) instead of the synthetic demand")
    p.add_argument("--cache-blocks", type=int, default=TRACE_CACHE_BLOCKS,
                   help=f"trace replay: each pool's prefix cache, in 512-token blocks (default {TRACE_CACHE_BLOCKS})")
    p.add_argument("--util", type=float, default=TRACE_UTIL,
                   help=f"trace replay: the offered load / the mesh's slots, no cache reuse counted (default {TRACE_UTIL})")
    f = p.add_argument_group("pool failures (benchmarks/sim/failures.py)")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--no-failures", action="store_true", help="leave the failure rows out")
    g.add_argument("--failures-only", action="store_true", help="only the failure rows (and their no-faults row)")
    f.add_argument("--crash-rate", type=float, default=FULL.crash_per_pool_hour,
                   help=f"pool crashes per pool-hour (default {FULL.crash_per_pool_hour:g}: a stress rate)")
    f.add_argument("--repair-s", type=float, default=FULL.repair_s,
                   help=f"mean time until a crashed pool serves again, s (default {FULL.repair_s:g})")
    f.add_argument("--stall-rate", type=float, default=FULL.stall_per_pool_hour,
                   help=f"pool stalls per pool-hour (default {FULL.stall_per_pool_hour:g})")
    f.add_argument("--stall-s", type=float, default=FULL.stall_s,
                   help=f"mean stall, s (default {FULL.stall_s:g})")
    f.add_argument("--gap-slo-s", type=float, default=FULL.gap_slo_s,
                   help=f"goodput: the longest gap between tokens allowed, s (default {FULL.gap_slo_s:g}; "
                        f"and TTFT <= {FULL.slo_s:g} s, no error)")
    f.add_argument("--client-retries", type=int, default=FULL.client_retries,
                   help=f"a client whose answer broke asks again this many times (default {FULL.client_retries})")
    args = p.parse_args(argv)
    for flag in ("crash_rate", "stall_rate", "client_retries"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')}: must be 0 or more")
    for flag in ("repair_s", "stall_s", "gap_slo_s"):
        if not getattr(args, flag) > 0:
            p.error(f"--{flag.replace('_', '-')}: must be positive")
    common.setup_logging()
    s = dataclasses.replace(QUICK if args.quick else FULL, seed=args.seed, crash_per_pool_hour=args.crash_rate,
                            repair_s=args.repair_s, stall_per_pool_hour=args.stall_rate, stall_s=args.stall_s,
                            gap_slo_s=args.gap_slo_s, client_retries=args.client_retries)
    t0 = time.perf_counter()
    calib = engine_calibration()
    if args.trace is not None:
        s = dataclasses.replace(s, mean_util=args.util, residency_share=0.0)
    mesh = synthetic_mesh(s, calib) if args.synthetic else real_mesh(s, calib, WONDERPROXY, CDN_CSV)
    if mesh is not None and args.trace is not None:
        return _replay(args, s, mesh, t0)
    if mesh is None:
        reason = f"no data at {WONDERPROXY} or {CDN_CSV} (the shared folder sits next to the repository)"
        print(f"mesh_sim: {reason}; skipped")
        common.write_json(args.json, {"benchmark": "mesh_sim", "skipped": reason, "date": common.now_iso()})
        return 0
    machine = common.machine_info()
    if args.failures_only:
        res: dict[str, Any] = {"benchmark": "mesh_sim", "settings": dataclasses.asdict(s), "mesh": mesh.info}
        _SHARED.update(arrivals=make_arrivals(mesh, s))
    else:
        results = simulate(mesh, s, jobs_for(variants=not args.no_variants), workers=max(1, args.workers))
        res = result_dict(mesh, s, results)
    if not args.no_failures:
        _failures(args, res, mesh, _SHARED["arrivals"], s, None)
    res.update({"quick": args.quick, "date": common.now_iso(), "machine": {**machine, "loadavg_1m_end": common.loadavg_1m()},
                "workers": args.workers, "elapsed_s": time.perf_counter() - t0})
    if not args.failures_only:
        print_results(res)
    if "failures" in res:
        print_failures(res["failures"])
    common.write_json(args.json, res)
    png = common.png_path(args.json)
    if not args.failures_only and write_png(png, {n: r[1] for n, r in results.items()}, s.slo_s):
        log.info("wrote %s and %s", args.json, png)
    return 0


def failures_png_path(json_path: Path, only: bool) -> Path:
    """Beside the JSON: its own PNG with --failures-only, else `<stem>_failures.png` (the other is the TTFT CDFs)."""
    return common.png_path(json_path) if only else json_path.with_name(json_path.stem + "_failures.png")


def _failures(args: Any, res: dict[str, Any], mesh: Mesh, arr: Arrivals, s: Settings, cache_blocks: int | None) -> None:
    """The failure rows (benchmarks/sim/failures.py) into res["failures"], and their PNG."""
    fail = simulate_failures(mesh, arr, s, workers=max(1, args.workers), cache_blocks=cache_blocks)
    res["failures"] = failure_result(s, fail)
    png = failures_png_path(args.json, args.failures_only)
    if write_failure_png(png, fail, s):
        log.info("wrote %s", png)


TRACE_CACHE_BLOCKS = 512  # 256 Ki tokens of KV cache per pool
TRACE_UTIL = 0.3
TRACE_QUICK_REQUESTS = 2000  # --quick: the trace's first requests


def _replay(args: Any, s: Settings, mesh: Mesh, t0: float) -> int:
    path: Path = args.trace
    if not path.is_file():
        print(f"mesh_sim: no trace at {path}; skipped")
        common.write_json(args.json, {"benchmark": "mesh_sim", "skipped": f"no trace at {path}", "date": common.now_iso()})
        return 0
    trace = load_trace(path, TRACE_QUICK_REQUESTS if args.quick else None)
    arr = trace_arrivals(mesh, s, trace)
    if args.failures_only:
        res: dict[str, Any] = {"benchmark": "mesh_sim", "trace": str(path), "settings": dataclasses.asdict(s),
                               "mesh": mesh.info}
    else:
        results = simulate_trace(mesh, arr, s, args.cache_blocks, workers=max(1, args.workers))
        res = trace_result(mesh, arr, s, args.cache_blocks, str(path), results)
    if not args.no_failures:
        _failures(args, res, mesh, arr, s, args.cache_blocks)
    res.update({"quick": args.quick, "date": common.now_iso(),
                "machine": {**common.machine_info(), "loadavg_1m_end": common.loadavg_1m()},
                "workers": args.workers, "elapsed_s": time.perf_counter() - t0})
    if not args.failures_only:
        print_trace(res)
    if "failures" in res:
        print_failures(res["failures"])
    common.write_json(args.json, res)
    if not args.failures_only and write_png(common.png_path(args.json), {n: r[1] for n, r in results.items()},
                                            s.slo_s, names=TRACE_POLICIES + tuple(TRACE_VARIANTS)):
        log.info("wrote %s", common.png_path(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
