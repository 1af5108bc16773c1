"""Gateway metrics across forked processes: counters and histograms add up in any one's exposition.

Multiprocess mode switches prometheus_client globally, so each scenario runs in a fresh interpreter
(this module run as a script): the parent enables it, forks two workers that count, reaps them, and
prints the exposition a third GatewayMetrics (as in any worker) would serve.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.edge.metrics import GatewayMetrics
from gateway.config import config_from_dict
from gateway.pools.upstream import Upstreams
from tests.forking import run_forked

WORK = (100, 250)  # what each forked worker counts
ROOT = Path(__file__).resolve().parents[2]


def upstreams() -> Upstreams:
    cfg = config_from_dict({"pools": [{"id": p, "url": "http://127.0.0.1:9", "models": ["m"]} for p in "ab"]})
    return Upstreams(cfg.pools, cfg.gateway.upstream, cfg.gateway.probe)


def count(m: GatewayMetrics, n: int) -> None:
    for _ in range(n):
        m.requests.labels("/v1/chat/completions", "200", "a").inc()
        m.pool("a").ttft.observe(0.05)
        m.pool("a").attempt("ok")
        m.routing.observe(1e-4)
        m.usage_prompt.labels("k", "m", "a").inc(3)


def exposition_after_two_workers(tmp: Path) -> bytes:
    """Run the scenario in a fresh interpreter; its exposition text."""
    r = subprocess.run([sys.executable, "-m", "tests.edge.test_metrics_multiprocess", str(tmp / "prom")],
                       cwd=ROOT, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


def samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


def test_counters_and_histograms_add_up_across_processes(tmp_path):
    got = samples(exposition_after_two_workers(tmp_path))
    total = sum(WORK)
    route = frozenset({("route", "/v1/chat/completions"), ("status", "200"), ("pool", "a")})
    assert got[("meshgate_requests_total", route)] == total
    assert got[("meshgate_upstream_attempts_total", frozenset({("pool", "a"), ("outcome", "ok")}))] == total
    assert got[("meshgate_usage_prompt_tokens_total",
                frozenset({("key", "k"), ("model", "m"), ("pool", "a")}))] == 3 * total
    assert got[("meshgate_time_to_first_token_seconds_count", frozenset({("pool", "a")}))] == total
    assert got[("meshgate_time_to_first_token_seconds_bucket", frozenset({("pool", "a"), ("le", "0.08")}))] == total
    assert got[("meshgate_time_to_first_token_seconds_bucket", frozenset({("pool", "a"), ("le", "0.04")}))] == 0
    assert got[("meshgate_routing_decision_seconds_count", frozenset())] == total
    # The scrape-time gauges are the scraping process' own view, here pointed at a callable.
    assert got[("meshgate_pool_in_flight_requests", frozenset({("pool", "b")}))] == 2.0
    assert not any(name.endswith("_created") or ("pid", str(os.getpid())) in labels for name, labels in got)


def test_pool_in_flight_reads_the_callable_in_one_process():
    m = GatewayMetrics(upstreams(), lambda: 5, pool_in_flight=lambda pool: 7.0 if pool == "a" else 0.0)
    got = samples(generate_latest(m.registry))
    assert got[("meshgate_in_flight_requests", frozenset())] == 5
    assert got[("meshgate_pool_in_flight_requests", frozenset({("pool", "a")}))] == 7.0
    default = samples(generate_latest(GatewayMetrics(upstreams(), lambda: 0).registry))
    assert default[("meshgate_pool_in_flight_requests", frozenset({("pool", "a")}))] == 0.0


def _main(path: Path) -> None:
    from gateway.edge import metrics

    metrics.enable_multiprocess(path)  # the supervisor, before forking
    for pid in run_forked([lambda n=n: count(GatewayMetrics(upstreams(), lambda: 0), n) for n in WORK]):
        metrics.process_dead(pid)
    m = GatewayMetrics(upstreams(), lambda: 0, pool_in_flight=lambda pool: 2.0)
    sys.stdout.buffer.write(generate_latest(m.registry))


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
