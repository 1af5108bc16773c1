"""Never lose a stream, with real pool workers behind delaying links (issue 17): a stream whose pool
is killed, stalled (SIGSTOP) or cut off mid-way goes on on another pool, and the client's text is
token for token what the same request gives without a failure (greedy, and seeded at temperature > 0)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.api.app import GatewayServer
from gateway.cli.emulate import DelayProxy
from gateway.config import config_from_dict
from tests.servers import Proc, free_port, tiny_pool

pytestmark = pytest.mark.slow
MODEL = "meshgate-tiny"
RTT_MS = {"p1": 2.0, "p2": 6.0, "p3": 10.0}  # p1 is the nearest: streams start there


class Workers:
    def __init__(self, tmp: Any):
        self.ports = {pid: free_port() for pid in RTT_MS}
        pools = [tiny_pool(pid, port, str(tmp / "cache"), max_num_seqs=8) for pid, port in self.ports.items()]
        self.cfg = tmp / "workers.yaml"
        self.cfg.write_text(yaml.safe_dump({"pools": pools}))
        self.procs = {pid: self._start(pid) for pid in RTT_MS}

    def _start(self, pid: str) -> Proc:
        return Proc(["worker", "--config", str(self.cfg), "--pool", pid])

    def ensure_running(self) -> None:
        for pid, p in self.procs.items():
            if p.p.poll() is not None:
                self.procs[pid] = self._start(pid)

    def signal(self, pid: str, sig: signal.Signals) -> None:
        os.kill(self.procs[pid].p.pid, sig)


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> Iterator[Workers]:
    w = Workers(tmp_path_factory.mktemp("resume-e2e"))
    yield w
    for p in w.procs.values():
        os.kill(p.p.pid, signal.SIGCONT) if p.p.poll() is None else None
        p.stop()


class Mesh:
    def __init__(self, workers: Workers):
        self.workers = workers
        self.links: dict[str, DelayProxy] = {}
        self.server: GatewayServer | None = None
        self.url = ""

    async def start(self) -> None:
        self.workers.ensure_running()
        pools = []
        for pid, port in self.workers.ports.items():
            link = self.links[pid] = DelayProxy(("127.0.0.1", 0), ("127.0.0.1", port), RTT_MS[pid])
            await link.start()
            pools.append({"id": pid, "url": f"http://127.0.0.1:{link.port}", "models": [MODEL]})
        port = free_port()
        gw = {"port": port, "routing": "latency",
              "probe": {"period_s": 0.2, "timeout_s": 0.5, "down_after": 2, "up_after": 1},
              "resilience": {"stall_floor_s": 0.5, "stall_cap_s": 1.0}}
        self.server = GatewayServer(config_from_dict({"gateway": gw, "pools": pools}))
        await self.server.bind("127.0.0.1", port)
        self.url = f"http://127.0.0.1:{port}"
        await asyncio.sleep(0.6)  # probes measured every link: the nearest pool is known

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
        for link in self.links.values():
            await link.stop()

    async def stream(self, body: dict[str, Any], fault: Any = None, after: int = 8) -> tuple[str, str, list[dict]]:
        """The text of a streamed completion, the pool it began on, and its chunks; fault(pool) is
        called once `after` chunks have arrived."""
        chunks: list[dict] = []
        async with aiohttp.ClientSession() as s, s.post(self.url + "/v1/completions", json=body,
                                                        timeout=aiohttp.ClientTimeout(total=120)) as r:
            assert r.status == 200, await r.text()
            pool = r.headers["x-meshgate-pool"]
            buf = b""
            async for data in r.content.iter_any():
                buf += data
                *events, buf = buf.split(b"\n\n")
                for ev in events:
                    if ev.startswith(b"data: {"):
                        chunks.append(json.loads(ev[6:]))
                        if fault is not None and len(chunks) == after:
                            await fault(pool)
        assert not any("error" in c for c in chunks), chunks[-1]
        return "".join(c["choices"][0]["text"] for c in chunks if c.get("choices")), pool, chunks


@pytest.fixture
async def mesh(workers: Workers) -> AsyncIterator[Mesh]:
    m = Mesh(workers)
    await m.start()
    yield m
    await m.stop()
    for pid in RTT_MS:  # a stalled worker wakes for the next test
        if workers.procs[pid].p.poll() is None:
            workers.signal(pid, signal.SIGCONT)


def completion(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 160, "ignore_eos": True, "stream": True,
            "temperature": 0.0, "stream_options": {"include_usage": True}, **kw}


async def _check(mesh: Mesh, body: dict[str, Any], fault: Any) -> None:
    reference, _, _ = await mesh.stream(body)
    text, first_pool, chunks = await mesh.stream(body, fault)
    assert text == reference  # token for token the answer the same request gives without a failure
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["usage"]["completion_tokens"] == 160  # every token once; the prompt once
    assert chunks[-1]["usage"]["prompt_tokens"] == (await mesh.stream({**body, "max_tokens": 1}))[2][-1]["usage"][
        "prompt_tokens"]
    async with aiohttp.ClientSession() as s, s.get(mesh.url + "/metrics") as r:
        metrics = await r.text()
    assert f'meshgate_resumes_total{{outcome="continued",pool="{first_pool}"' in metrics


async def test_greedy_stream_survives_its_pool_being_killed(mesh: Mesh) -> None:
    async def kill(pool: str) -> None:
        mesh.workers.signal(pool, signal.SIGKILL)

    await _check(mesh, completion(), kill)


async def test_seeded_stream_survives_a_link_cut(mesh: Mesh) -> None:
    async def cut(pool: str) -> None:
        assert mesh.links[pool].cut(down_s=2.0) > 0

    await _check(mesh, completion(temperature=0.9, top_p=0.95, seed=7), cut)


async def test_greedy_stream_survives_its_pool_stalling(mesh: Mesh) -> None:
    async def stop(pool: str) -> None:
        mesh.workers.signal(pool, signal.SIGSTOP)

    await _check(mesh, completion(), stop)


# -- whole (non-stream) answers: asked of the pool as a stream, continued, answered whole (edge/whole.py)
async def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=body,
                                                    timeout=aiohttp.ClientTimeout(total=120)) as r:
        assert r.status == 200, await r.text()
        out: dict[str, Any] = await r.json()
        return out


async def _generated(port: int) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("meshgate_worker_generation_tokens_total"))


def _same(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in ("id", "created")}  # a request's own


async def test_whole_answer_is_the_workers_own_and_survives_its_pool_being_killed(mesh: Mesh) -> None:
    body = {**completion(), "stream": False, "logprobs": 2}
    del body["stream_options"]
    reference = await _post(mesh.url, body)  # through the gateway: a stream, assembled
    worker = await _post(f"http://127.0.0.1:{mesh.workers.ports['p2']}", body)  # the worker's own whole answer
    assert _same(reference) == _same(worker)  # text, logprobs, finish reason, usage: all equal
    before = {pid: await _generated(port) for pid, port in mesh.workers.ports.items()}
    task = asyncio.create_task(_post(mesh.url, body))
    victim = None
    async with asyncio.timeout(60):
        while victim is None:  # the pool generating it, once it is a few tokens in
            await asyncio.sleep(0.02)
            for pid, port in mesh.workers.ports.items():
                if await _generated(port) - before[pid] >= 8:
                    victim = pid
    mesh.workers.signal(victim, signal.SIGKILL)
    out = await task
    got, want = out["choices"][0], reference["choices"][0]
    assert got["text"] == want["text"]  # token for token the answer without a failure
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached_tokens: the last pool's cache
    assert [out["usage"][k] for k in counts] == [reference["usage"][k] for k in counts]
    assert got["finish_reason"] == want["finish_reason"]
    assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
    assert got["logprobs"]["text_offset"] == want["logprobs"]["text_offset"]
    # Log-probabilities: equal to float rounding (the continuation's pool recomputes the tokens so far
    # in one prefill, not step by step: the last digits of a float32 may differ)
    assert got["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"], rel=1e-4, abs=1e-5)
    for g, w in zip(got["logprobs"]["top_logprobs"], want["logprobs"]["top_logprobs"], strict=True):
        assert g == pytest.approx(w, rel=1e-4, abs=1e-5)
    async with aiohttp.ClientSession() as s, s.get(mesh.url + "/metrics") as r:
        metrics = await r.text()
    assert f'meshgate_resumes_total{{outcome="continued",pool="{victim}"' in metrics
