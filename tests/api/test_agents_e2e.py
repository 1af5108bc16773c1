"""Agents through `meshgate up` (a gateway, two emulated sites with our worker): the official
openai SDK's tool calls, structured outputs, n, the Responses API and embeddings."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pydantic
import pytest
import yaml

from tests.servers import MESH_RTT_MS, MESH_SITES, Proc, free_port, tiny_pool, wait_until

MODEL = "meshgate-tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
NOTE = {"type": "function", "function": {
    "name": "take_note", "parameters": {"type": "object", "properties": {"text": {"type": "string", "maxLength": 20}},
                                        "required": ["text"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agents-up")
    pools = []
    for s in MESH_SITES[:2]:
        p = tiny_pool(f"{s['id']}-1", free_port(), str(tmp / "cache"), max_model_len=2048, num_blocks=512)
        p.update(site=s["id"], url=f"http://127.0.0.1:{free_port()}", emulate_rtt_ms=MESH_RTT_MS[s["id"]])
        pools.append(p)
    port = free_port()
    cfg = tmp / "mesh.yaml"
    cfg.write_text(yaml.safe_dump({
        "gateway": {"site": "fra", "port": port, "routing": "latency",
                    "probe": {"period_s": 0.2, "timeout_s": 1.0, "down_after": 2, "up_after": 1}},
        "sites": MESH_SITES[:2], "pools": pools}))
    proc = Proc(["up", "--config", str(cfg)], ready_marker="meshgate is up", timeout_s=180)
    url = f"http://127.0.0.1:{port}"
    def ready() -> bool:
        try:
            return httpx.get(url + "/ready").status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_until(ready, timeout_s=30), proc.log()
    yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert proc.stop() == 0, proc.log()


@pytest.mark.parametrize("choice", ["auto", "required", {"type": "function", "function": {"name": "take_note"}}])
def test_tool_calls(client, choice):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                       tools=[WEATHER, NOTE], tool_choice=choice, max_tokens=150, temperature=0.5,
                                       seed=2)
    c = r.choices[0]
    if choice == "auto" and c.finish_reason != "tool_calls":
        assert isinstance(c.message.content, str)  # the model chose to answer (the tiny one mostly does)
        return
    assert c.finish_reason == "tool_calls"
    (call,) = c.message.tool_calls
    tool = {"get_weather": WEATHER, "take_note": NOTE}[call.function.name]
    if isinstance(choice, dict):
        assert call.function.name == "take_note"
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


class Forecast(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)
    rain: bool
    high_c: int = pydantic.Field(ge=-30, le=45)


def test_parse_n_and_streams(client):
    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "forecast"}],
                                      response_format=Forecast, max_tokens=150, temperature=0.8, seed=4, n=3)
    assert len(r.choices) == 3
    assert all(isinstance(c.message.parsed, Forecast) for c in r.choices)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w?"}],
                                                 tools=[WEATHER], tool_choice="required", max_tokens=150,
                                                 stream=True, stream_options={"include_usage": True}))
    args = "".join(tc.function.arguments or "" for ch in chunks if ch.choices
                   for tc in ch.choices[0].delta.tool_calls or [])
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])
    assert chunks[-1].usage.completion_tokens > 0  # the usage chunk the client asked for


def test_responses_and_embeddings(client):
    r = client.responses.create(model=MODEL, input="hello", max_output_tokens=6, temperature=0)
    assert r.status in ("completed", "incomplete") and r.usage.output_tokens <= 6
    events = list(client.responses.create(model=MODEL, input="hello", max_output_tokens=6, temperature=0,
                                          stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    floats = client.embeddings.create(model=MODEL, input=["a lighthouse", "a keeper"], encoding_format="float")
    decoded = client.embeddings.create(model=MODEL, input=["a lighthouse", "a keeper"])  # base64 on the wire
    assert len(floats.data) == 2 and floats.usage.prompt_tokens > 0
    assert all(abs(x - y) < 1e-6 for x, y in zip(floats.data[1].embedding, decoded.data[1].embedding))
