"""Refuse when full: a pool answers 429 at once, without queueing, to a request that carries
x-meshgate-may-refuse: 1 when the wait predicted for it exceeds engine.refuse_queue_wait_s;
every other request queues as before."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.config import ConfigError, EngineConfig, ModelConfig, PoolConfig, config_from_dict
from gateway.core.types import LoadReport
from gateway.core.wire import LOAD_HEADER, MAY_REFUSE_HEADER
from gateway.worker.async_engine import AsyncEngine, PoolFull
from gateway.worker.batch import Batch
from gateway.worker.engine import Engine
from gateway.worker.request import Request, SamplingParams
from gateway.worker.runner import TorchRunner
from gateway.worker.server import WorkerServer
from tests.worker.conftest import ENGINE_DEFAULTS

MODEL = "meshgate-tiny"
LONG = 200  # output tokens of the requests that fill the batch: seconds at SlowRunner's pace
REFUSE = {MAY_REFUSE_HEADER: "1"}


class SlowRunner:
    """The tiny model, at least `step_s` a step: the requests that fill the batch stay running for
    seconds whatever the machine, and the measured decode step (which the slot wait uses) is long."""

    def __init__(self, inner: TorchRunner, step_s: float = 0.02):
        self.inner, self.step_s = inner, step_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def execute(self, batch: Batch) -> Any:
        time.sleep(self.step_s)
        return self.inner.execute(batch)


def long_request(rid: str, engine: Engine) -> Request:
    return Request(rid, engine.tokenizer.encode("go"), SamplingParams(max_tokens=LONG, ignore_eos=True))


# -- the rule, on the engine thread's side (no thread: the engine does not move under the test) --
async def test_refusal_depends_on_the_bound_and_leaves_the_engine_untouched(make_engine) -> None:
    engine = make_engine(max_num_seqs=2)
    engine.warm_up()
    for i in range(2):
        engine.add_request(long_request(f"r{i}", engine))
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
        engine.step()
    engine.step()  # a decode step: both run, the batch is full
    aengine = AsyncEngine(engine)  # not started: its _add is called here, as the engine thread would
    aengine._loop = asyncio.get_running_loop()
    predicted = engine.queue_wait_s()
    assert predicted > 0  # a slot frees only when a running request ends

    def state() -> tuple[Any, ...]:
        s, kv = engine.scheduler, engine.kv
        return ([r.request_id for r in s.waiting], [r.request_id for r in s.running], sorted(s.requests),
                kv.num_free_blocks, kv.num_used_blocks, [list(r.block_ids) for r in s.running])

    before = state()
    q: asyncio.Queue[Any] = asyncio.Queue()
    aengine._streams["x"] = q
    aengine._add(long_request("x", engine), predicted / 2)
    err = await asyncio.wait_for(q.get(), 5)
    assert isinstance(err, PoolFull) and err.wait_s == pytest.approx(predicted)
    assert state() == before and aengine.num_refused == 1
    engine.kv.check_invariants()

    aengine._add(long_request("y", engine), predicted * 2)  # a bound above the predicted wait: queued
    aengine._add(long_request("z", engine), None)  # no bound (no header): queued
    assert [r.request_id for r in engine.scheduler.waiting] == ["y", "z"] and aengine.num_refused == 1
    assert q.empty()


# -- the HTTP contract ---------------------------------------------------------------------------
@pytest.fixture
async def full_pool(make_engine: Callable[..., Engine], model_cfg: ModelConfig, model_dir: Any
                    ) -> AsyncIterator[tuple[TestClient[Any, Any], Engine, list[aiohttp.ClientResponse]]]:
    """A worker (in process) with 2 sequence slots, both taken by streams that run for seconds."""
    over = dict(max_num_seqs=2, refuse_queue_wait_s=0.1)
    runner = SlowRunner(TorchRunner(model_dir, EngineConfig(**{**ENGINE_DEFAULTS, **over})))
    engine = make_engine(runner=runner, **over)
    engine.warm_up()
    server = WorkerServer(PoolConfig(id="p", model=model_cfg, engine=engine.cfg))
    await server.start_engine(engine)
    client: TestClient[Any, Any] = TestClient(TestServer(server.make_app()))
    await client.start_server()
    streams = []
    for i in range(2):
        body = {"model": MODEL, "prompt": f"fill {i}", "max_tokens": LONG, "ignore_eos": True, "stream": True}
        r = await client.post("/v1/completions", json=body)
        assert r.status == 200
        await r.content.readline()  # the first event: it is running
        streams.append(r)
    assert server.engine is not None
    await wait_for(lambda: server.engine.report.running == 2)  # type: ignore[union-attr]
    try:
        yield client, engine, streams
    finally:
        for r in streams:
            r.close()
        await client.close()  # stops the engine thread; make_engine then checks for leaked blocks


async def wait_for(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


SHORT = {"model": MODEL, "prompt": "x", "max_tokens": 2, "ignore_eos": True}


async def test_full_pool_refuses_with_openai_error_retry_after_and_load(full_pool) -> None:
    client, engine, _ = full_pool
    for body in (SHORT, {**SHORT, "stream": True}):
        r = await client.post("/v1/completions", json=body, headers=REFUSE)
        assert r.status == 429
        assert r.headers["content-type"].startswith("application/json")
        err = (await r.json())["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "rate_limit_error" and err["code"] == "pool_full" and err["message"]
        assert int(r.headers["Retry-After"]) >= 1
        assert LoadReport.from_header(r.headers[LOAD_HEADER]).running == 2
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert (await client.post("/v1/chat/completions", json=chat, headers=REFUSE)).status == 429
    assert not engine.scheduler.waiting and len(engine.scheduler.requests) == 2  # none of them queued


async def test_without_the_header_a_full_pool_queues(full_pool) -> None:
    client, engine, streams = full_pool
    tasks = [asyncio.create_task(client.post("/v1/completions", json=SHORT, headers=headers))
             for headers in ({}, {MAY_REFUSE_HEADER: "0"})]  # only "1" allows refusal
    await wait_for(lambda: len(engine.scheduler.waiting) == 2)  # queued behind the full batch
    assert not any(t.done() for t in tasks)
    for r in streams:
        r.close()  # the clients hang up: their slots free and the queued requests run
    for t in tasks:
        r = await asyncio.wait_for(t, 30)
        assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 2


async def test_a_pool_with_room_serves_requests_that_allow_refusal(full_pool) -> None:
    client, engine, streams = full_pool
    streams.pop().close()
    await wait_for(lambda: len(engine.scheduler.running) == 1)
    r = await client.post("/v1/completions", json=SHORT, headers=REFUSE)
    assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 2
    r = await client.post("/v1/completions", json={**SHORT, "stream": True}, headers=REFUSE)
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in (await r.text()).splitlines() if line]
    assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-2]


# -- config ----------------------------------------------------------------------------------
def test_refuse_queue_wait_s_in_config() -> None:
    def engine_cfg(value: Any) -> EngineConfig:
        return config_from_dict({"pools": [{"id": "a", "engine": {"refuse_queue_wait_s": value}}]}).pools[0].engine

    assert EngineConfig().refuse_queue_wait_s == 0.5
    assert engine_cfg(2).refuse_queue_wait_s == 2.0
    assert engine_cfg(None).refuse_queue_wait_s is None  # never refuse
    with pytest.raises(ConfigError, match=r"pools\[0\]\.engine\.refuse_queue_wait_s: must be 0 or positive"):
        engine_cfg(-1)
    with pytest.raises(ConfigError, match=r"pools\[0\]\.engine\.refuse_queue_wait_s: expected float"):
        engine_cfg("soon")
