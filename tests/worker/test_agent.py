"""Agent features in our worker: structured outputs, tool calls, n, penalties, logit_bias and
chat logprobs — through the engine, and as the official openai SDK sees them over HTTP."""
from __future__ import annotations

import json
import random

import httpx
import jsonschema
import openai
import pydantic
import pytest

from gateway.worker.request import Request, SamplingParams
from tests.servers import Proc, free_port, tiny_pool, write_config

MODEL = "meshgate-tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
                                       "required": ["zone"], "additionalProperties": False}}}


def schema_grid(seed: int, count: int) -> list[dict]:
    """Random, bounded JSON schemas (strings, integers, enums, booleans, arrays, nested objects)."""
    rng = random.Random(seed)

    def value(depth: int) -> dict:
        kind = rng.choice(["string", "integer", "enum", "boolean", "array", "object"] if depth < 2
                          else ["string", "integer", "enum", "boolean"])
        if kind == "string":
            return {"type": "string", "maxLength": rng.randint(1, 10)}
        if kind == "integer":
            lo = rng.randint(-50, 50)
            return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
        if kind == "enum":
            return {"enum": rng.sample(["red", "green", "blue", "cyan", "x y", "ü"], rng.randint(1, 4))}
        if kind == "boolean":
            return {"type": "boolean"}
        if kind == "array":
            return {"type": "array", "items": value(depth + 1), "maxItems": rng.randint(0, 3)}
        return obj(depth + 1)

    def obj(depth: int) -> dict:
        props = {f"k{i}": value(depth) for i in range(rng.randint(1, 4))}
        return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}

    return [obj(0) for _ in range(count)]


def run(engine, reqs: list[Request]) -> dict[str, list[int]]:
    for r in reqs:
        engine.add_request(r)
    out: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    reasons = {}
    while engine.has_work():
        for o in engine.step():
            out[o.request_id].extend(o.token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    return out, reasons


# -- the engine ---------------------------------------------------------------------------------
def test_every_output_under_a_schema_validates(make_engine):
    engine = make_engine(max_model_len=512, num_blocks=256)
    prompt = engine.tokenizer.encode("Answer in JSON:")
    schemas = schema_grid(seed=14, count=8)
    reqs, by_id = [], {}
    for i, schema in enumerate(schemas):
        grammar = engine.grammars.for_request({"type": "json_schema", "schema": schema}, (), "none", None)
        for temp in (0.0, 0.7, 1.3):
            r = Request(f"s{i}-{temp}", list(prompt), SamplingParams(max_tokens=300, temperature=temp, seed=i,
                                                                     grammar=grammar))
            reqs.append(r)
            by_id[r.request_id] = schema
    out, reasons = run(engine, reqs)
    for rid, ids in out.items():
        assert reasons[rid] == "stop", (rid, engine.tokenizer.decode(ids))
        text = engine.tokenizer.decode(ids)
        jsonschema.validate(json.loads(text), by_id[rid])


def test_json_object_mode_gives_an_object(make_engine):
    engine = make_engine(max_model_len=512, num_blocks=256)
    grammar = engine.grammars.for_request({"type": "json_object"}, (), "none", None)
    r = Request("j", engine.tokenizer.encode("x"), SamplingParams(max_tokens=200, temperature=0.0, grammar=grammar,
                                                                  logit_bias=((ord("}"), 5.0),)))
    out, reasons = run(engine, [r])
    if reasons["j"] == "stop":
        assert isinstance(json.loads(engine.tokenizer.decode(out["j"])), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert engine.tokenizer.decode(out["j"]).startswith("{")


def test_greedy_output_without_a_schema_is_unchanged_token_for_token(make_engine):
    engine = make_engine()
    prompt = engine.tokenizer.encode("The keeper of the light")
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone, _ = run(engine, [Request("a", list(prompt), plain)])
    grammar = engine.grammars.for_request({"type": "json_object"}, (), "none", None)
    beside, _ = run(engine, [
        Request("a2", list(prompt), plain),
        Request("b", list(prompt), SamplingParams(max_tokens=24, temperature=0.0, grammar=grammar)),
        Request("c", list(prompt), SamplingParams(max_tokens=24, temperature=0.0, frequency_penalty=1.5,
                                                  presence_penalty=1.0, logit_bias=((5, 50.0),))),
    ])
    assert beside["a2"] == alone["a"]
    assert beside["c"] != alone["a"]  # while the processed rows did change


def test_logit_bias_and_penalties(make_engine):
    engine = make_engine()
    prompt = engine.tokenizer.encode("abc")
    forced, _ = run(engine, [Request("f", list(prompt), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                                       logit_bias=((77, 100.0),)))])
    assert forced["f"] == [77] * 6
    banned_first = run(engine, [Request("g", list(prompt), SamplingParams(max_tokens=1, temperature=0.0,
                                                                          ignore_eos=True))])[0]["g"][0]
    banned, _ = run(engine, [Request("h", list(prompt), SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                                                       logit_bias=((banned_first, -100.0),)))])
    assert banned_first not in banned["h"]
    # a huge frequency penalty on top of the forcing bias: no token twice while others remain
    spread, _ = run(engine, [Request("p", list(prompt), SamplingParams(
        max_tokens=6, temperature=0.0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0))])
    plain, _ = run(engine, [Request("q", list(prompt), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))])
    assert len(set(spread["p"])) >= len(set(plain["q"]))


# -- over HTTP, the official SDK ------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agent-worker")
    port = free_port()
    cfg = write_config(tmp / "cfg.yaml", [tiny_pool("p1", port, str(tmp / "cache"), max_model_len=2048,
                                                    num_blocks=512)])
    proc = Proc(["worker", "--config", str(cfg)])
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    assert proc.stop() == 0, proc.log()


def _params(tool: dict) -> dict:
    return tool["function"]["parameters"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_are_valid_calls(client, choice):
    for temp in (0.0, 1.0):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "weather in Oslo?"}],
                                           tools=[WEATHER, TIME], tool_choice=choice, temperature=temp, seed=3,
                                           max_tokens=200)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        if choice != "required":
            assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), _params(tool))


def test_tool_calls_stream_as_openai_streams_them(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "weather?"}],
                                            tools=[WEATHER], tool_choice="required", max_tokens=200, stream=True,
                                            temperature=0.8, seed=5)
    chunks = list(stream)
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls[0].id and calls[0].function.name == "get_weather" and calls[0].function.arguments == ""
    assert all(tc.index == 0 and tc.id is None for tc in calls[1:])
    args = "".join(tc.function.arguments or "" for tc in calls)
    jsonschema.validate(json.loads(args), _params(WEATHER))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(ch.choices[0].delta.content for ch in chunks)


def test_auto_and_none_and_the_next_turn(client):
    msgs = [{"role": "user", "content": "weather in Oslo?"}]
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice=choice,
                                           max_tokens=20, temperature=0)
        c = r.choices[0]
        if c.finish_reason == "tool_calls":  # auto: the model may call (the tiny one seldom does)
            assert choice == "auto" and c.message.tool_calls[0].function.name == "get_weather"
        else:
            assert c.message.tool_calls is None and isinstance(c.message.content, str)
    call = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="required",
                                          max_tokens=200, temperature=0).choices[0].message
    follow = client.chat.completions.create(
        model=MODEL, tools=[WEATHER], max_tokens=8, temperature=0,
        messages=msgs + [call.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "sunny, 21 C"}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


class Answer(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=10)
    days: int = pydantic.Field(ge=1, le=9)
    sunny: bool


def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "forecast"}],
                                      response_format=Answer, max_tokens=200, temperature=0.5, seed=1)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, Answer)


def test_n_choices_whole_and_streamed(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3,
                                       max_tokens=8, temperature=1.0, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # seeds differ per choice
    # the prompt once, every choice's tokens
    assert 3 <= r.usage.completion_tokens <= 24
    seen: dict[int, str] = {}
    finished = set()
    for ch in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                             max_tokens=8, temperature=1.0, seed=11, stream=True,
                                             stream_options={"include_usage": True}):
        for c in ch.choices:
            seen[c.index] = seen.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished.add(c.index)
        if ch.usage:
            usage = ch.usage
    assert finished == {0, 1}
    assert seen[0] == r.choices[0].message.content and seen[1] == r.choices[1].message.content
    assert 2 <= usage.completion_tokens <= 16 and usage.prompt_tokens == r.usage.prompt_tokens


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       logprobs=True, top_logprobs=3, temperature=0)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)


# -- /v1/responses and /v1/embeddings ------------------------------------------------------------
def test_responses_create_whole_and_streamed(client):
    r = client.responses.create(model=MODEL, input="Say hi", instructions="Be brief.", max_output_tokens=8,
                                temperature=0)
    assert r.status in ("completed", "incomplete") and r.output[0].type == "message"
    assert r.usage.output_tokens <= 8 and r.usage.input_tokens > 0
    events = list(client.responses.create(model=MODEL, input="Say hi", instructions="Be brief.",
                                          max_output_tokens=8, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r.output_text == events[-1].response.output_text


def test_responses_with_tools_structured_text_and_the_next_turn(client):
    tool = {"type": "function", **WEATHER["function"]}
    r = client.responses.create(model=MODEL, input="weather?", tools=[tool], tool_choice="required",
                                max_output_tokens=200, temperature=0.7)
    (call,) = [o for o in r.output if o.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), _params(WEATHER))
    events = list(client.responses.create(model=MODEL, input="weather?", tools=[tool], tool_choice="required",
                                          max_output_tokens=200, temperature=0.7, stream=True))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done and done[0].arguments == args and json.loads(args)
    nxt = client.responses.create(model=MODEL, tools=[tool], max_output_tokens=5, temperature=0, input=[
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert nxt.status in ("completed", "incomplete")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    s = client.responses.create(model=MODEL, input="ok?", max_output_tokens=50, temperature=0,
                                text={"format": {"type": "json_schema", "name": "okay", "schema": schema,
                                                 "strict": True}})
    assert json.loads(s.output_text) in ({"ok": True}, {"ok": False})


def test_responses_refuses_what_it_does_not_keep(client):
    for extra in ({"previous_response_id": "resp_1"}, {"store": True}):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=MODEL, input="x", **extra)
        assert e.value.body["param"] == next(iter(extra))


def test_embeddings_float_and_base64(client):
    import base64
    import math
    import struct

    f = client.embeddings.create(model=MODEL, input=["the keeper", "of the light"], encoding_format="float")
    assert [d.index for d in f.data] == [0, 1] and f.usage.prompt_tokens > 0
    assert all(abs(math.sqrt(sum(x * x for x in d.embedding)) - 1) < 1e-4 for d in f.data)
    b = client.embeddings.create(model=MODEL, input=["the keeper", "of the light"], encoding_format="base64")
    vec = struct.unpack(f"<{len(f.data[0].embedding)}f", base64.b64decode(b.data[0].embedding))
    assert all(abs(x - y) < 1e-6 for x, y in zip(vec, f.data[0].embedding))
    # without encoding_format the SDK asks for base64 itself and decodes it; one input alone is the
    # same vector as in a batch
    one = client.embeddings.create(model=MODEL, input="the keeper")
    assert all(abs(x - y) < 1e-5 for x, y in zip(one.data[0].embedding, f.data[0].embedding))
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="x", dimensions=8)


def test_embedding_states_are_the_models_own(make_engine):
    """The dense pass embeddings run is the model the engine serves: its last state, through the
    LM head, gives the engine's greedy next token and the same log-probabilities."""
    import torch

    from gateway.worker.embeddings import hidden_states

    engine = make_engine()
    model = engine.runner.model
    torch.set_grad_enabled(False)  # the states come from inference mode
    for text in ("the keeper of the light", "hello there, friend"):
        ids = engine.tokenizer.encode(text)
        states, valid = hidden_states(model, [ids, ids[:3]])
        assert valid[0].all() and valid[1].sum() == 3
        logits = model.lm_head(states[0, -1]).float().log_softmax(-1)
        r = Request("e-" + text, list(ids), SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=1))
        engine.add_request(r)
        while engine.has_work():
            engine.step()
        assert r.output_token_ids[0] == int(logits.argmax())
        assert abs(r.output_logprobs[0][0] - float(logits.max())) < 1e-4
        short = model.lm_head(states[1, 2]).float()
        full, _ = hidden_states(model, [ids[:3]])
        assert torch.allclose(short, model.lm_head(full[0, -1]).float(), atol=1e-4)  # padding changes nothing
    torch.set_grad_enabled(True)


def test_logprobs_under_a_schema_stay_numbers(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ok?"}], max_tokens=20,
                                       logprobs=True, top_logprobs=5, temperature=0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "ok", "schema": schema}})
    for t in r.choices[0].logprobs.content:
        assert t.logprob > -1e4 and all(isinstance(a.logprob, float) for a in t.top_logprobs)
    assert any(a.logprob == -9999.0 for t in r.choices[0].logprobs.content for a in t.top_logprobs)


def test_the_worker_advertises_what_it_serves(client):
    from gateway.core import capabilities

    card = client.models.list().data[0].model_dump()
    assert set(card["capabilities"]) == capabilities.ALL
    load = httpx.get(str(client.base_url).removesuffix("/v1/") + "/load").json()
    assert set(load["capabilities"]) == capabilities.ALL


async def test_n_choices_start_after_the_first_has_prefilled():
    """The other choices are submitted only once the first has its first token (its prompt's
    blocks are then in the prefix cache); outputs come tagged with their choice; closing the
    stream closes every choice's generator."""
    import asyncio

    from gateway.worker.choices import fan_out, run_choices
    from gateway.worker.engine import RequestOutput

    log: list[str] = []
    closed: list[str] = []

    async def generate(req, refuse_above_s=None):
        log.append(f"start {req.request_id}")
        try:
            for k in range(3):
                await asyncio.sleep(0.01)
                log.append(f"out {req.request_id} {k}")
                yield RequestOutput(request_id=req.request_id, token_ids=[k], text=str(k), logprobs=[],
                                    finished=k == 2, finish_reason="length" if k == 2 else None, num_prompt_tokens=4,
                                    num_output_tokens=k + 1, num_cached_tokens=0)
        finally:
            closed.append(req.request_id)

    reqs = fan_out(Request("r", [1, 2, 3, 4], SamplingParams(max_tokens=3, seed=5)), 3)
    assert [r.params.seed for r in reqs] == [5, 6, 7] and [r.request_id for r in reqs] == ["r-0", "r-1", "r-2"]
    got = [(i, out.text) async for i, out in run_choices(generate, reqs, None)]
    assert log.index("start r-1") > log.index("out r-0 0") and log.index("start r-2") > log.index("out r-0 0")
    assert sorted(got) == [(i, str(k)) for i in range(3) for k in range(3)]
    assert sorted(closed) == ["r-0", "r-1", "r-2"]
