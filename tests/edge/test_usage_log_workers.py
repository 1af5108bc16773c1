"""The usage log with several gateway processes: a file each, rotated each on its own, nothing lost."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from gateway.edge.metering import Metering
from gateway.edge.metrics import GatewayMetrics
from gateway.edge.usage_log import UsageLog, worker_path
from gateway.config import ProbeConfig, UpstreamConfig, UsageLogConfig
from gateway.pools.upstream import Upstreams
from tests.forking import run_forked


def test_worker_paths():
    assert worker_path(Path("/var/log/usage.jsonl"), 0) == Path("/var/log/usage.jsonl")
    assert worker_path(Path("/var/log/usage.jsonl"), 3) == Path("/var/log/usage.w3.jsonl")
    assert worker_path(Path("logs/usage"), 1) == Path("logs/usage.w1")
    metrics = GatewayMetrics(Upstreams((), UpstreamConfig(), ProbeConfig()), lambda: 0)
    metering = Metering(UsageLogConfig(path="/x/usage.jsonl"), metrics, worker_index=2)
    assert metering.log.path == Path("/x/usage.w2.jsonl")
    assert Metering(UsageLogConfig(), metrics, worker_index=2).log.path is None


def test_forked_workers_write_a_file_each_and_lose_nothing(tmp_path):
    cfg = UsageLogConfig(path=str(tmp_path / "usage.jsonl"), flush_every_s=60.0, max_bytes=2000, keep=100)
    num = 300

    async def write(worker: int) -> None:
        ulog = UsageLog(cfg, worker_index=worker)
        await ulog.start()
        for i in range(num):
            ulog.append({"request_id": f"w{worker}-{i:04d}", "pad": "x" * 30})
            if i % 7 == 6:
                await ulog.flush()
        await ulog.close()

    run_forked([lambda w=w: asyncio.run(write(w)) for w in (0, 1)])

    for worker, base in ((0, "usage.jsonl"), (1, "usage.w1.jsonl")):
        rotated = sorted(tmp_path.glob(f"{base}.*"), key=lambda p: -int(p.suffix[1:]))  # oldest first
        assert len(rotated) > 2  # each rotated on its own
        files = [*rotated, tmp_path / base]
        assert all(f.stat().st_size <= cfg.max_bytes for f in files)
        ids = [json.loads(line)["request_id"] for f in files for line in f.read_text().splitlines()]
        assert ids == [f"w{worker}-{i:04d}" for i in range(num)]  # every record once, in order, whole
