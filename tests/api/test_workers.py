"""`meshgate serve --workers 2`: two gateway processes on one port behave as one gateway.

Per-key limits, the usage log, metrics and in-flight load tracking hold across the processes; a
worker killed by a signal is replaced; SIGTERM stops them all.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import httpx
import yaml

from gateway.edge.admission import hash_key
from tests.servers import Proc, free_port
from tests.stub_pool import StubPool

MODEL = "stub-model"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _post(url: str, key: str, stream: bool = False) -> httpx.Response:
    # A connection per request, so the kernel spreads them over both processes.
    async with httpx.AsyncClient(timeout=10) as c:
        return await c.post(url + "/v1/chat/completions", json={**BODY, "stream": stream},
                            headers={"Authorization": f"Bearer {key}"})


async def _lines(proc: Proc, pattern: str, count: int) -> list[str]:
    async with asyncio.timeout(60):
        while len(found := [ln for ln in list(proc.lines) if re.search(pattern, ln)]) < count:
            await asyncio.sleep(0.05)
    return found


async def test_two_processes_share_limits_usage_metrics_and_load(tmp_path: Path) -> None:
    stub = StubPool("a", num_tokens=3)
    pool_url = await stub.start()
    port = free_port()
    usage = tmp_path / "usage.jsonl"
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({
        "gateway": {"port": port, "routing": "least-load", "access_log": False,
                    "probe": {"period_s": 0.5, "timeout_s": 5.0},  # the stub shares this test's busy loop
                    "usage_log": {"path": str(usage), "flush_every_s": 0.05},
                    "auth": {"enabled": True, "keys": [
                        {"id": "limited", "sha256": hash_key("sk-limited"), "requests_per_min": 40},
                        {"id": "open", "sha256": hash_key("sk-open")}]}},
        "pools": [{"id": "a", "url": pool_url, "models": [MODEL]}],
    }))
    url = f"http://127.0.0.1:{port}"
    proc = await asyncio.to_thread(Proc, ["serve", "--config", str(cfg), "--workers", "2", "--log-level", "INFO"])
    try:
        await _lines(proc, "listening http=", 2)
        pids = [int(p) for p in re.search(r"\(pids ([\d ]+)\)", "\n".join(proc.lines)).group(1).split()]  # type: ignore[union-attr]

        # 1. A key's requests/min holds across the processes: 40, not 40 per process.
        answers = await asyncio.gather(*(_post(url, "sk-limited") for _ in range(60)))
        statuses = sorted(r.status_code for r in answers)
        assert statuses.count(200) == 40 and statuses.count(429) == 20, [(r.status_code, r.text[:200]) for r in answers if r.status_code != 200]
        prefixes = {r.headers["x-request-id"][:16] for r in answers if r.status_code == 200}
        assert len(prefixes) == 2  # both processes answered (their request ids differ in prefix)

        # 2. Metrics scraped from either process add both up.
        async with httpx.AsyncClient() as c:
            text = (await c.get(url + "/metrics")).text
        assert _metric(text, "meshgate_requests_total", status="200") == 40
        assert _metric(text, "meshgate_admission_rejected_total", key="limited") == 20

        # 3. Load tracking: requests in flight to the pool, counted over both processes.
        stub.mode, stub.delay_s = "slow", 0.5
        held = [asyncio.ensure_future(_post(url, "sk-open", stream=True)) for _ in range(6)]
        async with asyncio.timeout(10):
            while stub.requests < 40 + 6:
                await asyncio.sleep(0.02)
        async with httpx.AsyncClient() as c:
            text = (await c.get(url + "/metrics")).text
        assert _metric(text, "meshgate_pool_in_flight_requests", pool="a") == 6
        assert _metric(text, "meshgate_in_flight_requests") == 6
        assert all(r.status_code == 200 for r in await asyncio.gather(*held))
        stub.mode = "ok"

        # 4. Usage: every admitted request once, in a file per process.
        files = sorted(tmp_path.glob("usage*.jsonl"))
        assert [f.name for f in files] == ["usage.jsonl", "usage.w1.jsonl"]
        async with asyncio.timeout(10):
            while sum(len(f.read_text().splitlines()) for f in files) < 46:
                await asyncio.sleep(0.05)
        assert sum(len(f.read_text().splitlines()) for f in files) == 46
        # and a tenant asking either process for its usage gets both processes' requests
        for _ in range(4):  # a connection each: the kernel spreads them over both processes
            async with httpx.AsyncClient(timeout=10) as c:
                r = await c.get(url + "/v1/meshgate/usage", headers={"Authorization": "Bearer sk-limited"})
            assert r.status_code == 200 and [row["requests"] for row in r.json()["data"]] == [40], r.text

        # 5. A worker killed by a signal is replaced; the gateway keeps serving.
        os.kill(pids[0], signal.SIGKILL)
        await _lines(proc, "listening http=", 3)
        assert "died of signal 9" in proc.log()
        assert all(r.status_code == 200 for r in await asyncio.gather(*(_post(url, "sk-open") for _ in range(10))))
    finally:
        rc = await asyncio.to_thread(proc.stop)
        await stub.stop()
    assert rc == 0, proc.log()
