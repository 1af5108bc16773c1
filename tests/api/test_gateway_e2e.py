"""The gateway in front of real pool workers (processes), driven by the official openai SDK."""
from __future__ import annotations

import asyncio
import signal

import httpx
import openai
import pytest

from tests.servers import Proc, free_port, tiny_pool, wait_until, write_config

MODEL = "meshgate-tiny"


def start_mesh(tmp, num_pools: int = 2, **gateway):
    ports = [free_port() for _ in range(num_pools)]
    pools = [tiny_pool(f"p{i}", port, str(tmp / "cache")) for i, port in enumerate(ports)]
    gw_port = free_port()
    gw = {"port": gw_port, "routing": "least-load",
          "probe": {"period_s": 0.2, "timeout_s": 0.5, "down_after": 2, "up_after": 1},
          "upstream": {"breaker_failures": 3, "breaker_cooldown_s": 1.0}, **gateway}
    cfg = tmp / "mesh.yaml"
    write_config(cfg, pools)
    import yaml

    data = yaml.safe_load(cfg.read_text())
    data["gateway"] = gw
    cfg.write_text(yaml.safe_dump(data))
    workers = {f"p{i}": Proc(["worker", "--config", str(cfg), "--pool", f"p{i}"]) for i in range(num_pools)}
    gateway_proc = Proc(["serve", "--config", str(cfg)])
    return cfg, f"http://127.0.0.1:{gw_port}", workers, gateway_proc, ports


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    cfg, url, workers, gw, ports = start_mesh(tmp_path_factory.mktemp("mesh"))
    yield url, ports
    assert gw.stop() == 0, gw.log()
    for w in workers.values():
        w.stop()


def test_openai_sdk_through_the_gateway(mesh):
    url, _ = mesh
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=MODEL, prompt="The keeper", max_tokens=7, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 7
    assert [m.id for m in client.models.list().data] == [MODEL]


async def test_openai_async_sdk_spreads_load_over_pools(mesh):
    url, ports = mesh
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
    rs = await asyncio.gather(*(client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=30,
        extra_body={"ignore_eos": True}) for i in range(12)))
    pools = {r.headers["x-meshgate-route"].split("pool=")[1].split()[0] for r in rs}
    assert pools == {"p0", "p1"}  # least-load with in-flight crediting spreads a burst
    await client.close()


def pool_metric(port: int, name: str) -> float:
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_client_disconnect_aborts_at_the_pool(mesh):
    url, ports = mesh
    before = sum(pool_metric(p, "meshgate_worker_aborted_requests_total") for p in ports)
    body = {"model": MODEL, "prompt": "go", "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 2:
                break
    assert wait_until(lambda: sum(pool_metric(p, "meshgate_worker_aborted_requests_total") for p in ports) == before + 1)
    assert wait_until(lambda: all(pool_metric(p, "meshgate_worker_kv_blocks_used") == 0 for p in ports))


def test_metrics_pass_promtool_names(mesh):
    url, _ = mesh
    text = httpx.get(url + "/metrics").text
    for name in ("meshgate_requests_total", "meshgate_time_to_first_token_seconds_bucket",
                 "meshgate_routing_decision_seconds_bucket", "meshgate_pool_breaker_state",
                 "meshgate_pool_healthy", "meshgate_in_flight_requests"):
        assert name in text


@pytest.mark.slow
async def test_killed_pool_under_load(tmp_path):
    """Kill a pool during a load: requests that had not started streaming succeed elsewhere, none
    hangs, the dead pool is taken out, and traffic returns when it comes back."""
    cfg, url, workers, gw, ports = start_mesh(tmp_path)
    try:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)

        async def one(i: int) -> str:
            try:
                stream = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"r{i}"}], max_tokens=40, stream=True,
                    extra_body={"ignore_eos": True})
                n = 0
                async for c in stream:
                    n += bool(c.choices and c.choices[0].delta.content is not None)
                return "ok" if n >= 1 else "empty"
            except openai.APIError as e:  # a stream cut after it started: an error event, not a hang
                return f"error:{type(e).__name__}"

        async def load(n: int) -> list[str]:
            sem = asyncio.Semaphore(8)

            async def limited(i: int) -> str:
                async with sem:
                    return await one(i)

            return await asyncio.gather(*(limited(i) for i in range(n)))

        task = asyncio.ensure_future(asyncio.wait_for(load(40), 60))
        await asyncio.sleep(0.5)
        workers["p0"].p.send_signal(signal.SIGKILL)
        results = await task
        # Every failure is a stream that had already started on the killed pool (at most the
        # requests in flight there); nothing hung (wait_for), and later requests all succeed.
        assert results.count("ok") >= 40 - 8, results
        after = await load(10)
        assert after == ["ok"] * 10
        async with httpx.AsyncClient() as h:
            assert await _eventually(lambda: _metric_async(h, url, 'meshgate_pool_healthy{pool="p0"}'), 0.0)
            workers["p0"] = Proc(["worker", "--config", str(cfg), "--pool", "p0"])
            assert await _eventually(lambda: _metric_async(h, url, 'meshgate_pool_healthy{pool="p0"}'), 1.0)
        rs = await asyncio.gather(*(client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "back"}], max_tokens=20,
            extra_body={"ignore_eos": True}) for _ in range(8)))
        assert any("pool=p0" in r.headers["x-meshgate-route"] for r in rs)
        await client.close()
    finally:
        gw.stop()
        for w in workers.values():
            w.stop()


async def _metric_async(h: httpx.AsyncClient, url: str, name: str) -> float:
    for line in (await h.get(url + "/metrics")).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return -1.0


async def _eventually(get, want: float, timeout_s: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        if await get() == want:
            return True
        await asyncio.sleep(0.1)
    return False
