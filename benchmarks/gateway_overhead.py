"""Gateway overhead: what a router in front of a pool costs, meshgate beside peer routers.

    python -m benchmarks.gateway_overhead [--quick] [--json PATH] [--targets a,b] [--install-peers]
                                          [--profile cprofile|py-spy] [--paced [--paced-only]]

--paced adds the paced streaming rows (benchmarks/gateway_paced.py: one SSE write per token, 20 ms
apart, 100/300/1,000 streams open at once; CPU per relayed chunk, TTFT, inter-chunk gaps);
--paced-only runs only those.

One fast stub upstream (benchmarks/stub_upstream.py, its own process: answers at once, a whole JSON
answer or an SSE stream of --tokens chunks) stands for the pool. Targets, measured one after another
in the same run against that stub:

  direct       the stub itself (the stub alone: what every router is compared with),
  meshgate     `python -m gateway serve` with the stub as its only pool (routing least-load),
  vllm-router  PyPI `vllm-router` (Rust), the stub as its single worker, policy round_robin,
  smg          PyPI `smg` (Shepherd Model Gateway, Rust), `smg launch`, same,
  litellm      PyPI `litellm[proxy]`, one uvicorn worker, the stub as an openai/ model.

Peers live in venvs under /tmp (benchmarks/routers.py; --install-peers makes them, from PyPI); a peer
that is missing or does not start is reported with the reason, not measured. --quick skips peers.

Per target and per mode (non-streaming, streaming):
  * max req/s: `wrk -t1 -c32` for 10 s, at <= 1% errors (32 connections, else 16, else 8),
  * added latency: an open-loop generator (benchmarks/openloop.py, its own process) sends 200 req/s
    to the router on a fixed schedule and, interleaved, 200 req/s straight to the stub (the paired
    baseline: same moments, same noise); TTFT (first body bytes / first SSE event) and E2E
    percentiles through the router minus the same percentiles of the direct requests. Skipped, with
    a note, for a target whose max req/s is below the rate (its queue would only grow),
  * CPU per request: utime+stime of the router's process tree (/proc) over the wrk run, divided by
    the requests it served (also over the open-loop run, at the fixed rate).
The stub's own CPU share in every run is recorded to show it is not the bottleneck. After each run
the benchmark waits until the stub sees no more requests (an overloaded router drains its backlog)
before the next one starts.

All processes share the machine's CPUs (2 on the reference machine: generator, router and stub
together), everything talks over 127.0.0.1, and every run is bounded in requests and time.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from benchmarks import common, gateway_paced, profiles, routers
from benchmarks.common import Progress, percentile
from benchmarks.gateway_overhead_report import LAT_KEYS, MAX_ERROR_RATE, MODES, goals, plot, print_report, summarize
from benchmarks.routers import (
    CHAT_PATH,
    MODEL,
    PEER_PACKAGES,
    REPO,
    Proc,
    StartError,
    Target,
    http,
    install_peers,
    peer_executable,
    start_meshgate,
    start_peer,
    start_stub,
)

log = logging.getLogger("meshgate.bench")

PEERS = ("vllm-router", "smg", "litellm")
OURS = ("meshgate", "meshgate-workers")  # one gateway process; one per CPU (`serve --workers`)
BASELINE = "meshgate-baseline"  # --baseline-tree: another checkout, one process (before/after in one run)
ALL_TARGETS = ("direct", *OURS, BASELINE, *PEERS)
BASELINE_TREE: Path | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    rate: float = 200.0  # open-loop requests/s
    open_loop_s: float = 15.0  # per mode
    wrk_s: float = 10.0  # per mode
    wrk_connections: int = 32
    warmup_s: float = 1.0  # wrk before a target's measurements (connections, caches)
    tokens: int = 16  # streamed chunks per answer (and max_tokens of the requests)
    request_timeout_s: float = 10.0
    peers: bool = True


FULL = Plan()
QUICK = replace(FULL, open_loop_s=4.0, wrk_s=3.0, peers=False)


def request_body(stream: bool, tokens: int) -> bytes:
    return orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
                         "max_tokens": tokens, "stream": stream})


# -- runs -----------------------------------------------------------------------------------
class Bench:
    def __init__(self, plan: Plan, workdir: Path, stub: Proc, stub_url: str, bar: Progress):
        self.plan = plan
        self.workdir = workdir
        self.stub = stub
        self.stub_url = stub_url
        self.bar = bar

    def _stub_generated(self) -> int:
        try:
            return int(orjson.loads(http("GET", self.stub_url + "/stub/stats")[1])["generate"])
        except (OSError, ValueError, KeyError):
            return -1

    def _window(self, t: Target) -> dict[str, float]:
        router = t.proc or self.stub
        return {"t": time.perf_counter(), "router_cpu": router.cpu_s(), "stub_cpu": self.stub.cpu_s(),
                "upstream": self._stub_generated()}

    def _close(self, t: Target, w0: dict[str, float], served: int) -> dict[str, Any]:
        w1 = self._window(t)
        wall = w1["t"] - w0["t"]
        up = w1["upstream"] - w0["upstream"] if min(w0["upstream"], w1["upstream"]) >= 0 else math.nan
        return {
            "cpu_ms_per_req": 1e3 * (w1["router_cpu"] - w0["router_cpu"]) / served if served else math.nan,
            "router_cpu_util": (w1["router_cpu"] - w0["router_cpu"]) / wall,
            "stub_cpu_util": (w1["stub_cpu"] - w0["stub_cpu"]) / wall,
            "upstream_requests": up,
            "wall_s": wall,
        }

    def settle(self, quiet_s: float = 0.5, max_s: float = 15.0) -> None:
        """Until the stub has seen no request for quiet_s (an overloaded router drains its backlog)."""
        deadline = time.monotonic() + max_s
        last = self._stub_generated()
        while time.monotonic() < deadline:
            time.sleep(quiet_s)
            now = self._stub_generated()
            if now == last:
                return
            last = now
        log.warning("the stub still receives requests %.0f s after the run", max_s)

    def open_loop(self, t: Target, mode: str) -> dict[str, Any]:
        """The target at the plan's rate with the stub itself interleaved as the paired baseline."""
        p = self.plan
        out = self.workdir / f"openloop-{t.name}-{mode}.json"
        body = request_body(mode == "stream", p.tokens).decode()
        argv = [sys.executable, "-m", "benchmarks.openloop", "--url", t.url + CHAT_PATH, "--rate", str(p.rate),
                "--duration", str(p.open_loop_s), "--timeout", str(p.request_timeout_s), "--body", body,
                "--out", str(out)]
        paired = t.proc is not None
        if paired:
            argv += ["--url", self.stub_url + CHAT_PATH]
        if mode == "stream":
            argv.append("--stream")
        w0 = self._window(t)
        r = subprocess.run(argv, check=False, cwd=REPO, capture_output=True, text=True,
                           timeout=p.open_loop_s + 2 * p.request_timeout_s + 60)
        if r.returncode != 0:
            raise RuntimeError(f"open-loop generator failed: {r.stderr.strip()[-300:]}")
        d = orjson.loads(out.read_bytes())
        target = d["runs"][0]
        res = {"rate": p.rate, **_latency(target, d["send_s"]),
               **self._close(t, w0, target["num_ok"] + target["num_warmup"])}
        if paired:
            base = _latency(d["runs"][1], d["send_s"])
            res["baseline"] = base
            res["added_ms"] = {k: res[f"{k}_ms"] - base[f"{k}_ms"] for k in LAT_KEYS}
        else:
            res["added_ms"] = {k: 0.0 for k in LAT_KEYS}
        return res

    def wrk(self, t: Target, mode: str, connections: int, duration_s: float) -> dict[str, Any]:
        lua = self.workdir / f"wrk-{mode}.lua"
        lua.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = [[{request_body(mode == 'stream', self.plan.tokens).decode()}]]\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            "done = function(summary, latency, requests)\n"
            "  local e = summary.errors\n"
            '  io.write(string.format("WRKJSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"connect\\":%d,'
            '\\"read\\":%d,\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d}\\n",'
            " summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,"
            " latency:percentile(50), latency:percentile(99)))\n"
            "end\n"
        )
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--timeout", "5s",
                "-s", str(lua), t.url + CHAT_PATH]
        w0 = self._window(t)
        r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=duration_s + 60)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no summary (rc {r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}")
        d = orjson.loads(line[len("WRKJSON "):])
        ok = d["requests"] - d["status"]
        win = self._close(t, w0, ok)
        errors = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
        secs = d["duration_us"] / 1e6
        return {
            "connections": connections, "duration_s": secs, "requests": d["requests"], "ok": ok,
            "rps": ok / secs if secs > 0 else 0.0,
            "error_rate": errors / d["requests"] if d["requests"] else 1.0, "errors": {k: d[k] for k in
                                                                    ("connect", "read", "write", "status", "timeout")},
            "latency_p50_ms": d["p50_us"] / 1e3, "latency_p99_ms": d["p99_us"] / 1e3,
            **win,
        }

    def max_rps(self, t: Target, mode: str) -> dict[str, Any]:
        """wrk at the plan's connections; at more than 1% errors, again at half and a quarter."""
        tries = []
        for c in (self.plan.wrk_connections, self.plan.wrk_connections // 2, self.plan.wrk_connections // 4):
            res = self.wrk(t, mode, max(c, 1), self.plan.wrk_s)
            tries.append(res)
            if res["error_rate"] <= MAX_ERROR_RATE:
                break
        ok = [r for r in tries if r["error_rate"] <= MAX_ERROR_RATE]
        best = max(ok, key=lambda r: r["rps"]) if ok else tries[-1]
        return {**best, "met_error_bound": bool(ok), "tries": [
            {k: r[k] for k in ("connections", "rps", "error_rate")} for r in tries]}

    def measure(self, t: Target) -> dict[str, Any]:
        """wrk (max req/s) first, then the open loop: an overloaded target's backlog then cannot
        spoil the throughput runs, and the open loop is skipped where the target cannot keep up."""
        res: dict[str, Any] = {"open_loop": {}, "wrk": {}, "skipped": {}}
        self.wrk(t, "nonstream", self.plan.wrk_connections, self.plan.warmup_s)
        self.settle()
        for mode in MODES:
            log.info("%s: wrk -c%d, %s", t.name, self.plan.wrk_connections, mode)
            res["wrk"][mode] = self.max_rps(t, mode)
            self.settle()
            self.bar.update()
        for mode in MODES:
            top = res["wrk"][mode]["rps"]
            if top < self.plan.rate:
                res["skipped"][mode] = f"no open loop {mode}: max {top:.0f} < {self.plan.rate:g} req/s"
            else:
                log.info("%s: open loop at %g req/s, %s", t.name, self.plan.rate, mode)
                res["open_loop"][mode] = self.open_loop(t, mode)
                self.settle()
            self.bar.update()
        return res


def _latency(run: dict[str, Any], send_s: float) -> dict[str, Any]:
    """Percentiles (ms) and error counts of one URL's requests in an open-loop run."""
    ms = {k: [1e3 * x for x in run[k]] for k in ("ttft_s", "e2e_s", "lag_s")}
    return {
        "num_sent": run["num_sent"], "num_ok": run["num_ok"], "num_warmup": run["num_warmup"], "errors": run["errors"],
        "error_rate": sum(run["errors"].values()) / max(run["num_sent"], 1),
        "achieved_rps": run["num_sent"] / send_s if send_s > 0 else math.nan,
        "ttft_p50_ms": percentile(ms["ttft_s"], 50), "ttft_p99_ms": percentile(ms["ttft_s"], 99),
        "e2e_p50_ms": percentile(ms["e2e_s"], 50), "e2e_p99_ms": percentile(ms["e2e_s"], 99),
        "e2e_mean_ms": sum(ms["e2e_s"]) / len(ms["e2e_s"]) if ms["e2e_s"] else math.nan,
        "lag_p50_ms": percentile(ms["lag_s"], 50), "lag_p99_ms": percentile(ms["lag_s"], 99),
    }


# -- main -----------------------------------------------------------------------------------
def run_targets(plan: Plan, names: list[str], workdir: Path, profile: str | None,
                meshgate_log_level: str = "WARNING") -> dict[str, Any]:
    stub, stub_url = start_stub(workdir, plan.tokens)
    raw: dict[str, Any] = {}
    notes: dict[str, str] = {}
    meta: dict[str, dict[str, Any]] = {}
    measured = [n for n in names if n in ("direct", *OURS, BASELINE) or plan.peers]
    total = 4 * len(measured)
    try:
        with Progress(total, "gateway overhead", unit="run") as bar:
            bench = Bench(plan, workdir, stub, stub_url, bar)
            for name in names:
                if name not in measured:
                    notes[name] = "skipped (--quick)"
                    continue
                target: Target | None = None
                n0 = bar.n
                try:
                    if name == "direct":
                        target = Target("direct", None, stub_url, "stub", "python -m benchmarks.stub_upstream")
                    elif name == BASELINE:
                        target = start_meshgate(workdir, stub_url, None, meshgate_log_level, tree=BASELINE_TREE)
                    elif name in OURS:
                        workers = (os.cpu_count() or 1) if name == "meshgate-workers" else 1
                        target = start_meshgate(workdir, stub_url, profile, meshgate_log_level, workers)
                    else:
                        target = start_peer(name, workdir, stub_url)
                    meta[name] = {"version": target.version, "command": target.command}
                    raw[name] = bench.measure(target)
                except FileNotFoundError as e:
                    notes[name] = f"not installed: {e}"
                except StartError as e:
                    notes[name] = f"failed to start: {e}"
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    notes[name] = f"run failed: {e}"
                finally:
                    if target is not None:
                        target.stop()
                    bar.update(max(0, n0 + 4 - bar.n))  # a target that failed early: its runs count as done
                    bench.settle()  # a stopped router's leftovers reach no one now, but be sure
    finally:
        stub.stop()
    return {"raw": raw, "notes": notes, "meta": meta}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.arg_parser("gateway_overhead", __doc__.split("\n")[0])
    p.add_argument("--targets", default=",".join(ALL_TARGETS), help=f"comma-separated, of {','.join(ALL_TARGETS)}")
    p.add_argument("--install-peers", action="store_true",
                   help="first pip-install the peer routers into their venvs (needs PyPI)")
    p.add_argument("--peers-venv", type=Path, default=routers.PEERS_VENV,
                   help=f"venv with vllm-router, smg and py-spy (default {routers.PEERS_VENV})")
    p.add_argument("--litellm-venv", type=Path, default=routers.LITELLM_VENV,
                   help=f"venv with litellm[proxy] (default {routers.LITELLM_VENV})")
    p.add_argument("--profile", choices=("cprofile", "py-spy"),
                   help="run meshgate under a profiler; the profile lands next to the JSON (its CPU figures then "
                        "include the profiler's cost)")
    p.add_argument("--meshgate-log-level", default="WARNING",
                   help="meshgate's --log-level (default WARNING: no per-request access log, as the peers run; "
                        "INFO measures it with its access log)")
    p.add_argument("--rate", type=float, help="open-loop req/s (default 200)")
    p.add_argument("--tokens", type=int, help="streamed chunks per answer (default 16)")
    p.add_argument("--tls", action="store_true",
                   help="instead: meshgate with client TLS and upstream mutual TLS beside cleartext, in one run "
                        "(benchmarks/gateway_tls.py; JSON default benchmarks/results/gateway_tls.json)")
    p.add_argument("--paced", action="store_true", help="also the paced streaming rows (benchmarks/gateway_paced.py)")
    p.add_argument("--paced-only", action="store_true", help="only the paced streaming rows")
    p.add_argument("--paced-levels", help="comma-separated concurrent streams (default 100,300,1000)")
    p.add_argument("--baseline-tree", type=Path,
                   help=f"another meshgate checkout (e.g. `git worktree add /tmp/base main`), measured as the "
                        f"{BASELINE} target beside this one: before/after in the same run")
    args = p.parse_args(argv)
    if args.tls:
        from benchmarks import gateway_tls

        out = args.json if args.json != common.RESULTS_DIR / "gateway_overhead.json" else None
        return gateway_tls.main([*(["--quick"] if args.quick else []), *(["--rate", str(args.rate)] if args.rate else []),
                                 *(["--json", str(out)] if out else [])])
    global BASELINE_TREE
    BASELINE_TREE = args.baseline_tree
    if BASELINE_TREE is not None and BASELINE not in args.targets.split(","):
        args.targets += "," + BASELINE
    if args.paced_only:
        args.paced = True
        if args.json == common.RESULTS_DIR / "gateway_overhead.json":  # keep the request rows' file
            args.json = common.RESULTS_DIR / "gateway_paced.json"
    common.setup_logging()
    plan = QUICK if args.quick else FULL
    if args.rate:
        plan = replace(plan, rate=args.rate)
    if args.tokens:
        plan = replace(plan, tokens=args.tokens)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = set(names) - set(ALL_TARGETS)
    if unknown:
        p.error(f"unknown targets {sorted(unknown)}; known: {','.join(ALL_TARGETS)}")
    if shutil.which("wrk") is None and not args.paced_only:
        p.error("wrk is not installed (apt-get install wrk)")
    routers.set_venvs(args.peers_venv, args.litellm_venv)
    installs = install_peers(log) if args.install_peers else {}
    loadavg_start = common.machine_info()["loadavg_1m"]

    paced_plan = gateway_paced.PACED_QUICK if args.quick else gateway_paced.PACED_FULL
    if args.paced_levels:
        paced_plan = replace(paced_plan, levels=tuple(int(x) for x in args.paced_levels.split(",")))
    with tempfile.TemporaryDirectory(prefix="mg-overhead-") as tmp:
        workdir = Path(tmp)
        out: dict[str, Any] = {"raw": {}, "notes": {}, "meta": {}}
        if not args.paced_only:
            out = run_targets(plan, names, workdir, args.profile, args.meshgate_log_level)
        paced = (gateway_paced.run_paced(paced_plan, names, workdir, plan.peers, BASELINE_TREE)
                 if args.paced else None)
        prof = None
        if args.profile:
            for f in ("meshgate.prof", "meshgate.pyspy.txt"):
                if (workdir / f).exists():
                    prof = args.json.with_name(f"{args.json.stem}.{f}")
                    prof.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(workdir / f, prof)

    targets: dict[str, Any] = {}
    for name in names if not args.paced_only else []:
        note = out["notes"].get(name, "")
        if name in installs and installs[name] != "ok":
            note = f"{note}; install: {installs[name]}".strip("; ")
        installed = name in ("direct", *OURS, BASELINE) or peer_executable(name).exists()
        t = summarize(out["raw"].get(name), note, installed, out["meta"].get(name, {}))
        if name == "direct":
            t["note"] = t["note"] or "the stub alone; CPU is the stub's"
        targets[name] = t
    res: dict[str, Any] = {
        "benchmark": "gateway_overhead",
        "machine": common.machine_info(),
        "date": common.now_iso(),
        "quick": bool(args.quick),
        "plan": asdict(plan),
        "loadavg_start": loadavg_start,
        "note": "all processes share the machine's CPUs: load generator, router and stub compete for them",
        "baseline": "paired: in each open-loop run the stub itself gets the same rate, interleaved; added = "
                    "percentile through the router - the same percentile of those direct requests",
        "meshgate_log_level": args.meshgate_log_level,
        "stub": {"tokens": plan.tokens, "stream_writes": "one write per answer",
                 "command": "python -m benchmarks.stub_upstream"},
        "peer_policy": "round_robin",
        "peer_packages": {n: PEER_PACKAGES[n][1] for n in PEERS},
        "targets": targets,
    }
    # The goal allows one process per core; judged on that when it ran, else on the single process.
    judged = next((n for n in reversed(OURS) if "latency_ms" in targets.get(n, {})), None)
    if judged is not None:
        res["goals"] = goals(targets[judged])
        res["goals_target"] = judged
    if args.profile:
        res["note"] += ("; meshgate ran under " + args.profile + ": its CPU and latency figures include the "
                        "profiler's cost")
    summary = None
    if prof is not None:
        runs = targets.get("meshgate", {}).get("runs", {})
        served = sum(r["ok"] for r in runs.get("wrk", {}).values()) + sum(
            r["num_ok"] + r.get("num_warmup", 0) for r in runs.get("open_loop", {}).values())
        summary = profiles.summarize(prof, served or None, top=20)
        res["profile"] = {"file": str(prof), "requests_approx": served, **summary}
    elif args.profile:
        res["profile"] = {"file": None, "note": "the profiler wrote nothing (see the meshgate note)"}
    if not args.paced_only:
        print_report(res)
    if summary is not None:
        profiles.print_summary(summary, top=20)
    if paced is not None:
        res["paced"] = paced
        paced["goals"].update(gateway_paced.request_goals(targets))
        gateway_paced.print_paced(paced)
    path = common.write_json(args.json, res)
    png = common.png_path(path)
    if not args.paced_only:
        plot(res, png)
    if paced is not None:
        png = png if args.paced_only else path.with_name(f"{path.stem}_paced.png")
        gateway_paced.plot_paced(paced, png)
    print(f"\nwrote {path} and {png}" + (f" (profile: {prof})" if prof else ""))
    return res


if __name__ == "__main__":
    main()
