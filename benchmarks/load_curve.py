"""Throughput and latency against offered load: meshgate in front of the stub upstream.

    python -m benchmarks.load_curve [--quick] [--json PATH] [--workers N]

An open-loop sweep (benchmarks/openloop.py) at rising request rates, non-streaming, the stub
itself interleaved at the same rate as the paired baseline (as in gateway_overhead). For each
rate: achieved req/s, errors, and meshgate's E2E p50/p99 against the stub's. The knee of the
curve is where meshgate stops keeping up (the machine's 2 CPUs also run generator and stub).
--workers: gateway processes (`serve --workers`; default 1).
"""
from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import Progress
from benchmarks.gateway_overhead import FULL, Bench
from benchmarks.routers import start_meshgate, start_stub

RATES_FULL = (100, 250, 500, 1000, 1500, 2000, 2500, 3000)
RATES_QUICK = (100, 500, 1500)


def sweep(rates: tuple[int, ...], seconds: float, workers: int = 1) -> list[dict[str, Any]]:
    plan = replace(FULL, open_loop_s=seconds, peers=False)
    points = []
    with tempfile.TemporaryDirectory(prefix="meshgate-load-") as tmp:
        workdir = Path(tmp)
        stub, stub_url = start_stub(workdir, plan.tokens)
        target = None
        try:
            target = start_meshgate(workdir, stub_url, workers=workers)
            with Progress(len(rates), "load curve", unit="rate") as bar:
                bench = Bench(plan, workdir, stub, stub_url, bar)
                for rate in rates:
                    bench.plan = replace(plan, rate=float(rate))
                    r = bench.open_loop(target, "nonstream")
                    points.append({"offered_rps": rate, "achieved_rps": r["num_ok"] / seconds,
                                   "error_rate": r["error_rate"], "e2e_p50_ms": r["e2e_p50_ms"],
                                   "e2e_p99_ms": r["e2e_p99_ms"], "baseline_e2e_p50_ms": r["baseline"]["e2e_p50_ms"],
                                   "baseline_e2e_p99_ms": r["baseline"]["e2e_p99_ms"],
                                   "cpu_ms_per_req": r["cpu_ms_per_req"]})
                    bench.settle()
                    bar.update()
        finally:
            if target is not None:
                target.stop()
            stub.stop()
    return points


def plot(points: list[dict[str, Any]], path: Path) -> None:
    plt = common.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = [p["offered_rps"] for p in points]
    a.plot(x, [p["achieved_rps"] for p in points], "o-", label="meshgate achieved")
    a.plot(x, x, ":", color="gray", label="offered")
    a.set(xlabel="offered req/s (open loop)", ylabel="completed req/s", title="throughput vs offered load")
    for key, style, label in (("e2e_p50_ms", "o-", "meshgate p50"), ("e2e_p99_ms", "o--", "meshgate p99"),
                              ("baseline_e2e_p50_ms", "s-", "stub direct p50"),
                              ("baseline_e2e_p99_ms", "s--", "stub direct p99")):
        b.plot(x, [p[key] for p in points], style, label=label)
    b.set(xlabel="offered req/s (open loop)", ylabel="E2E latency ms (log)", yscale="log",
          title="latency vs offered load (non-streaming)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.arg_parser("load_curve", __doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=1, help="gateway processes (serve --workers)")
    args = p.parse_args(argv)
    common.setup_logging()
    machine = common.machine_info()
    rates, seconds = (RATES_QUICK, 3.0) if args.quick else (RATES_FULL, 6.0)
    points = sweep(rates, seconds, args.workers)
    common.print_table(
        "meshgate vs offered load (non-streaming, open loop; the stub direct as paired baseline)",
        ["offered req/s", "achieved req/s", "errors", "E2E p50 ms", "E2E p99 ms", "stub p50 ms", "stub p99 ms",
         "CPU ms/req"],
        [[p["offered_rps"], p["achieved_rps"], f"{100 * p['error_rate']:.1f}%", p["e2e_p50_ms"], p["e2e_p99_ms"],
          p["baseline_e2e_p50_ms"], p["baseline_e2e_p99_ms"], p["cpu_ms_per_req"]] for p in points])
    res = {"benchmark": "load_curve", "machine": machine, "date": common.now_iso(), "quick": bool(args.quick),
           "seconds_per_rate": seconds, "workers": args.workers, "points": points}
    out = common.write_json(args.json, res)
    png = common.png_path(out)
    plot(points, png)
    print(f"\nwrote {out} and {png}")
    return res


if __name__ == "__main__":
    main()
