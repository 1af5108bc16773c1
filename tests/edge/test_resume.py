"""Streams that outlive their pool (gateway/edge/resume.py), against stub pools that drop, hang or
stall on command and continue a request from the tokens so far as a meshgate worker does."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.api.harness import MODEL, Harness

FAST = {"stall_floor_s": 0.3, "stall_cap_s": 0.5}  # a stub reports no decode speed: the cap is the bound
WHOLE = "t0 t1 t2 t3 t4 "


@pytest.fixture
async def h():
    harness = Harness()
    yield harness
    await harness.stop()


def body(path: str = "chat", **kw: object) -> dict:
    b: dict = {"model": MODEL, "max_tokens": 5, "stream": True, **kw}
    if path == "chat":
        b["messages"] = [{"role": "user", "content": "hi"}]
    else:
        b["prompt"] = "hi"
    return b


def parse(events: list[str]) -> tuple[str, list[dict], list[str]]:
    """The text the client saw, the JSON chunks, and the pools that sent them (the stub says)."""
    chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    text = "".join((c["choices"][0].get("delta") or {}).get("content") or c["choices"][0].get("text") or ""
                   for c in chunks if c.get("choices"))
    return text, chunks, [c["served_by"] for c in chunks if "served_by" in c]


async def metric(h: Harness, name: str) -> float:
    async with h.session.get(h.url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.parametrize("path", ["chat", "completions"])
async def test_a_stream_whose_pools_die_goes_on_elsewhere_intact(h, tmp_path: Path, path: str):
    log = tmp_path / "usage.jsonl"
    await h.start(["a", "b", "c"], resilience=FAST, usage_log={"path": str(log), "flush_every_s": 0.05})
    for s in h.stubs.values():
        s.mode = "drop"  # each cuts its stream after 2 tokens of its own
    url = "/v1/chat/completions" if path == "chat" else "/v1/completions"
    status, _, events = await h.request(body(path, stream_options={"include_usage": True}), url)
    assert status == 200
    text, chunks, pools = parse(events)
    assert text == WHOLE  # nothing lost, nothing twice, over two joins
    assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
    order = list(dict.fromkeys(pools))
    assert len(order) == 3 and pools == [order[0]] * 2 + [order[1]] * 2 + [order[2]]
    assert {c["id"] for c in chunks} == {"x"} and {c["created"] for c in chunks} == {0}
    assert all("meshgate_token_ids" not in c for c in chunks)  # asked for by the gateway, not shown
    assert chunks[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}
    # Each continuation asked for exactly what was missing: the token ids the client had.
    asked = sorted(b["meshgate_resume"]["output_token_ids"] for s in h.stubs.values() for _, b in s.received
                   if "meshgate_resume" in b)
    assert asked == [[0, 1], [0, 1, 2, 3]]
    assert await metric(h, 'meshgate_resumes_total{outcome="continued"') == 2
    for _ in range(50):
        if log.exists() and log.read_text():
            break
        await asyncio.sleep(0.05)
    (rec,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert rec["pool"] == ",".join(order) and rec["status"] == "complete"
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (1, 5)


async def test_a_stalled_stream_is_cut_and_continued(h):
    await h.start(["a", "b"], resilience=FAST)
    h.stubs["a"].mode = h.stubs["b"].mode = "hang"  # 2 tokens, then silence with the connection open
    h.stubs["b"].cut_after = h.stubs["a"].cut_after = 3
    status, _, events = await h.request(body())
    text, _, pools = parse(events)
    assert status == 200 and text == WHOLE and events[-1] == "data: [DONE]"
    stalled = h.stubs[pools[0]]
    for _ in range(50):  # the stalled request was dropped, so the pool could free it
        if stalled.cancelled:
            break
        await asyncio.sleep(0.02)
    assert stalled.cancelled == 1
    assert await metric(h, 'meshgate_resumes_total{outcome="continued",pool="%s",reason="stalled"}' % pools[0]) == 1


async def test_with_nowhere_to_go_the_client_gets_the_error_event(h):
    await h.start(["a"], resilience=FAST)
    h.stubs["a"].mode = "drop"
    status, _, events = await h.request(body())
    text, _, _ = parse(events)
    assert status == 200 and text == "t0 t1 "
    assert json.loads(events[-2][6:])["error"]["type"] == "upstream_error" and events[-1] == "data: [DONE]"


async def test_continuations_are_bounded(h):
    await h.start(["a", "b", "c"], resilience={**FAST, "max_resumes": 1})
    for s in h.stubs.values():
        s.mode = "drop"
    status, _, events = await h.request(body())
    text, _, pools = parse(events)
    assert status == 200 and text == "t0 t1 t2 t3 " and len(set(pools)) == 2  # one continuation, then no more
    assert json.loads(events[-2][6:])["error"]["type"] == "upstream_error" and events[-1] == "data: [DONE]"


async def test_a_pool_marked_down_before_the_first_byte_loses_its_waiting_requests_at_once(h):
    # The first-byte timeout is long and the TTFT bound high: only the pool-down signal can move it.
    await h.start(["a", "b"], routing="round-robin", upstream={"first_byte_timeout_s": 60.0},
                  resilience={"first_byte_floor_s": 30.0, "first_byte_cap_s": 60.0})
    h.stubs["a"].mode = "stall"  # never answers; its probes time out too: marked down
    async with asyncio.timeout(15):  # well before the 60 s first-byte timeout
        results = await asyncio.gather(*(h.request(body()) for _ in range(4)))
    for status, headers, events in results:
        assert status == 200 and parse(events)[0] == WHOLE and headers["x-meshgate-pool"] == "b"
    assert h.stubs["a"].requests >= 1  # some did wait on a first


async def test_a_deadline_is_spent_on_other_pools_not_waiting_on_one(h):
    await h.start(["a", "b"], routing="round-robin", upstream={"first_byte_timeout_s": 60.0},
                  probe={"period_s": 30.0, "timeout_s": 0.2, "down_after": 2, "up_after": 1})  # no probe will help
    h.stubs["a"].mode = "stall"
    results = [await h.request(body(), headers={"x-meshgate-deadline-ms": "3000"}) for _ in range(2)]
    for status, headers, events in results:  # one of them tried a first, then b within the deadline
        assert status == 200 and headers["x-meshgate-pool"] == "b" and parse(events)[0] == WHOLE
    assert h.stubs["a"].requests == 1


def test_resilience_settings_are_checked() -> None:
    from gateway.config import ConfigError, config_from_dict
    assert config_from_dict({"gateway": {"resilience": {"max_resumes": 0}}}).gateway.resilience.max_resumes == 0
    for bad, name in (({"stall_floor_s": 0}, "stall_floor_s"), ({"stall_floor_s": 5, "stall_cap_s": 1}, "stall_cap_s"),
                      ({"hedge_budget": 1.5}, "hedge_budget"), ({"max_resumes": -1}, "max_resumes"),
                      ({"resume_everything": True}, "resume_everything")):
        with pytest.raises(ConfigError, match=f"gateway.resilience.{name}"):
            config_from_dict({"gateway": {"resilience": bad}})
