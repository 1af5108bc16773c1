"""`promtool check metrics` (Debian package prometheus; .ci/run installs it) passes on both servers' output."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import generate_latest

from gateway.core.types import LoadReport
from tests.api.harness import Harness, chat
from tests.edge.test_metrics_multiprocess import WORK, exposition_after_two_workers, samples

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


def promtool(text: bytes) -> None:
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


async def test_gateway_metrics_pass_promtool():
    h = Harness()
    await h.start(["a", "b"])
    try:
        h.stubs["a"].mode = "error"
        for stream in (False, True, True):
            await h.post(chat(stream=stream))
        await h.post({"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        text = generate_latest(h.server.metrics.registry)
    finally:
        await h.stop()
    assert b"meshgate_failovers_total" in text and b"meshgate_time_to_first_token_seconds_bucket" in text
    promtool(text)


def test_gateway_metrics_of_forked_processes_pass_promtool(tmp_path):
    text = exposition_after_two_workers(tmp_path)  # multiprocess mode: two workers counted, merged
    route = frozenset({("route", "/v1/chat/completions"), ("status", "200"), ("pool", "a")})
    assert samples(text)[("meshgate_requests_total", route)] == sum(WORK)
    promtool(text)


def test_worker_metrics_pass_promtool():
    pytest.importorskip("torch")
    from gateway.worker.metrics import EngineCounters, WorkerMetrics

    m = WorkerMetrics(lambda: EngineCounters(LoadReport(waiting=2, running=3, kv_blocks_used=5, kv_blocks_total=64),
                                             num_preemptions=1, num_aborted=2, num_steps=10))
    m.requests.labels("/v1/completions", "200").inc()
    m.ttft.observe(0.05)
    m.itl.observe(0.01)
    m.e2e.observe(0.5)
    m.generation_tokens.inc(7)
    promtool(generate_latest(m.registry))
