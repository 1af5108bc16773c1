"""The pool worker as a client sees it: a real process, real HTTP, the official openai SDK."""
from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest

from tests.servers import Proc, free_port, tiny_pool, wait_until, write_config

MODEL = "meshgate-tiny"


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("worker")
    port = free_port()
    cfg = write_config(tmp / "cfg.yaml", [tiny_pool("p1", port, str(tmp / "cache"))])
    proc = Proc(["worker", "--config", str(cfg)])
    yield f"http://127.0.0.1:{port}", proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture
def url(worker):
    return worker[0]


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def test_openai_sdk_sync_chat_and_completion(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=12, temperature=0)
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 12 or chat.choices[0].finish_reason == "stop"
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    comp = client.completions.create(model=MODEL, prompt="The keeper", max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 8
    again = client.completions.create(model=MODEL, prompt="The keeper", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == comp.choices[0].text  # greedy is deterministic
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_openai_sdk_streaming_matches_non_streaming(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    args = dict(model=MODEL, messages=[{"role": "user", "content": "ships"}], max_tokens=20, temperature=0,
                extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


async def test_openai_sdk_async_concurrent(url):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
    import asyncio

    async def one(i: int) -> str:
        r = await client.completions.create(model=MODEL, prompt=f"harbour {i}", max_tokens=10, temperature=0,
                                            extra_body={"ignore_eos": True})
        return r.choices[0].text

    batch = await asyncio.gather(*(one(i) for i in range(8)))
    alone = [await one(i) for i in range(8)]
    assert batch == alone
    stream = await client.completions.create(model=MODEL, prompt="x", max_tokens=5, stream=True,
                                             extra_body={"ignore_eos": True})
    texts = [c.choices[0].text async for c in stream]
    assert len(texts) >= 1
    await client.close()


def test_sse_wire_format(url):
    body = {"model": MODEL, "prompt": "a", "max_tokens": 4, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert "x-meshgate-load" in r.headers
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert all(p["object"] == "text_completion" for p in payloads)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ships"}], "logprobs": True}),
    ("/v1/completions", {"prompt": "The keeper", "logprobs": 0}),
])
def test_stream_logprobs_cover_every_token(url, path, body):
    """A token whose text is held back (a partial UTF-8 character) sends no chunk of its own; its
    logprobs ride on the next chunk instead of being dropped."""
    body = {"model": MODEL, "max_tokens": 32, "temperature": 0, "ignore_eos": True, "stream": True, **body}
    with httpx.stream("POST", url + path, json=body, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    lps = [e["choices"][0]["logprobs"] for e in events]
    n = sum(len(lp["content"]) if "content" in lp else len(lp["tokens"]) for lp in lps)
    assert n == 32


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"model": MODEL, "prompt": {"a": 1}}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
        ({"model": MODEL, "prompt": [10**7]}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "n": 17}, 400, "n"),
        ({"model": "no-such-model", "prompt": "x"}, 404, "model"),
        ({"prompt": "x"}, 400, "model"),
        ([1, 2, 3], 400, None),
    ],
)
def test_bad_completion_requests_get_openai_errors(url, body, status, param):
    assert_openai_error(httpx.post(url + "/v1/completions", json=body, timeout=30), status, param)


def test_bad_chat_requests_and_transport_errors(url):
    bad_msgs = {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}
    assert_openai_error(httpx.post(url + "/v1/chat/completions", json=bad_msgs), 400, "messages[0].role")
    long_prompt = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 600}]}
    err = assert_openai_error(httpx.post(url + "/v1/chat/completions", json=long_prompt), 400, "messages")
    assert err["code"] == "context_length_exceeded"
    garbage = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(garbage, 400)
    huge = httpx.post(url + "/v1/completions", content=b"x" * (5 * 1024 * 1024))
    assert_openai_error(huge, 413)
    assert_openai_error(httpx.get(url + "/v1/nothing-here"), 404)
    assert_openai_error(httpx.get(url + "/v1/chat/completions"), 405)
    # ...and the worker keeps serving.
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_client_disconnect_aborts_and_frees_kv_blocks(worker, url):
    aborted = metric(url, "meshgate_worker_aborted_requests_total")
    gone = 'meshgate_worker_client_disconnects_total{route="/v1/completions"}'
    before = metric(url, gone) if gone in httpx.get(url + "/metrics").text else 0.0
    generated = metric(url, "meshgate_worker_generation_tokens_total")
    body = {"model": MODEL, "prompt": "go", "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 2:
                break
    # The client hung up mid-stream: the engine aborts the request and frees its blocks.
    assert wait_until(lambda: metric(url, "meshgate_worker_aborted_requests_total") == aborted + 1, timeout_s=10)
    assert wait_until(lambda: httpx.get(url + "/load").json()["kv_blocks_used"] == 0, timeout_s=10)
    assert httpx.get(url + "/load").json()["running"] == 0
    assert metric(url, "meshgate_worker_generation_tokens_total") - generated < 500
    # A client going away is routine: counted, and no ERROR traceback in the worker's log.
    assert wait_until(lambda: metric(url, gone) == before + 1, timeout_s=10)
    log = worker[1].log()
    assert "Traceback" not in log and "Error handling request" not in log, log[-2000:]


def test_load_health_ready_metrics(url):
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/ready").status_code == 200
    load = httpx.get(url + "/load").json()
    for key in ("waiting", "running", "queued_prompt_tokens", "kv_blocks_used", "kv_blocks_total",
                "prefill_tps", "decode_tps", "queue_wait_s", "handling_s"):
        assert key in load
    assert load["kv_blocks_total"] == 256
    assert load["prefill_tps"] > 0  # measured by the warm-up before the worker said it was ready
    httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "metrics", "max_tokens": 3}, timeout=30)
    text = httpx.get(url + "/metrics").text
    for name in ("meshgate_worker_time_to_first_token_seconds_bucket", "meshgate_worker_e2e_request_latency_seconds_count",
                 "meshgate_worker_inter_token_latency_seconds_count", "meshgate_worker_generation_tokens_total",
                 "meshgate_worker_kv_blocks_used", "meshgate_worker_waiting_requests",
                 'meshgate_worker_requests_total{route="/v1/completions",status="200"}'):
        assert name in text, name


def test_bad_config_and_busy_port_exit_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools:\n  - id: a\n    engine: {dtyp: float32}\n")
    p = Proc(["worker", "--config", str(bad)], ready_marker="")
    assert p.wait() == 2
    assert "pools[0].engine.dtyp: unknown key" in p.log()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = write_config(tmp_path / "c.yaml", [tiny_pool("a", port, str(tmp_path / "cache"))])
        p = Proc(["worker", "--config", str(cfg)], ready_marker="")
        assert p.wait(60) == 1
        assert f"cannot listen on 127.0.0.1:{port}" in p.log()
