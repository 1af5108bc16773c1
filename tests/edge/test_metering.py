"""Usage metering: counters and the durable usage log, one line per request however it ends."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from gateway.edge import usage_log as usage_log_module
from gateway.edge.admission import hash_key
from gateway.edge.usage_log import UsageLog
from gateway.config import UsageLogConfig
from tests.api.harness import MODEL, Harness, chat

GOLD = "sk-gold-0123456789"
AUTH = {"enabled": True, "keys": [{"id": "gold", "sha256": hash_key(GOLD), "priority": "contracted"}]}
BEARER = {"Authorization": f"Bearer {GOLD}"}


@pytest.fixture
async def h():
    harness = Harness()
    yield harness
    await harness.stop()


def usage_cfg(path: Path, **kw: object) -> dict:
    return {"path": str(path), "flush_every_s": 0.05, **kw}


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def logged(h: Harness, path: Path, n: int) -> list[dict]:
    """Wait until the request(s) ended and were written, then check nothing more comes."""
    for _ in range(300):
        await h.server.metering.log.flush()
        if len(read_lines(path)) >= n:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    await h.server.metering.log.flush()
    lines = read_lines(path)
    assert len(lines) == n, lines
    return lines


async def test_complete_answers_are_metered_with_the_pools_usage(h, tmp_path):
    log = tmp_path / "usage.jsonl"
    await h.start(["a"], auth=AUTH, usage_log=usage_cfg(log))
    status, _, body = await h.request(chat(), headers={**BEARER, "x-request-id": "r-whole"})
    assert status == 200
    # a stream: the gateway asks the pool for usage and hides it from a client that did not ask
    status, _, events = await h.request(chat(stream=True), headers={**BEARER, "x-request-id": "r-stream"})
    assert status == 200 and len(events) == 6 and events[-1] == "data: [DONE]"
    assert not any('"usage"' in e for e in events)
    # a whole answer from a meshgate pool is asked for as a stream, so it could be continued (edge/whole.py)
    assert body["usage"]["completion_tokens"] == 5 and h.stubs["a"].received[0][1]["stream"] is True
    assert h.stubs["a"].received[1][1]["stream_options"] == {"include_usage": True}
    # a client that asks for usage gets it, as the pool sent it
    body = {**chat(stream=True), "stream_options": {"include_usage": True}}
    status, _, events = await h.request(body, headers={**BEARER, "x-request-id": "r-usage"})
    assert json.loads(events[-2][len("data: "):])["usage"]["completion_tokens"] == 5
    assert all('"usage":null' in e for e in events[:-2])
    lines = await logged(h, log, 3)
    assert [(x["request_id"], x["status"], x["prompt_tokens"], x["completion_tokens"]) for x in lines] == [
        ("r-whole", "complete", 1, 5), ("r-stream", "complete", 1, 5), ("r-usage", "complete", 1, 5)]
    assert {(x["key"], x["model"], x["pool"]) for x in lines} == {("gold", MODEL, "a")}
    assert set(lines[0]) == {"ts", "request_id", "key", "model", "pool", "prompt_tokens", "completion_tokens",
                             "status"}


async def test_usage_counters_by_key_model_and_pool(h, tmp_path):
    await h.start(["a"], auth=AUTH)
    for stream in (False, True, True):
        assert (await h.request(chat(stream=stream), headers=BEARER))[0] == 200
    async with h.session.get(h.url + "/metrics") as r:
        text = await r.text()
    labels = f'key="gold",model="{MODEL}",pool="a"'
    assert f"meshgate_usage_prompt_tokens_total{{{labels}}} 3.0" in text
    assert f"meshgate_usage_completion_tokens_total{{{labels}}} 15.0" in text
    assert f'meshgate_usage_requests_total{{{labels},status="complete"}} 3.0' in text


async def test_a_stream_the_client_cuts_is_logged_once_with_tokens_so_far(h, tmp_path):
    log = tmp_path / "usage.jsonl"
    await h.start(["a"], auth=AUTH, usage_log=usage_cfg(log))
    stub = h.stubs["a"]
    stub.num_tokens, stub.delay_s = 1000, 0.01
    async with h.session.post(h.url + "/v1/chat/completions", json=chat(stream=True), headers=BEARER) as r:
        for _ in range(3):
            await r.content.readline()
    for _ in range(200):
        if stub.cancelled:
            break
        await asyncio.sleep(0.01)
    (line,) = await logged(h, log, 1)
    assert line["status"] == "cut_short" and line["pool"] == "a"
    assert 1 <= line["completion_tokens"] < 1000
    assert line["prompt_tokens"] == 1  # the estimate: "hi" is 2 characters


async def test_a_stream_the_pool_cuts_is_logged_once_with_tokens_so_far(h, tmp_path):
    log = tmp_path / "usage.jsonl"
    await h.start(["a"], usage_log=usage_cfg(log))  # auth off: metered without a key
    h.stubs["a"].mode = "drop"
    status, _, events = await h.request(chat(stream=True))
    assert status == 200 and "upstream_error" in events[-2]
    (line,) = await logged(h, log, 1)
    assert (line["status"], line["completion_tokens"], line["key"]) == ("cut_short", 2, None)


async def test_a_request_no_pool_answers_is_logged_as_an_error(h, tmp_path):
    log = tmp_path / "usage.jsonl"
    await h.start(["a"], auth=AUTH, usage_log=usage_cfg(log))
    h.stubs["a"].mode = "error"
    status, _, _ = await h.request(chat(), headers=BEARER)
    assert status == 502
    (line,) = await logged(h, log, 1)
    assert (line["status"], line["pool"], line["prompt_tokens"], line["completion_tokens"]) == ("error", None, 0, 0)


async def test_the_log_survives_a_restart_and_shutdown_flushes_it(tmp_path):
    log = tmp_path / "logs" / "usage.jsonl"  # the folder is made
    for rid in ("before", "after"):
        h = Harness()
        await h.start(["a"], auth=AUTH, usage_log={"path": str(log), "flush_every_s": 60.0})
        try:
            assert (await h.request(chat(), headers={**BEARER, "x-request-id": rid}))[0] == 200
        finally:
            await h.stop()  # no periodic flush came in 60 s: closing wrote it
    assert [x["request_id"] for x in read_lines(log)] == ["before", "after"]


def test_rotation_by_size_keeps_n_files(tmp_path):
    path = tmp_path / "usage.jsonl"

    async def write(keep: int, num: int) -> None:
        ulog = UsageLog(UsageLogConfig(path=str(path), flush_every_s=60.0, max_bytes=300, keep=keep))
        await ulog.start()
        for i in range(num):
            ulog.append({"request_id": f"r{i:03d}", "pad": "x" * 40})
            if i % 3 == 2:
                await ulog.flush()
        await ulog.close()

    asyncio.run(write(keep=50, num=40))
    # oldest first: the highest number, ..., path.1, then path itself
    files = sorted(path.parent.glob("usage.jsonl.*"), key=lambda p: -int(p.suffix[1:])) + [path]
    assert len(files) > 3 and all(f.stat().st_size <= 300 for f in files)
    ids = [x["request_id"] for f in files for x in read_lines(f)]
    assert ids == [f"r{i:03d}" for i in range(40)]  # each once, in order
    for f in files:
        f.unlink()
    asyncio.run(write(keep=2, num=40))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usage.jsonl", "usage.jsonl.1", "usage.jsonl.2"]
    assert read_lines(path)[-1]["request_id"] == "r039"


def test_a_failed_write_is_retried_without_duplicates(tmp_path, monkeypatch):
    path = tmp_path / "usage.jsonl"
    real_fsync = os.fsync
    fails = [1]

    def flaky_fsync(fd: int) -> None:
        if fails[0]:
            fails[0] -= 1
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    async def run() -> None:
        ulog = UsageLog(UsageLogConfig(path=str(path), flush_every_s=60.0))
        await ulog.start()
        monkeypatch.setattr(usage_log_module.os, "fsync", flaky_fsync)
        ulog.append({"request_id": "a"})
        await ulog.flush()  # written, fsync fails: truncated and kept
        assert path.read_bytes() == b""
        ulog.append({"request_id": "b"})
        await ulog.close()

    asyncio.run(run())
    assert [x["request_id"] for x in read_lines(path)] == ["a", "b"]


def test_stream_meter_splits_reads_into_events_and_hides_usage():
    from gateway.edge.admission import Ticket
    from gateway.edge.metering import RequestMeter

    def chunk(i: int, lead: bool = False) -> bytes:
        body = {"usage": None, "id": "x", "choices": [{"delta": {"content": f"[DONE] t{i}"}}]} if lead else \
            {"id": "x", "choices": [{"delta": {"content": f"t{i} \"usage\":null"}}], "usage": None}
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    usage = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    stream = b": keep-alive\n\n" + chunk(0) + chunk(1, lead=True) + chunk(2) + usage + b"data: [DONE]\n\n"
    for sizes in ([len(stream)], [7] * (len(stream) // 7 + 1), [1] * len(stream)):
        meter = RequestMeter(None, Ticket(None, None, None, 0, lambda: 0.0), MODEL, "r", 1, strip=True)  # type: ignore[arg-type]
        out, at = b"", 0
        for n in sizes:
            out += meter.feed(stream[at:at + n])
            at += n
        out += meter.tail()
        events = [json.loads(e[6:]) if e.startswith(b"data: {") else e for e in out.split(b"\n\n") if e]
        assert events[0] == b": keep-alive" and events[-1] == b"data: [DONE]"
        assert [e["choices"][0]["delta"]["content"] for e in events[1:-1]] == [
            't0 "usage":null', "[DONE] t1", 't2 "usage":null']  # content untouched, the field gone
        assert all("usage" not in e for e in events[1:-1])
        assert (meter.done, meter.chunks, meter.usage) == (True, 3, (3, 4))
    crlf = RequestMeter(None, Ticket(None, None, None, 0, lambda: 0.0), MODEL, "r", 1, strip=False)  # type: ignore[arg-type]
    out = crlf.feed(chunk(0).replace(b"\n\n", b"\r\n\r\n") + b"data: [DO") + crlf.feed(b"NE]\r\n\r\n")
    assert out.count(b"data:") == 2 and crlf.done and crlf.chunks == 1


def test_observe_many_counts_as_observe_does():
    """Streams put their inter-token gaps in the ITL histogram in bulk: same buckets, count and sum
    as observing each gap (bounds included: a value on a bucket's bound falls in that bucket)."""
    from prometheus_client import CollectorRegistry, Histogram

    from gateway.edge.metrics import observe_many

    values = [0.0, 0.001, 0.0011, 0.02, 0.5, 3.0, 100.0, 0.02, 1e-9]
    buckets = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
    samples = []
    for bulk in (False, True):
        reg = CollectorRegistry()
        h = Histogram("gap_seconds", "gaps", ["pool"], buckets=buckets, registry=reg).labels("p")
        if bulk:
            observe_many(h, values)
            observe_many(h, [])
        else:
            for v in values:
                h.observe(v)
        samples.append({(s.name, tuple(sorted(s.labels.items()))): s.value
                        for m in reg.collect() for s in m.samples if not s.name.endswith("_created")})
    assert samples[0] == samples[1]
