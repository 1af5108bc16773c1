"""kind: openai pools (vLLM, SGLang, TGI, ...): load read from their Prometheus metrics."""
from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.api.app import GatewayServer
from gateway.config import config_from_dict
from gateway.pools.upstream import parse_openai_metrics
from tests.servers import free_port

VLLM = """# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 7.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 3.0
vllm:num_requests_waiting{model_name="other"} 2.0
"""


def test_parse_vllm_sglang_tgi_and_unknown():
    r = parse_openai_metrics(VLLM)
    assert (r.waiting, r.running) == (5, 7)
    r = parse_openai_metrics("sglang:num_queue_reqs 4\nsglang:num_running_reqs 9\n")
    assert (r.waiting, r.running) == (4, 9)
    assert parse_openai_metrics("tgi_queue_size 1\n").waiting == 1
    assert parse_openai_metrics("process_cpu_seconds_total 3\n") is None


async def _server(routes: dict[str, str]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    for path, text in routes.items():
        async def handler(request: web.Request, t: str = text) -> web.Response:
            return web.Response(text=t)

        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def test_gateway_reads_load_from_metrics_and_falls_back_to_health():
    vllm, vllm_url = await _server({"/metrics": VLLM, "/health": "ok"})
    plain, plain_url = await _server({"/health": "ok"})  # no /metrics: 404
    cfg = config_from_dict({"gateway": {"port": free_port(), "probe": {"period_s": 0.05}},
                            "pools": [{"id": "vllm", "kind": "openai", "url": vllm_url, "models": ["m"]},
                                      {"id": "plain", "kind": "openai", "url": plain_url, "models": ["m"]}]})
    gw = GatewayServer(cfg)
    try:
        await gw.upstreams.start()
        await asyncio.sleep(0.2)
        pools = gw.upstreams.pools
        assert pools["vllm"].endpoint.load is not None and pools["vllm"].endpoint.load.running == 7
        assert pools["vllm"].endpoint.healthy
        assert pools["plain"].has_metrics is False and pools["plain"].endpoint.healthy
        assert pools["plain"].endpoint.load is None  # routing uses the gateway's in-flight counts
    finally:
        await gw.upstreams.close()
        await vllm.cleanup()
        await plain.cleanup()
