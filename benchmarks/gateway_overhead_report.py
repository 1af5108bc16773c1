"""The gateway-overhead benchmark's results: per-target summary, goals, the printed tables, the PNG.

Split from benchmarks/gateway_overhead.py (which runs the targets); see its docstring for what is
measured and how.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks import common

MODES = ("nonstream", "stream")
MAX_ERROR_RATE = 0.01
LAT_KEYS = ("ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99")
GOAL = {"max_rps_nonstream": 7500.0, "added_p50_ms": 0.8, "added_p99_ms": 2.0}


# -- results --------------------------------------------------------------------------------
def summarize(raw: dict[str, Any] | None, note: str, installed: bool, meta: dict[str, Any]) -> dict[str, Any]:
    nan = math.nan
    out: dict[str, Any] = {
        "installed": installed, "note": note, **meta,
        "max_rps": {m: nan for m in MODES}, "error_rate": {m: nan for m in MODES},
        "added_ms": {m: {k: nan for k in LAT_KEYS} for m in MODES},
        "cpu_ms_per_req": {m: nan for m in MODES},
    }
    if raw is None:
        return out
    out["latency_ms"] = {}
    for mode in MODES:
        ol = raw["open_loop"].get(mode)
        if ol is not None:
            out["latency_ms"][mode] = {k: ol[f"{k}_ms"] for k in LAT_KEYS}
            out["added_ms"][mode] = ol["added_ms"]
            out["error_rate"][f"open_loop_{mode}"] = ol["error_rate"]
            out["cpu_ms_per_req"][f"open_loop_{mode}"] = ol["cpu_ms_per_req"]
        w = raw["wrk"].get(mode)
        if w is not None:
            out["max_rps"][mode] = w["rps"]
            out["error_rate"][mode] = w["error_rate"]
            out["cpu_ms_per_req"][mode] = w["cpu_ms_per_req"]
    out["runs"] = raw
    out["note"] = "; ".join(x for x in (note, *raw["skipped"].values(), *_warnings(raw)) if x)
    return out


def _warnings(raw: dict[str, Any]) -> list[str]:
    """What a reader must know to trust (or not) a target's figures."""
    warn = []
    for mode, ol in raw["open_loop"].items():
        if ol["error_rate"] > MAX_ERROR_RATE:
            top = max(ol["errors"], key=ol["errors"].get) if ol["errors"] else "?"
            warn.append(f"open loop {mode}: {100 * ol['error_rate']:.0f}% errors (mostly {top}): overloaded at "
                        f"{ol['rate']:g} req/s")
        if ol["lag_p99_ms"] > 20:
            warn.append(f"open loop {mode}: generator lag p99 {ol['lag_p99_ms']:.0f} ms")
    for mode, w in raw["wrk"].items():
        if not w["met_error_bound"]:
            warn.append(f"wrk {mode}: > 1% errors even at -c{w['connections']}")
        if w["stub_cpu_util"] > 0.8 and w["router_cpu_util"] != w["stub_cpu_util"]:
            warn.append(f"wrk {mode}: stub at {100 * w['stub_cpu_util']:.0f}% CPU, may limit")
    return warn


def goals(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """meshgate against the goal: max req/s non-streaming; added p50/p99 at the fixed rate (E2E for
    whole answers, TTFT for streams)."""
    a = m["added_ms"]
    items = {
        "max_rps_nonstream": (m["max_rps"]["nonstream"], f">= {GOAL['max_rps_nonstream']:,.0f}",
                              m["max_rps"]["nonstream"] >= GOAL["max_rps_nonstream"]),
        "added_e2e_p50_ms_nonstream": (a["nonstream"]["e2e_p50"], f"<= {GOAL['added_p50_ms']}",
                                       a["nonstream"]["e2e_p50"] <= GOAL["added_p50_ms"]),
        "added_e2e_p99_ms_nonstream": (a["nonstream"]["e2e_p99"], f"<= {GOAL['added_p99_ms']}",
                                       a["nonstream"]["e2e_p99"] <= GOAL["added_p99_ms"]),
        "added_ttft_p50_ms_stream": (a["stream"]["ttft_p50"], f"<= {GOAL['added_p50_ms']}",
                                     a["stream"]["ttft_p50"] <= GOAL["added_p50_ms"]),
        "added_ttft_p99_ms_stream": (a["stream"]["ttft_p99"], f"<= {GOAL['added_p99_ms']}",
                                     a["stream"]["ttft_p99"] <= GOAL["added_p99_ms"]),
    }
    return {k: {"value": v, "target": t, "met": bool(ok)} for k, (v, t, ok) in items.items()}


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def print_report(res: dict[str, Any]) -> None:
    p, mi = res["plan"], res["machine"]
    print(f"\nmachine: {mi['num_cpus']} CPUs ({mi['cpu']}) shared by the load generator (wrk or the Python open-loop "
          f"client), the router and the stub; load average {res['loadavg_start']:.2f} at start, "
          f"{mi['loadavg_1m']:.2f} at end (above ~1 means other work skewed these numbers).")
    print(f"goal: >= {GOAL['max_rps_nonstream']:,.0f} req/s non-streaming max; added p50 <= {GOAL['added_p50_ms']} ms "
          f"and p99 <= {GOAL['added_p99_ms']} ms at {p['rate']:g} req/s")
    rows = []
    for name, t in res["targets"].items():
        w = t.get("runs", {}).get("wrk", {}).get("nonstream", {})
        cpu = t["cpu_ms_per_req"]["nonstream"]
        rows.append([name, t["max_rps"]["nonstream"], _pct(t["error_rate"]["nonstream"]), t["max_rps"]["stream"],
                     _pct(t["error_rate"]["stream"]), cpu, t["cpu_ms_per_req"]["stream"],
                     1e3 / cpu if cpu > 0 else math.nan, _pct(w.get("router_cpu_util", math.nan)),
                     _pct(w.get("stub_cpu_util", math.nan)), t["note"] or "ok"])
    common.print_table(
        f"max throughput: wrk -t1 -c{p['wrk_connections']}, {p['wrk_s']:g} s per mode, <= 1% errors "
        f"(stream: {p['tokens']} chunks). CPU = the router's process tree per request served; req/s/core = "
        "1000 / CPU ms (what one dedicated core would serve); router/stub CPU = their share of one core "
        "during the non-stream run",
        ["target", "req/s", "err", "req/s stream", "err", "CPU ms/req", "CPU ms/req stream", "req/s/core",
         "router CPU", "stub CPU", "note"], rows)
    rows = []
    for name, t in res["targets"].items():
        if "latency_ms" not in t:
            continue
        for mode in MODES:
            a, lat = t["added_ms"][mode], t["latency_ms"].get(mode)
            if lat is None:
                continue
            ol = t["runs"]["open_loop"][mode]
            base = ol.get("baseline")
            rows.append([f"{name} {mode}", a["ttft_p50"], a["ttft_p99"], a["e2e_p50"], a["e2e_p99"],
                         lat["e2e_p50"], lat["e2e_p99"],
                         f"{base['e2e_p50_ms']:.3g} / {base['e2e_p99_ms']:.3g}" if base else "-",
                         _pct(ol["error_rate"]), ol["cpu_ms_per_req"], ol["lag_p99_ms"]])
    common.print_table(
        f"added latency vs direct (ms) at {p['rate']:g} req/s open loop, {p['open_loop_s']:g} s per mode "
        "(paired: the stub gets the same rate directly, interleaved, in the same run)",
        ["target mode", "+TTFT p50", "+TTFT p99", "+E2E p50", "+E2E p99", "E2E p50", "E2E p99",
         "direct E2E p50/p99", "err", "CPU ms/req", "gen lag p99"], rows)
    if "goals" in res:
        common.print_table(f"{res.get('goals_target', 'meshgate')} vs the goal", ["goal", "value", "target", "met"],
                           [[k, g["value"], g["target"], g["met"]] for k, g in res["goals"].items()])


def plot(res: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    names = [n for n, t in res["targets"].items() if "latency_ms" in t]
    if not names:
        return
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.6))
    x = range(len(names))
    width = 0.38
    for i, (mode, color) in enumerate((("nonstream", "tab:blue"), ("stream", "tab:orange"))):
        ys = [res["targets"][n]["max_rps"][mode] for n in names]
        bars = axes[0].bar([j + (i - 0.5) * width for j in x], [0 if math.isnan(y) else y for y in ys], width,
                           label=mode, color=color)
        axes[0].bar_label(bars, fmt="%.0f", fontsize=8)
    axes[0].axhline(GOAL["max_rps_nonstream"], color="gray", ls="--", lw=1, label="goal (non-stream)")
    axes[0].set_xticks(list(x), names)
    axes[0].set_yscale("log")  # the stub alone and LiteLLM are three orders of magnitude apart
    axes[0].set_ylabel("req/s at <= 1% errors (log)")
    axes[0].set_title(f"max throughput (wrk -c{res['plan']['wrk_connections']})")
    axes[0].legend(fontsize=8)
    routed = [n for n in names if n != "direct"]
    series = [("nonstream", "e2e_p50", "non-stream E2E p50"), ("nonstream", "e2e_p99", "non-stream E2E p99"),
              ("stream", "ttft_p50", "stream TTFT p50"), ("stream", "ttft_p99", "stream TTFT p99")]
    w = 0.8 / len(series)
    for i, (mode, key, label) in enumerate(series):
        ys = [res["targets"][n]["added_ms"][mode][key] for n in routed]
        bars = axes[1].bar([j + (i - 1.5) * w for j in range(len(routed))], [0 if math.isnan(y) else y for y in ys],
                           w, label=label)
        axes[1].bar_label(bars, labels=["n/a" if math.isnan(y) else f"{y:.2f}" for y in ys], fontsize=7)
    axes[1].axhline(GOAL["added_p50_ms"], color="gray", ls="--", lw=1, label="goal p50")
    axes[1].axhline(GOAL["added_p99_ms"], color="black", ls=":", lw=1, label="goal p99")
    axes[1].set_xticks(list(range(len(routed))), routed)
    axes[1].set_yscale("symlog", linthresh=1)
    top = max([1.0] + [v for n in routed for m in MODES for v in res["targets"][n]["added_ms"][m].values()
                       if not math.isnan(v)])
    axes[1].set_ylim(min(0.0, axes[1].get_ylim()[0]), top * 4)  # room for the legend above the bars
    axes[1].set_ylabel("added ms vs direct (symlog)")
    axes[1].set_title(f"added latency at {res['plan']['rate']:g} req/s (open loop, paired baseline)")
    axes[1].legend(fontsize=7, ncol=3, loc="upper left")
    mi = res["machine"]
    fig.suptitle(f"router overhead, stub upstream, {mi['num_cpus']} CPUs shared by generator, router and stub "
                 f"({mi['cpu']}, load avg {mi['loadavg_1m']:.1f}, {res['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
