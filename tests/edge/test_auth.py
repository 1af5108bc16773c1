"""API keys, per-key limits and priority classes, against stub pools; and their config."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from gateway.edge.admission import Admission, TokenBucket, hash_key
from gateway.edge.metrics import GatewayMetrics
from gateway.config import ConfigError, ProbeConfig, UpstreamConfig, config_from_dict, load_config
from gateway.core.errors import RateLimited
from gateway.pools.upstream import Upstreams
from tests.api.harness import MODEL, Harness, chat

GOLD, BRONZE = "sk-gold-0123456789", "sk-bronze-0123456789"


def key(key_id: str, secret: str, **kw: object) -> dict:
    return {"id": key_id, "sha256": hash_key(secret), **kw}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def auth(*keys: dict) -> dict:
    return {"enabled": True, "keys": list(keys)}


@pytest.fixture
async def h():
    harness = Harness()
    yield harness
    await harness.stop()


async def wait_for(cond, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout_s / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


# -- authentication ---------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, bearer("sk-wrong"), {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer "}])
async def test_401_without_or_with_a_wrong_key(h, headers):
    await h.start(["a"], auth=auth(key("gold", GOLD)))
    status, _, body = await h.request(chat(), headers=headers)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert GOLD not in json.dumps(body) and h.stubs["a"].requests == 0
    # bad bodies from unauthenticated callers are still 401: nothing is validated before the key
    status, _, _ = await h.request({"model": "nope"}, headers=headers)
    assert status == 401
    async with h.session.get(h.url + "/v1/models", headers=headers) as r:
        assert r.status == 401
    async with h.session.get(h.url + "/health") as r:  # probes need no key
        assert r.status == 200
    status, _, body = await h.request(chat(), headers=bearer(GOLD))
    assert status == 200 and body["served_by"] == "a"


async def test_models_a_key_may_not_use_are_not_found(h):
    await h.start(["a"], auth=auth(key("gold", GOLD), key("bronze", BRONZE, models=["other-model"])))
    status, _, body = await h.request(chat(), headers=bearer(BRONZE))
    assert status == 404 and body["error"]["code"] == "model_not_found" and h.stubs["a"].requests == 0
    async with h.session.get(h.url + "/v1/models", headers=bearer(BRONZE)) as r:
        assert (await r.json())["data"] == []
    async with h.session.get(h.url + f"/v1/models/{MODEL}", headers=bearer(BRONZE)) as r:
        assert r.status == 404
    async with h.session.get(h.url + "/v1/models", headers=bearer(GOLD)) as r:
        assert [m["id"] for m in (await r.json())["data"]] == [MODEL]
    assert (await h.request(chat(), headers=bearer(GOLD)))[0] == 200


# -- per-key limits -----------------------------------------------------------------------------
async def test_requests_per_min_gives_429_with_retry_after(h):
    await h.start(["a"], auth=auth(key("gold", GOLD, requests_per_min=2), key("bronze", BRONZE)))
    assert [(await h.request(chat(), headers=bearer(GOLD)))[0] for _ in range(2)] == [200, 200]
    status, headers, body = await h.request(chat(), headers=bearer(GOLD))
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["Retry-After"]) == 30  # one request refills in 60/2 s
    assert h.stubs["a"].requests == 2
    assert (await h.request(chat(), headers=bearer(BRONZE)))[0] == 200  # other keys are not affected


async def test_tokens_per_min_charges_an_estimate_and_settles_real_usage(h):
    await h.start(["a"], auth=auth(key("gold", GOLD, tokens_per_min=100)))
    stub = h.stubs["a"]
    # Estimated 1 + 90 tokens each, but 1 + 5 used: the unused part comes back, so the second fits too.
    big = {**chat(), "max_tokens": 90}
    assert [(await h.request(big, headers=bearer(GOLD)))[0] for _ in range(2)] == [200, 200]
    # Now real usage matches the estimate (1 + 80): 100 - 2*6 - 81 = 7 left, and the next is refused.
    stub.num_tokens = 80
    assert (await h.request({**chat(), "max_tokens": 80}, headers=bearer(GOLD)))[0] == 200
    status, headers, body = await h.request({**chat(), "max_tokens": 80}, headers=bearer(GOLD))
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert 44 <= int(headers["Retry-After"]) <= 45  # 81 - 7 missing, at 100/60 a second


async def test_max_concurrent_gives_429_until_a_request_ends(h):
    await h.start(["a"], auth=auth(key("gold", GOLD, max_concurrent=1)))
    stub = h.stubs["a"]
    stub.num_tokens, stub.delay_s = 20, 0.03
    first = asyncio.create_task(h.request(chat(stream=True), headers=bearer(GOLD)))
    await wait_for(lambda: stub.requests == 1)
    status, headers, body = await h.request(chat(), headers=bearer(GOLD))
    assert status == 429 and int(headers["Retry-After"]) >= 1 and body["error"]["type"] == "rate_limit_error"
    assert (await first)[0] == 200
    assert (await h.request(chat(), headers=bearer(GOLD)))[0] == 200


async def test_failed_requests_give_their_slot_back(h):
    await h.start(["a"], auth=auth(key("gold", GOLD, max_concurrent=1)))
    h.stubs["a"].mode = "error"
    assert {(await h.request(chat(), headers=bearer(GOLD)))[0] for _ in range(4)} <= {502, 503}  # never 429
    h.stubs["a"].mode = "ok"
    for _ in range(40):  # breaker cool-down and a probe
        status = (await h.request(chat(), headers=bearer(GOLD)))[0]
        if status not in (502, 503):
            break
        await asyncio.sleep(0.05)
    assert status == 200


def test_token_bucket_and_retry_after_with_a_clock():
    now = [100.0]
    metrics = GatewayMetrics(Upstreams((), UpstreamConfig(), ProbeConfig()), lambda: 0)
    cfg = config_from_dict({"gateway": {"auth": auth(key("k", "s", requests_per_min=6, tokens_per_min=600))}})
    adm = Admission(cfg.gateway.auth, cfg.gateway.limits, metrics, clock=lambda: now[0])
    who = adm.authenticate(bearer("s"))
    tickets = [adm.admit(who, {}, 0, 100) for _ in range(6)]
    with pytest.raises(RateLimited) as e:
        adm.admit(who, {}, 0, 1)
    assert e.value.retry_after_s == 10  # 6/min: one every 10 s
    now[0] += 10
    with pytest.raises(RateLimited) as e:
        adm.admit(who, {}, 0, 150)  # a request is back, but 100 tokens of the 150
    assert e.value.retry_after_s == 5  # 50 missing at 10/s
    for t in tickets:
        t.settle(10)  # 90 of each estimate comes back
        t.settle(10)  # twice is once
    adm.admit(who, {}, 0, 100)
    b = TokenBucket(60)
    b.take(90, 0.0)  # settled beyond the estimate: debt
    assert b.wait_s(1, 0.0) == pytest.approx(31.0)


# -- tenancy ------------------------------------------------------------------------------------
async def test_each_keys_priority_class_goes_to_the_pool(h):
    await h.start(["a"], auth=auth(key("gold", GOLD, priority="contracted"), key("bronze", BRONZE)))
    spoof = {"x-meshgate-priority": "contracted"}
    assert (await h.request(chat(), headers={**bearer(BRONZE), **spoof}))[0] == 200
    assert (await h.request(chat(stream=True), headers=bearer(GOLD)))[0] == 200
    sent = [hd.get("x-meshgate-priority") or hd.get("X-Meshgate-Priority") for hd, _ in h.stubs["a"].received]
    assert sent == ["on-demand", "contracted"]


async def test_without_auth_the_clients_priority_header_passes(h):
    await h.start(["a"])
    await h.request(chat(), headers={"x-meshgate-priority": "on-demand"})
    await h.request(chat())
    sent = [{k.lower(): v for k, v in hd.items()}.get("x-meshgate-priority") for hd, _ in h.stubs["a"].received]
    assert sent == ["on-demand", None]


async def test_overload_sheds_on_demand_before_contracted(h):
    await h.start(["a"], limits={"max_in_flight": 4, "shed_on_demand_at": 0.5},
                  auth=auth(key("gold", GOLD, priority="contracted"), key("bronze", BRONZE)))
    stub = h.stubs["a"]
    stub.num_tokens, stub.delay_s = 30, 0.03
    assert (await h.request(chat(), headers=bearer(BRONZE)))[0] == 200  # not busy: on-demand gets in
    busy = [asyncio.create_task(h.request(chat(stream=True), headers=bearer(GOLD))) for _ in range(2)]
    await wait_for(lambda: h.server.in_flight == 2)
    status, headers, body = await h.request(chat(), headers=bearer(BRONZE))
    assert status == 503 and int(headers["Retry-After"]) >= 1 and body["error"]["type"] == "service_unavailable"
    assert (await h.request(chat(), headers=bearer(GOLD)))[0] == 200  # contracted still admitted
    assert [r[0] for r in await asyncio.gather(*busy)] == [200, 200]
    assert (await h.request(chat(), headers=bearer(BRONZE)))[0] == 200
    async with h.session.get(h.url + "/metrics") as r:
        assert 'meshgate_admission_rejected_total{key="bronze",reason="shed"} 1.0' in await r.text()


# -- config -------------------------------------------------------------------------------------
def gateway_cfg(**gw: object):  # type: ignore[no-untyped-def]
    return config_from_dict({"gateway": gw})


@pytest.mark.parametrize(("gw", "path"), [
    ({"auth": {"enabled": True}}, "gateway.auth: enabled, but no keys"),
    ({"auth": {"keys": [{"id": "k", "sha256": "abc"}]}}, "gateway.auth.keys[0].sha256"),
    ({"auth": {"keys": [key("k", "s", priority="gold")]}}, "gateway.auth.keys[0].priority"),
    ({"auth": {"keys": [key("k", "s", tokens_per_min=-1)]}}, "gateway.auth.keys[0].tokens_per_min"),
    ({"auth": {"keys": [key("k", "s", rpm=5)]}}, "gateway.auth.keys[0].rpm: unknown key"),
    ({"auth": {"keys": [key("k", "s"), key("k", "t")]}}, "gateway.auth.keys: duplicate id k"),
    ({"auth": {"keys": [key("k", "s"), key("j", "s")]}}, "gateway.auth.keys: duplicate sha256"),
    ({"auth": {"keys": [{"sha256": hash_key("s")}]}}, "gateway.auth.keys[0]: missing required key 'id'"),
    ({"limits": {"shed_on_demand_at": 1.5}}, "gateway.limits.shed_on_demand_at"),
    ({"usage_log": {"path": "u.jsonl", "max_bytes": 0}}, "gateway.usage_log.max_bytes"),
    ({"usage_log": {"flush_every_s": 0}}, "gateway.usage_log.flush_every_s"),
    ({"auth": {"keys_file": "/nonexistent/keys.yaml"}}, "gateway.auth.keys_file: cannot read"),
])
def test_bad_auth_config_names_the_key_path(gw, path):
    with pytest.raises(ConfigError, match=path.replace("[", r"\[").replace("]", r"\]")):
        gateway_cfg(**gw)


def test_defaults_keep_auth_off():
    cfg = gateway_cfg()
    assert not cfg.gateway.auth.enabled and cfg.gateway.usage_log.path is None
    assert not load_config("configs/local.yaml").gateway.auth.enabled


def test_keys_file_yaml_or_json_relative_to_the_config(tmp_path):
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [key("b", "sb", priority="contracted")]}))
    (tmp_path / "gw.yaml").write_text(
        "gateway:\n  auth:\n    enabled: true\n    keys_file: keys.json\n"
        f"    keys: [{{id: a, sha256: {hash_key('sa').upper()}}}]\n")
    keys = load_config(tmp_path / "gw.yaml").gateway.auth.keys
    assert [(k.id, k.priority) for k in keys] == [("a", "on-demand"), ("b", "contracted")]
    (tmp_path / "keys.json").write_text(json.dumps([key("b", "sb"), {"id": "c", "sha256": "zz"}]))
    with pytest.raises(ConfigError, match=r"gateway.auth.keys_file\[1\].sha256"):
        load_config(tmp_path / "gw.yaml")


def test_hash_key_cli_prints_the_digest_of_stdin():
    r = subprocess.run([sys.executable, "-m", "gateway", "hash-key"], input="sk-abc\n", capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == hash_key("sk-abc")
    r = subprocess.run([sys.executable, "-m", "gateway", "hash-key"], input="", capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "no key" in r.stderr
