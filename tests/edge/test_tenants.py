"""Tenants and operators: a tenant key's own usage at /v1/meshgate/usage (the operator's views are
admin-only: tests/api/test_dashboard.py), failed key checks bounded per client address, and no key,
prompt or completion in any log line."""
from __future__ import annotations

import logging
import os

import pytest

from gateway.core.errors import RateLimited
from gateway.edge.admission import FailureLimiter, hash_key
from gateway.edge.usage_window import UsageWindow
from tests.api.harness import MODEL, Harness

ADMIN, ALICE, BOB = "sk-admin-k3y", "sk-alice-s3cret", "sk-bob-s3cret"
AUTH = {"enabled": True, "max_failures_per_min": 5, "keys": [
    {"id": "ops", "sha256": hash_key(ADMIN), "admin": True},
    {"id": "alice", "sha256": hash_key(ALICE), "priority": "contracted"},
    {"id": "bob", "sha256": hash_key(BOB)}]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _get(h: Harness, path: str, key: str | None = None) -> tuple[int, dict]:
    assert h.session is not None
    async with h.session.get(h.url + path, headers=bearer(key) if key else None) as r:
        return r.status, await r.json()


def _body(prompt: str, stream: bool = False) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 5, "stream": stream}


@pytest.fixture
async def h():
    harness = Harness()
    await harness.start(["a"], auth=AUTH)
    yield harness
    await harness.stop()


async def test_a_tenant_sees_its_own_usage_and_an_admin_sees_everyone(h):
    for _ in range(2):
        assert (await h.post(_body("hi"), headers=bearer(ALICE)))[0] == 200
    assert (await h.post(_body("hi", stream=True), headers=bearer(ALICE)))[0] == 200
    assert (await h.post(_body("hi"), headers=bearer(BOB)))[0] == 200

    status, mine = await _get(h, "/v1/meshgate/usage", ALICE)
    assert status == 200 and mine["key"] == "alice" and mine["window_s"] == 3600
    # the stub pool counts 1 prompt and 5 completion tokens a request
    assert mine["data"] == [{"model": MODEL, "priority": "contracted", "requests": 3, "prompt_tokens": 3,
                             "completion_tokens": 15, "total_tokens": 18}]
    status, bobs = await _get(h, "/v1/meshgate/usage?window_s=60", BOB)
    assert [(r["priority"], r["requests"]) for r in bobs["data"]] == [("on-demand", 1)]
    # a tenant cannot ask for another key's figures
    status, sneaky = await _get(h, "/v1/meshgate/usage?key=alice", BOB)
    assert status == 200 and sneaky["key"] == "bob" and sneaky["data"][0]["requests"] == 1

    status, everyone = await _get(h, "/v1/meshgate/usage", ADMIN)
    assert status == 200 and {(r["key"], r["requests"]) for r in everyone["data"]} == {("alice", 3), ("bob", 1)}
    _, one = await _get(h, "/v1/meshgate/usage?key=bob", ADMIN)
    assert [r["key"] for r in one["data"]] == ["bob"]

    assert (await _get(h, "/v1/meshgate/usage"))[0] == 401
    assert (await _get(h, "/v1/meshgate/usage?window_s=-1", ALICE))[0] == 400
    assert (await _get(h, "/v1/meshgate/usage?window_s=abc", ALICE))[0] == 400
    assert (await _get(h, "/v1/meshgate/mesh", ALICE))[0] == 403
    assert (await _get(h, "/v1/meshgate/mesh", ADMIN))[0] == 200


async def test_usage_with_auth_off_is_everyones():
    h = Harness()
    await h.start(["a"])
    try:
        assert (await h.post(_body("hi")))[0] == 200
        status, body = await _get(h, "/v1/meshgate/usage")
        assert status == 200 and [(r["key"], r["requests"]) for r in body["data"]] == [(None, 1)]
        assert (await _get(h, "/v1/meshgate/mesh"))[0] == 200  # the operator's views: unchanged with auth off
    finally:
        await h.stop()


async def test_a_401_storm_from_one_address_gets_429(h):
    statuses = [(await h.post(_body("hi"), headers=bearer(f"sk-guess-{i}")))[0] for i in range(8)]
    assert statuses == [401] * 5 + [429] * 3  # max_failures_per_min: 5
    status, headers, body = await h.request(_body("hi"), headers=bearer("sk-guess-9"))
    assert status == 429 and int(headers["Retry-After"]) >= 1 and body["error"]["code"] == "too_many_auth_failures"
    # the bound is per address: until the minute is over the address is refused, keys unchecked
    assert (await h.post(_body("hi"), headers=bearer(ALICE)))[0] == 429
    assert (await _get(h, "/v1/meshgate/mesh", ADMIN))[0] == 429


def test_failure_limiter_windows_and_bound():
    now = [0.0]
    lim = FailureLimiter(3, lambda: now[0], max_addresses=4)
    for _ in range(3):
        lim.check("10.0.0.1")
        lim.failed("10.0.0.1")
    with pytest.raises(RateLimited) as e:
        lim.check("10.0.0.1")
    assert e.value.retry_after_s == 60
    lim.check("10.0.0.2")  # another address is not affected
    now[0] = 61.0
    lim.check("10.0.0.1")  # a new minute
    for i in range(10):  # many addresses: at most max_addresses are remembered
        lim.failed(f"10.1.0.{i}")
    assert len(lim._seen) <= 4


def test_usage_window_drops_old_minutes():
    now = [0.0]
    w = UsageWindow(retention_min=2, clock=lambda: now[0])
    w.add("k", "m", "on-demand", 1, 2)
    now[0] = 65.0
    w.add("k", "m", "on-demand", 1, 2)
    assert w.query(120)[0]["requests"] == 2 and w.query(60)[0]["requests"] == 1
    now[0] = 200.0
    w.add("k", "m", "on-demand", 1, 2)
    assert w.query(120)[0]["requests"] == 1
    now[0] = 200.0 + 60 * 7  # minute 10: its record (10 % 2) last counted minute 2, which is not shown
    assert w.query(120) == []


def test_usage_window_bounds_its_rows():
    w = UsageWindow(retention_min=2, max_rows=2)
    for model in ("a", "b", "c"):
        w.add("k", model, "", 1, 1)
    assert [r["model"] for r in w.query(60)] == ["a", "b"] and w.dropped == 1


def test_usage_window_is_shared_by_forked_processes():
    """`serve --workers N` forks after making the window: a row any process added is counted by all."""
    w = UsageWindow(retention_min=5, processes=2)
    w.add("k", "m", "", 3, 4)
    pid = os.fork()
    if pid == 0:  # the child adds to the existing row and a new one, then leaves without cleanup
        w.add("k", "m", "", 3, 4)
        w.add("other", "m", "batch", 1, 1)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    rows = w.query(300)
    assert [(r["key"], r["requests"], r["prompt_tokens"]) for r in rows] == [("k", 2, 6), ("other", 1, 1)]
    assert w.query(300, key="other")[0]["priority"] == "batch"


async def test_no_key_prompt_or_completion_reaches_the_logs(h, caplog):
    caplog.set_level(logging.DEBUG)
    prompt = "PROMPT-9f3e1c private words"
    assert (await h.post(_body(prompt), headers=bearer(ALICE)))[0] == 200
    assert (await h.post(_body(prompt, stream=True), headers=bearer(ALICE)))[0] == 200
    assert (await h.post(_body(prompt), headers=bearer("sk-WRONG-abc123")))[0] == 401
    h.stubs["a"].mode = "error"
    await h.post(_body(prompt), headers=bearer(BOB))
    h.stubs["a"].mode = "drop"
    await h.post(_body(prompt, stream=True), headers=bearer(BOB))
    text = "\n".join(r.getMessage() + (str(r.exc_info) if r.exc_info else "") for r in caplog.records)
    assert "request_id" in text  # the access log did write lines
    for secret in (ALICE, BOB, "sk-WRONG-abc123", "PROMPT-9f3e1c", "private words", "t0 t1", hash_key(ALICE)):
        assert secret not in text, secret
