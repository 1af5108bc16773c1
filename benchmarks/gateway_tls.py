"""What TLS on both hops costs the gateway: client TLS (keep-alive) and upstream mutual TLS, side by
side with cleartext, in one run.

    python -m benchmarks.gateway_tls [--quick] [--json PATH] [--rate R]
    python -m benchmarks.gateway_overhead --tls [--quick] ...   (the same, from gateway_overhead)

Two stub pools (benchmarks/stub_upstream.py, the same process code): one cleartext, one serving TLS
and requiring a client certificate from a test CA, as a pool worker with `require_client_cert`. Two
gateways (`python -m gateway serve`, one process each, same config otherwise): "clear" (HTTP front,
HTTP to its stub) and "tls" (HTTPS front with ALPN http/1.1, mutual TLS to its stub with the CA and
a client certificate). Certificates: ECDSA P-256 from `meshgate certs`' code.

  * added latency at --rate req/s: one open-loop generator (benchmarks/openloop.py, keep-alive
    connections, so handshakes are amortised) sends the rate to each gateway and to the cleartext
    stub directly, interleaved (same moments, same noise); per mode (whole answer, SSE stream)
    TTFT and E2E percentiles; "TLS adds" = the tls gateway's percentile - the clear gateway's;
    each gateway's added latency over the direct stub is shown too,
  * CPU per request: utime+stime of each gateway process over that run / requests it served, and
    again at saturation (`wrk -t1 -c16` keep-alive, one gateway at a time, clear then tls, per round);
    the ratio tls/clear.
Goal (issue 18): TLS on both hops adds <= 25% CPU per request at keep-alive and <= 0.3 ms p50; judged
on the worse of the open-loop and wrk CPU ratios and the worse of TTFT and E2E, over both modes.
All processes share the machine's CPUs.
"""
from __future__ import annotations

import logging
import math
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from benchmarks import common
from benchmarks.common import percentile
from benchmarks.routers import (
    CHAT_PATH,
    HOST,
    MODEL,
    REPO,
    Proc,
    StartError,
    free_port,
    start_stub,
)

log = logging.getLogger("meshgate.bench")
MODES = ("nonstream", "stream")
GOAL_CPU_RATIO = 1.25
GOAL_P50_MS = 0.3


def _pki(workdir: Path) -> dict[str, str]:
    from gateway.cli.certs import make_ca, make_cert

    ca = make_ca()
    files = {"ca": str(ca.write(workdir, "ca")[0])}
    for stem, server, client, names in (("gateway", True, False, ("localhost", HOST)), ("pool", True, False, (HOST,)),
                                        ("client", False, True, ("meshgate-gateway",))):
        cert, key = make_cert(ca, names, server=server, client=client).write(workdir, stem)
        files[stem], files[f"{stem}-key"] = str(cert), str(key)
    return files


def _start_tls_stub(workdir: Path, tokens: int, pki: dict[str, str]) -> tuple[Proc, str]:
    argv = [sys.executable, "-m", "benchmarks.stub_upstream", "--host", HOST, "--port", "0", "--tokens", str(tokens),
            "--model", MODEL, "--tls", pki["pool"], pki["pool-key"], pki["ca"]]
    proc = Proc("stub-tls", argv, workdir / "stub-tls.log").start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for line in proc.log_path.read_text(errors="replace").splitlines():
            if line.startswith("listening http="):
                return proc, "https://" + line.split()[1].split("=", 1)[1]
        time.sleep(0.05)
    proc.stop()
    raise StartError(f"TLS stub did not start: {proc.log_tail()}")


def _start_gateway(workdir: Path, name: str, stub_url: str, pki: dict[str, str] | None) -> tuple[Proc, str]:
    port = free_port()
    cfg: dict[str, Any] = {"gateway": {"host": HOST, "port": port, "routing": "least-load"},
           "pools": [{"id": "stub", "kind": "openai", "url": stub_url, "models": [MODEL]}]}
    scheme = "http"
    if pki is not None:
        scheme = "https"
        cfg["gateway"]["tls"] = {"cert_file": pki["gateway"], "key_file": pki["gateway-key"]}
        cfg["gateway"]["upstream"] = {"tls": {"ca_file": pki["ca"], "cert_file": pki["client"],
                                              "key_file": pki["client-key"]}}
    path = workdir / f"{name}.yaml"
    path.write_bytes(orjson.dumps(cfg))  # JSON is YAML
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--log-level", "WARNING"]
    proc = Proc(name, argv, workdir / f"{name}.log").start()
    url = f"{scheme}://localhost:{port}" if pki else f"http://{HOST}:{port}"
    ctx = ssl.create_default_context(cafile=pki["ca"]) if pki else None
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not proc.alive():
            break
        try:
            req = urllib.request.Request(url + CHAT_PATH, body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.stop()
    raise StartError(f"{name} did not serve: {proc.log_tail()}")


def _open_loop(workdir: Path, urls: list[str], mode: str, rate: float, duration_s: float, tokens: int,
               cafile: str) -> dict[str, Any]:
    out = workdir / f"openloop-{mode}.json"
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
                         "max_tokens": tokens}).decode()
    argv = [sys.executable, "-m", "benchmarks.openloop", "--rate", str(rate), "--duration", str(duration_s),
            "--body", body, "--out", str(out), "--cafile", cafile]
    for u in urls:
        argv += ["--url", u + CHAT_PATH]
    if mode == "stream":
        argv.append("--stream")
    r = subprocess.run(argv, check=False, cwd=REPO, capture_output=True, text=True, timeout=duration_s + 90)
    if r.returncode != 0:
        raise RuntimeError(f"open-loop generator failed: {r.stderr.strip()[-300:]}")
    return orjson.loads(out.read_bytes())


def _wrk(url: str, mode: str, duration_s: float, tokens: int, workdir: Path) -> dict[str, Any]:
    lua = workdir / f"wrk-{mode}.lua"
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
                         "max_tokens": tokens, "stream": mode == "stream"}).decode()
    lua.write_text(f'wrk.method = "POST"\nwrk.body = [[{body}]]\nwrk.headers["Content-Type"] = "application/json"\n'
                   "done = function(s, l, r) io.write(string.format(\"WRK %d %d %d\\n\", s.requests, s.duration,"
                   " s.errors.status + s.errors.connect + s.errors.read + s.errors.write + s.errors.timeout)) end\n")
    r = subprocess.run(["wrk", "-t1", "-c16", f"-d{max(1, round(duration_s))}s", "--timeout", "5s", "-s", str(lua),
                        url + CHAT_PATH], check=False, capture_output=True, text=True, timeout=duration_s + 60)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("WRK ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary: {(r.stderr or r.stdout).strip()[-300:]}")
    requests, duration_us, errors = map(int, line.split()[1:])
    return {"requests": requests, "ok": requests - errors, "rps": (requests - errors) / (duration_us / 1e6)}


def _lat(run: dict[str, Any]) -> dict[str, float]:
    ms = {k: [1e3 * x for x in run[k]] for k in ("ttft_s", "e2e_s")}
    return {"ttft_p50_ms": percentile(ms["ttft_s"], 50), "ttft_p99_ms": percentile(ms["ttft_s"], 99),
            "e2e_p50_ms": percentile(ms["e2e_s"], 50), "e2e_p99_ms": percentile(ms["e2e_s"], 99),
            "num_ok": run["num_ok"], "errors": sum(run["errors"].values())}


def measure(quick: bool, rate: float, tokens: int = 16) -> dict[str, Any]:
    open_s, wrk_s, rounds = (4.0, 3.0, 1) if quick else (15.0, 8.0, 3)
    res: dict[str, Any] = {"open_loop": {}, "wrk": {m: {"clear": [], "tls": []} for m in MODES}}
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="mg-tls-") as tmp:
        workdir = Path(tmp)
        try:
            pki = _pki(workdir)
            stub, stub_url = start_stub(workdir, tokens)
            procs.append(stub)
            tstub, tstub_url = _start_tls_stub(workdir, tokens, pki)
            procs.append(tstub)
            clear, clear_url = _start_gateway(workdir, "clear", stub_url, None)
            procs.append(clear)
            tls, tls_url = _start_gateway(workdir, "tls", tstub_url, pki)
            procs.append(tls)
            gws = {"clear": (clear, clear_url), "tls": (tls, tls_url)}
            for mode in MODES:
                log.info("open loop at %g req/s to each of clear, tls, direct: %s", rate, mode)
                cpu0 = {n: p.cpu_s() for n, (p, _) in gws.items()}
                d = _open_loop(workdir, [clear_url, tls_url, stub_url], mode, rate, open_s, tokens, pki["ca"])
                cpu = {n: p.cpu_s() - cpu0[n] for n, (p, _) in gws.items()}
                runs = dict(zip(("clear", "tls", "direct"), d["runs"]))
                lat = {n: _lat(r) for n, r in runs.items()}
                served = {n: runs[n]["num_ok"] + runs[n]["num_warmup"] for n in gws}
                res["open_loop"][mode] = {
                    "latency": lat,
                    "cpu_ms_per_req": {n: 1e3 * cpu[n] / served[n] if served[n] else math.nan for n in gws},
                    "tls_adds_ms": {k: lat["tls"][k] - lat["clear"][k] for k in ("ttft_p50_ms", "e2e_p50_ms",
                                                                                "ttft_p99_ms", "e2e_p99_ms")},
                    "vs_direct_ms": {n: {k: lat[n][k] - lat["direct"][k] for k in ("ttft_p50_ms", "e2e_p50_ms")}
                                     for n in gws},
                }
            for rnd in range(rounds):
                for mode in MODES:
                    for name, (p, url) in gws.items():
                        log.info("wrk -c16 round %d: %s %s", rnd + 1, name, mode)
                        c0 = p.cpu_s()
                        w = _wrk(url, mode, wrk_s, tokens, workdir)
                        w["cpu_ms_per_req"] = 1e3 * (p.cpu_s() - c0) / w["ok"] if w["ok"] else math.nan
                        res["wrk"][mode][name].append(w)
        finally:
            for p in reversed(procs):
                p.stop()
    return res


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in MODES:
        ol = res["open_loop"][mode]
        wrk = {n: {"cpu_ms_per_req": _median([w["cpu_ms_per_req"] for w in ws]), "rps": _median([w["rps"] for w in ws])}
               for n, ws in res["wrk"][mode].items()}
        out[mode] = {
            "open_loop_cpu_ratio": common.ratio(ol["cpu_ms_per_req"]["tls"], ol["cpu_ms_per_req"]["clear"]),
            "wrk_cpu_ratio": common.ratio(wrk["tls"]["cpu_ms_per_req"], wrk["clear"]["cpu_ms_per_req"]),
            "wrk": wrk,
            "tls_adds_p50_ms": max(ol["tls_adds_ms"]["ttft_p50_ms"], ol["tls_adds_ms"]["e2e_p50_ms"]),
        }
    worst_cpu = max(max(s["open_loop_cpu_ratio"], s["wrk_cpu_ratio"]) for s in out.values())
    worst_p50 = max(s["tls_adds_p50_ms"] for s in out.values())
    out["goals"] = {
        "cpu": {"goal": f"TLS on both hops adds <= {GOAL_CPU_RATIO - 1:.0%} CPU per request (keep-alive)",
                "worst_ratio": worst_cpu, "met": worst_cpu <= GOAL_CPU_RATIO},
        "p50": {"goal": f"TLS on both hops adds <= {GOAL_P50_MS} ms p50 at the open-loop rate",
                "worst_added_ms": worst_p50, "met": worst_p50 <= GOAL_P50_MS},
    }
    return out


def _median(xs: list[float]) -> float:
    return percentile([x for x in xs if not math.isnan(x)], 50)


def report(res: dict[str, Any], summary: dict[str, Any]) -> None:
    rows = []
    for mode in MODES:
        ol, s = res["open_loop"][mode], summary[mode]
        for name in ("clear", "tls"):
            lat = ol["latency"][name]
            rows.append((f"{mode} {name}", lat["ttft_p50_ms"], lat["e2e_p50_ms"], lat["e2e_p99_ms"],
                         ol["vs_direct_ms"][name]["e2e_p50_ms"], ol["cpu_ms_per_req"][name],
                         s["wrk"][name]["cpu_ms_per_req"], s["wrk"][name]["rps"]))
    common.print_table(f"gateway with TLS on both hops vs cleartext (open loop {res['rate']:g} req/s each; wrk -c16)",
                       ("run", "ttft p50 ms", "e2e p50 ms", "e2e p99 ms", "e2e p50 over direct", "cpu ms/req @rate",
                        "cpu ms/req wrk", "wrk req/s"), rows)
    common.print_table("what TLS adds (tls - clear, same run)", ("mode", "p50 ms (worse of ttft/e2e)",
                                                                 "cpu ratio @rate", "cpu ratio wrk"),
                       [(m, summary[m]["tls_adds_p50_ms"], summary[m]["open_loop_cpu_ratio"],
                         summary[m]["wrk_cpu_ratio"]) for m in MODES])
    for g in summary["goals"].values():
        print(f"goal: {g['goal']}: {'met' if g['met'] else 'not met'} "
              f"({g.get('worst_ratio', g.get('worst_added_ms')):.3g})")


def plot(res: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(MODES))
    for i, name in enumerate(("clear", "tls")):
        axes[0].bar([v + 0.4 * i for v in x], [summary[m]["wrk"][name]["cpu_ms_per_req"] for m in MODES], 0.4,
                    label=name)
        axes[1].bar([v + 0.4 * i for v in x], [res["open_loop"][m]["latency"][name]["e2e_p50_ms"] for m in MODES], 0.4,
                    label=name)
    for ax, title in zip(axes, ("gateway CPU ms / request (wrk, keep-alive)", f"E2E p50 ms at {res['rate']:g} req/s")):
        ax.set_xticks([v + 0.2 for v in x], MODES)
        ax.set_title(title, fontsize=10)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.arg_parser("gateway_tls", __doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=200.0, help="open-loop req/s to each gateway (default 200)")
    args = p.parse_args(argv)
    common.setup_logging()
    if shutil.which("wrk") is None:
        p.error("wrk is not installed (apt-get install wrk)")
    loadavg = common.loadavg_1m()
    res = measure(args.quick, args.rate)
    res.update(rate=args.rate, benchmark="gateway_tls", machine=common.machine_info(), date=common.now_iso(),
               quick=bool(args.quick), loadavg_start=loadavg,
               note="all processes (generator, two gateways, two stubs, wrk) share the machine's CPUs")
    summary = summarize(res)
    res["summary"] = summary
    report(res, summary)
    path = common.write_json(args.json, res)
    png = common.png_path(path)
    plot(res, summary, png)
    print(f"\nwrote {path} and {png}")
    return res


if __name__ == "__main__":
    main()
