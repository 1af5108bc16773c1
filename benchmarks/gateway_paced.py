"""Paced streaming rows of benchmarks.gateway_overhead: what a router costs per relayed token.

    python -m benchmarks.gateway_overhead --paced [--paced-only] [--quick]

A second stub (benchmarks/stub_upstream.py --itl-ms 20 --tokens 64) writes one SSE event per token,
one write each, 20 ms apart: a stream lasts ~1.3 s, as a pool decoding at 50 tokens/s. For each
concurrency level (100, 300, 1,000 streams open at once) and each target (direct, meshgate with 1
and 2 processes, meshgate-baseline: another checkout given by --baseline-tree, vllm-router, smg), benchmarks/paced_client.py (its own process) keeps that many
streams open for the run and reports, per target:

  * CPU µs per chunk: the router's process tree CPU over the run / SSE events its clients received,
  * chunks/s received, TTFT p50/p99, inter-chunk gap p50/p99/p99.9 (gaps between successive events
    of one stream, as a user sees the text arrive), errors,
  * where the level is at most --pair-max streams: each request's twin sent straight to the stub at
    the same moment, so added TTFT is per request (router minus twin), and the twins' TTFT and gap
    percentiles are the direct figures of the same moments; above it (the client and stub would need
    twice the CPU) the row is compared with the `direct` row of the same run.

Every process shares the machine's CPUs; at 1,000 streams (50,000 events/s) on 2 cores the client
and stub alone need most of them, which the `direct` row shows.
"""
from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from benchmarks import common
from benchmarks.routers import (
    CHAT_PATH,
    MODEL,
    REPO,
    Proc,
    StartError,
    Target,
    start_meshgate,
    start_peer,
    start_stub,
)

log = logging.getLogger("meshgate.bench")

PACED_TARGETS = ("direct", "meshgate", "meshgate-workers", "meshgate-baseline", "vllm-router", "smg")
# Goals of issue 15 (judged in the same run).
GOAL_TTFT_P99_VS_DIRECT = 1.5
GOAL_ADDED_GAP_P99_MS = 1.0


@dataclass(frozen=True, slots=True)
class PacedPlan:
    levels: tuple[int, ...] = (100, 300, 1000)
    tokens: int = 64
    itl_ms: float = 20.0
    duration_s: float = 15.0
    warmup_s: float = 2.0
    pair_max: int = 300  # pair each request with a direct twin up to this many streams
    timeout_s: float = 30.0


PACED_FULL = PacedPlan()
PACED_QUICK = replace(PACED_FULL, levels=(100,), duration_s=4.0, warmup_s=1.5)


def start_paced_stub(workdir: Path, plan: PacedPlan) -> tuple[Proc, str]:
    return start_stub(workdir, plan.tokens, extra=("--itl-ms", str(plan.itl_ms)), name="paced-stub")


def _level(plan: PacedPlan, t: Target, stub: Proc, stub_url: str, streams: int, workdir: Path) -> dict[str, Any]:
    out = workdir / f"paced-{t.name}-{streams}.json"
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
                         "max_tokens": plan.tokens, "stream": True}).decode()
    argv = [sys.executable, "-m", "benchmarks.paced_client", "--url", t.url + CHAT_PATH, "--streams", str(streams),
            "--duration", str(plan.duration_s), "--warmup", str(plan.warmup_s), "--timeout", str(plan.timeout_s),
            "--body", body, "--out", str(out)]
    paired = t.proc is not None and streams <= plan.pair_max
    if paired:
        argv += ["--pair-url", stub_url + CHAT_PATH]
    router = t.proc or stub
    t0, c0, s0 = time.perf_counter(), router.cpu_s(), stub.cpu_s()
    r = subprocess.run(argv, check=False, cwd=REPO, capture_output=True, text=True,
                       timeout=plan.warmup_s + plan.duration_s + 2 * plan.timeout_s + 60)
    wall, cpu, stub_cpu = time.perf_counter() - t0, router.cpu_s() - c0, stub.cpu_s() - s0
    if r.returncode != 0:
        raise RuntimeError(f"paced client failed: {r.stderr.strip()[-300:]}")
    d = orjson.loads(out.read_bytes())
    tgt = d["target"]
    res: dict[str, Any] = {
        "streams": streams, "paired": paired, **tgt,
        "cpu_us_per_chunk": 1e6 * cpu / tgt["events"] if tgt["events"] else math.nan,
        "router_cpu_util": cpu / wall, "stub_cpu_util": stub_cpu / wall, "wall_s": wall,
    }
    if paired:
        res["twin"] = d["twin"]
        res["added_ttft_ms"] = d["added_ttft_ms"]
        res["added_ttft_pairs"] = d["added_ttft_pairs"]
    return res


def run_paced(plan: PacedPlan, names: list[str], workdir: Path, peers: bool,
              baseline_tree: Path | None = None) -> dict[str, Any]:
    """Every target at every level; a target that fails to start is noted with the reason."""
    stub, stub_url = start_paced_stub(workdir, plan)
    rows: dict[str, dict[str, Any]] = {}
    notes: dict[str, str] = {}
    try:
        for name in names:
            if name not in PACED_TARGETS:
                continue
            if name in ("vllm-router", "smg") and not peers:
                notes[name] = "skipped (--quick)"
                continue
            target: Target | None = None
            try:
                if name == "direct":
                    target = Target("direct", None, stub_url, "stub", "python -m benchmarks.stub_upstream")
                elif name == "meshgate-baseline":
                    if baseline_tree is None:
                        notes[name] = "no --baseline-tree"
                        continue
                    target = start_meshgate(workdir, stub_url, None, "WARNING", tree=baseline_tree)
                elif name.startswith("meshgate"):
                    workers = (os.cpu_count() or 1) if name == "meshgate-workers" else 1
                    target = start_meshgate(workdir, stub_url, None, "WARNING", workers)
                else:
                    target = start_peer(name, workdir, stub_url)
                rows[name] = {}
                for n in plan.levels:
                    log.info("paced: %s, %d streams", name, n)
                    rows[name][str(n)] = _level(plan, target, stub, stub_url, n, workdir)
            except FileNotFoundError as e:
                notes[name] = f"not installed: {e}"
            except StartError as e:
                notes[name] = f"failed to start: {e}"
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                notes[name] = f"run failed: {e}"
            finally:
                if target is not None:
                    target.stop()
    finally:
        stub.stop()
    return {"plan": {"levels": list(plan.levels), "tokens": plan.tokens, "itl_ms": plan.itl_ms,
                     "duration_s": plan.duration_s, "warmup_s": plan.warmup_s, "pair_max": plan.pair_max},
            "rows": rows, "notes": notes, "goals": paced_goals(rows)}


def _direct(rows: dict[str, dict[str, Any]], row: dict[str, Any], level: str) -> tuple[dict[str, Any] | None, str]:
    """The direct figures to compare a row with: its paired twins, else the direct row."""
    if row.get("paired"):
        return row["twin"], "paired twins"
    d = rows.get("direct", {}).get(level)
    return d, "direct row"


def paced_goals(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Issue 15's goals for meshgate (one process), against the baselines they name."""
    out: dict[str, dict[str, Any]] = {}
    mg = rows.get("meshgate", {})
    vr = rows.get("vllm-router", {})
    for level in ("100", "300"):
        if level in mg and level in vr:
            a, b = mg[level]["cpu_us_per_chunk"], vr[level]["cpu_us_per_chunk"]
            out[f"cpu_per_chunk_vs_vllm_router_{level}"] = common.goal(a, f"<= vllm-router's {b:.1f} us", a <= b)
    for level in ("300", "1000"):
        row = mg.get(level)
        if row is None:
            continue
        d, what = _direct(rows, row, level)
        if d is None:
            continue
        ratio = row["ttft_ms"]["p99"] / d["ttft_ms"]["p99"]
        errs = sum(row["errors"].values())
        out[f"ttft_p99_vs_direct_{level}"] = common.goal(
            ratio, f"<= {GOAL_TTFT_P99_VS_DIRECT}x {what} ({d['ttft_ms']['p99']:.1f} ms), 0 errors ({errs})",
            ratio <= GOAL_TTFT_P99_VS_DIRECT and errs == 0)
    row = mg.get("300")
    if row is not None:
        d, what = _direct(rows, row, "300")
        if d is not None:
            added = row["gap_ms"]["p99"] - d["gap_ms"]["p99"]
            out["added_gap_p99_ms_300"] = common.goal(added, f"<= {GOAL_ADDED_GAP_P99_MS} ms over {what}",
                                                      added <= GOAL_ADDED_GAP_P99_MS)
    return out


def request_goals(targets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Issue 15's goals on the request rows: meshgate's non-stream figures no worse than the
    baseline checkout's in the same run (--baseline-tree); stretch: CPU per non-stream request
    within 1.5x of vllm-router's."""
    out: dict[str, dict[str, Any]] = {}
    mg, base, vr = targets.get("meshgate", {}), targets.get("meshgate-baseline", {}), targets.get("vllm-router", {})
    if "latency_ms" in mg and "latency_ms" in base:
        a, b = mg["max_rps"]["nonstream"], base["max_rps"]["nonstream"]
        out["max_rps_nonstream_vs_baseline"] = common.goal(a / b, f">= 1x the baseline's {b:,.0f} req/s", a >= b)
        for k in ("e2e_p50", "e2e_p99"):
            a, b = mg["added_ms"]["nonstream"][k], base["added_ms"]["nonstream"][k]
            out[f"added_{k}_ms_nonstream_vs_baseline"] = common.goal(a, f"<= the baseline's {b:.2f} ms", a <= b)
    if "latency_ms" in mg and "latency_ms" in vr:
        a, b = mg["cpu_ms_per_req"]["nonstream"], vr["cpu_ms_per_req"]["nonstream"]
        out["stretch_cpu_per_request_vs_vllm_router"] = common.goal(a / b, f"<= 1.5x vllm-router's {b:.3f} ms",
                                                                    a <= 1.5 * b)
    return out


def print_paced(res: dict[str, Any]) -> None:
    p = res["plan"]
    rows = []
    for name, levels in res["rows"].items():
        for level, r in levels.items():
            d, what = _direct(res["rows"], r, level) if name != "direct" else (None, "")
            added = r.get("added_ttft_ms", {})
            rows.append([name, int(level), r["cpu_us_per_chunk"], r["chunks_per_s"],
                         f"{r['ttft_ms']['p50']:.1f} / {r['ttft_ms']['p99']:.1f}",
                         f"{d['ttft_ms']['p50']:.1f} / {d['ttft_ms']['p99']:.1f}" if d else "-",
                         f"{added['p50']:+.2f} / {added['p99']:+.2f}" if added else "-",
                         f"{r['gap_ms']['p99']:.2f} / {r['gap_ms']['p99.9']:.2f}",
                         f"{d['gap_ms']['p99']:.2f} / {d['gap_ms']['p99.9']:.2f}" if d else "-",
                         sum(r["errors"].values()), f"{100 * r['router_cpu_util']:.0f}%", what])
    common.print_table(
        f"paced streams: {p['tokens']} tokens {p['itl_ms']:g} ms apart, one write each; {p['duration_s']:g} s "
        f"measured per level after {p['warmup_s']:g} s; CPU = the router's process tree per event received "
        f"(direct: the stub's); 'direct' columns = paired twins (<= {p['pair_max']} streams) else the direct row",
        ["target", "streams", "CPU us/chunk", "chunks/s", "TTFT p50/p99 ms", "direct TTFT", "+TTFT p50/p99 (paired)",
         "gap p99/p99.9 ms", "direct gap", "errors", "router CPU", "vs"], rows)
    for name, note in res["notes"].items():
        print(f"  {name}: {note}")
    if res["goals"]:
        common.print_goals(res["goals"], "paced streams: meshgate (1 process) vs issue 15's goals")


def plot_paced(res: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    if plt is None or not res["rows"]:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    levels = [str(n) for n in res["plan"]["levels"]]
    names = list(res["rows"])
    w = 0.8 / max(len(names), 1)
    panels = (("cpu_us_per_chunk", None, "CPU µs per relayed chunk"), ("ttft_ms", "p99", "TTFT p99 ms (log)"),
              ("gap_ms", "p99", "inter-chunk gap p99 ms"))
    for ax, (key, sub, title) in zip(axes, panels):
        for i, name in enumerate(names):
            ys = []
            for lv in levels:
                r = res["rows"][name].get(lv)
                v = (r[key] if sub is None else r[key][sub]) if r else math.nan
                ys.append(0 if math.isnan(v) else v)
            bars = ax.bar([j + (i - (len(names) - 1) / 2) * w for j in range(len(levels))], ys, w, label=name)
            ax.bar_label(bars, fmt="%.3g", fontsize=6)
        ax.set_xticks(range(len(levels)), [f"{lv} streams" for lv in levels])
        ax.set_title(title)
        if key == "ttft_ms":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    p = res["plan"]
    fig.suptitle(f"paced streams ({p['tokens']} tokens, {p['itl_ms']:g} ms apart), all processes on "
                 f"{common.num_cpus()} shared CPUs, {common.now_iso()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
