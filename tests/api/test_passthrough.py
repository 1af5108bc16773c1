"""The gateway forwards what it does not read untouched, routes by what pools can serve, and
serves /v1/responses and /v1/embeddings under the same limits (stub pools: tests/stub_pool.py)."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from gateway.config import ConfigError, config_from_dict
from gateway.core import capabilities
from gateway.edge.admission import hash_key
from tests.api.harness import MODEL, Harness
from tests.edge.test_metering import logged, usage_cfg

KEY = "sk-test-0123456789"
AUTH = {"enabled": True, "keys": [{"id": "k1", "sha256": hash_key(KEY)}]}
BEARER = {"Authorization": f"Bearer {KEY}"}

# Fields our worker's parser never knew, spacing and key order a re-encoding would lose.
AGENT_BODY = (b'{"model": "stub-model",  "messages":[{"role":"user","content":"weather?"}],'
              b'"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object",'
              b'"properties":{"city":{"type":"string"}}}}}],"tool_choice":"required","n":2,'
              b'"response_format":{"type":"json_object"},"frequency_penalty":0.5,"logit_bias":{"5":-100},'
              b'"vendor_ext":{"guided_regex":"[a-z]+","x":1.10},"top_k":40 }')


@pytest.fixture
async def h():
    harness = Harness()
    yield harness
    await harness.stop()


async def raw_post(h: Harness, body: bytes, path: str = "/v1/chat/completions",
                   headers: dict | None = None) -> tuple[int, bytes]:
    assert h.session is not None
    async with h.session.post(h.url + path, data=body,
                              headers={"Content-Type": "application/json", **(headers or {})}) as r:
        return r.status, await r.read()


async def test_fields_the_gateway_does_not_read_reach_the_pool_byte_for_byte(h):
    await h.start(["a"])
    status, out = await raw_post(h, AGENT_BODY)
    assert status == 200, out
    # a whole answer from a meshgate pool is asked for as a stream (edge/whole.py), by appending
    assert h.stubs["a"].raw[-1] == AGENT_BODY[:-1] + b',"stream":true,"stream_options":{"include_usage":true}}'
    # a stream: the gateway asks for usage by appending the field, the client's bytes kept as they came
    streamed = AGENT_BODY[:-1] + b',"stream":true}'
    status, out = await raw_post(h, streamed)
    assert status == 200 and out.endswith(b"data: [DONE]\n\n") and b'"usage"' not in out
    assert h.stubs["a"].raw[-1] == streamed[:-1] + b',"stream_options":{"include_usage":true}}'


async def test_a_whole_answer_reaches_an_openai_pool_byte_for_byte(h):
    await h.start(["a"], pool_cfg={"a": {"kind": "openai"}})
    status, out = await raw_post(h, AGENT_BODY)
    assert status == 200 and json.loads(out)["object"] == "chat.completion"
    assert h.stubs["a"].raw[-1] == AGENT_BODY


async def test_a_pools_400_reaches_the_client_unchanged(h):
    await h.start(["a"])
    h.stubs["a"].refuse_field = "vendor_ext"
    status, out = await raw_post(h, AGENT_BODY)
    assert status == 400
    assert json.loads(out) == {"error": {"message": "Unrecognized request argument supplied: vendor_ext",
                                         "type": "invalid_request_error", "param": "vendor_ext", "code": None}}
    assert h.stubs["a"].requests == 1  # a client error is not failed over


async def test_the_gateway_still_checks_what_it_reads(h):
    await h.start(["a"], limits={"max_tokens": 100})
    bad = [(b'{"model":"stub-model","messages":[]}', "messages"),
           (b'{"model":5,"messages":[{"role":"user","content":"x"}]}', "model"),
           (b'{"model":"stub-model","messages":[{"role":"user","content":"x"}],"stream":"yes"}', "stream"),
           (b'{"model":"stub-model","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}',
            "stream_options"),
           (b'{"model":"stub-model","messages":[{"role":"user","content":"x"}],"max_completion_tokens":500}',
            "max_completion_tokens"),
           (b'{"model":"stub-model","messages":[{"role":"user","content":"x"}],"n":0}', "n"),
           (b'{"model":"stub-model","input":"x","max_output_tokens":101}', "max_output_tokens"),
           (b'{"model":"stub-model","input":7}', "input"),
           (b'{"model":"stub-model","messages":[{"role":"user","content":"x"}],', None)]
    for body, param in bad:
        path = "/v1/responses" if b'"input":"x"' in body or b'"input":7' in body else "/v1/chat/completions"
        status, out = await raw_post(h, body, path)
        assert status == 400, (body, out)
        assert json.loads(out)["error"]["param"] == param, (body, out)
    assert h.stubs["a"].requests == 0


async def test_routing_considers_only_pools_that_can_serve_the_request(h):
    plain = ["chat", "completions"]
    await h.start(["a", "b"], pool_cfg={"a": {"kind": "openai", "capabilities": plain},
                                        "b": {"kind": "openai", "capabilities": plain + ["tools", "embeddings"]}})
    for _ in range(4):
        status, out = await raw_post(h, b'{"model":"stub-model","messages":[{"role":"user","content":"x"}],'
                                        b'"tools":[{"type":"function","function":{"name":"f"}}]}')
        assert status == 200 and json.loads(out)["served_by"] == "b"
    # tool_choice none asks nothing of the pool: both serve it
    served = {json.loads((await raw_post(h, b'{"model":"stub-model","messages":[{"role":"user","content":"x"}],'
                                            b'"tools":[{"type":"function","function":{"name":"f"}}],'
                                            b'"tool_choice":"none"}'))[1])["served_by"] for _ in range(4)}
    assert served == {"a", "b"}
    status, out = await raw_post(h, b'{"model":"stub-model","messages":[{"role":"user","content":"x"}],'
                                    b'"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{}}}}')
    err = json.loads(out)["error"]
    assert status == 400 and err["param"] == "response_format" and "json_schema" in err["message"]
    status, out = await raw_post(h, b'{"model":"stub-model","input":"hi"}', "/v1/responses")
    assert status == 404 and "responses" in json.loads(out)["error"]["message"]
    status, out = await raw_post(h, b'{"model":"stub-model","input":["a","b"]}', "/v1/embeddings")
    assert status == 200 and json.loads(out)["served_by"] == "b" and len(json.loads(out)["data"]) == 2


async def test_a_meshgate_pool_advertises_what_it_serves(h):
    await h.start(["a"])
    h.stubs["a"].capabilities = ["chat", "completions"]  # e.g. an older worker
    await h.server.upstreams.probe_all()
    assert h.server.upstreams.pools["a"].endpoint.capabilities == frozenset({"chat", "completions"})
    status, out = await raw_post(h, b'{"model":"stub-model","input":"hi"}', "/v1/embeddings")
    assert status == 404, out
    h.stubs["a"].capabilities = sorted(capabilities.ALL)
    await h.server.upstreams.probe_all()
    status, out = await raw_post(h, b'{"model":"stub-model","input":"hi"}', "/v1/embeddings")
    assert status == 200, out


async def test_responses_and_embeddings_hold_every_limit(h, tmp_path):
    log = tmp_path / "usage.jsonl"
    await h.start(["a", "b"], auth=AUTH, usage_log=usage_cfg(log))
    status, out = await raw_post(h, b'{"model":"stub-model","input":"hi"}', "/v1/responses")
    assert status == 401 and h.stubs["a"].requests + h.stubs["b"].requests == 0
    h.stubs["a"].mode = "error"  # failover before the first byte, on both routes
    status, out = await raw_post(h, b'{"model":"stub-model","input":"hi","max_output_tokens":5}',
                                 "/v1/responses", BEARER)
    assert status == 200 and json.loads(out)["served_by"] == "b"
    status, out = await raw_post(h, b'{"model":"stub-model","input":"hi","stream":true}', "/v1/responses", BEARER)
    assert status == 200 and b"event: response.completed" in out
    status, out = await raw_post(h, b'{"model":"stub-model","input":["a","b"]}', "/v1/embeddings", BEARER)
    assert status == 200 and json.loads(out)["usage"]["prompt_tokens"] == 6
    lines = await logged(h, log, 3)
    assert [(x["prompt_tokens"], x["completion_tokens"], x["status"]) for x in lines] == \
        [(2, 5, "complete"), (2, 5, "complete"), (6, 0, "complete")]
    assert b"stream_options" not in h.stubs["b"].raw[1]  # the Responses API has no usage option to add
    text = (await (await h.session.get(h.url + "/metrics")).read()).decode()
    assert 'meshgate_requests_total{pool="b",route="/v1/responses",status="200"} 2.0' in text
    assert 'meshgate_requests_total{pool="b",route="/v1/embeddings",status="200"} 1.0' in text
    assert 'meshgate_requests_total{pool="",route="/v1/responses",status="401"} 1.0' in text


async def test_a_responses_stream_cut_short_is_metered_as_such(h, tmp_path):
    log = tmp_path / "usage.jsonl"
    await h.start(["a"], usage_log=usage_cfg(log))
    h.stubs["a"].mode = "drop"
    status, out = await raw_post(h, b'{"model":"stub-model","input":"hi","stream":true}', "/v1/responses")
    assert status == 200 and b"response.completed" not in out
    (line,) = await logged(h, log, 1)
    assert line["status"] == "cut_short" and line["completion_tokens"] == 2


def test_pool_capabilities_are_a_closed_set_in_config():
    with pytest.raises(ConfigError, match=r"pools\[0\].capabilities: unknown capability 'tool'"):
        config_from_dict({"pools": [{"id": "p", "kind": "openai", "capabilities": ["chat", "tool"]}]})


async def test_tools_count_toward_the_prompt_size(h):
    await h.start(["a"], limits={"max_prompt_chars": 200})
    tools = [{"type": "function", "function": {"name": "f", "description": "x" * 300}}]
    status, out = await h.post({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": tools})
    assert status == 413, out
    status, out = await h.post({"model": MODEL, "input": "hi", "tools": [{"type": "function", "name": "f",
                                                                         "description": "x" * 300}]},
                               "/v1/responses")
    assert status == 413, out
    assert h.stubs["a"].requests == 0


def test_registry_entries_carry_capabilities():
    from gateway.registry.records import decode_pool, encode, pool_record

    cfg = config_from_dict({"pools": [{"id": "w"}, {"id": "v", "kind": "openai", "url": "http://v", "models": ["m"],
                                                      "capabilities": ["chat", "embeddings"]}]})
    worker, vllm = (decode_pool(encode(pool_record(cfg, p))) for p in cfg.pools)
    assert set(worker.capabilities) == capabilities.MESHGATE_WORKER
    assert vllm.pool_config().capabilities == ("chat", "embeddings")
    assert decode_pool(b'{"id": "old", "url": "http://x"}').pool_config().capabilities is None  # an older entry
