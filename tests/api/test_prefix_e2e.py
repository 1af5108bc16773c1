"""Prefix- and session-aware routing end to end on the emulated mesh (`meshgate up`): a gateway in
Frankfurt, pools in Frankfurt (1 ms), Paris (10.5 ms) and Amsterdam (13.7 ms) behind delaying
proxies, each serving the tiny model with a context long enough for a long system prompt."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.servers import MESH_RTT_MS, MESH_SITES, Proc, free_port, tiny_pool, wait_until

PROBE_S = 0.2
SITES = [s for s in MESH_SITES if s["id"] in ("fra", "par", "ams")]
SYSTEM = "Rules of the house: answer briefly, cite the manual, never guess a part number. " * 38  # ~3,000 chars


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("prefix-mesh")
    pools = []
    for s in SITES:
        p = tiny_pool(f"{s['id']}-1", free_port(), str(tmp / "cache"), max_num_seqs=4, num_threads=1,
                      max_model_len=2048, num_blocks=512, max_num_batched_tokens=512)
        p.update(site=s["id"], url=f"http://127.0.0.1:{free_port()}", emulate_rtt_ms=MESH_RTT_MS[s["id"]])
        pools.append(p)
    port = free_port()
    cfg = tmp / "mesh.yaml"
    cfg.write_text(yaml.safe_dump({
        "gateway": {"site": "fra", "port": port, "routing": "latency",
                    "probe": {"period_s": PROBE_S, "timeout_s": 1.0, "down_after": 2, "up_after": 1}},
        "sites": SITES, "pools": pools}))
    proc = Proc(["up", "--config", str(cfg)], ready_marker="meshgate is up", timeout_s=180)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _ready(url), timeout_s=30), proc.log()
        time.sleep(5 * PROBE_S)  # a few probe rounds: RTT estimates settle
        yield url, proc
    finally:
        assert proc.stop() == 0, proc.log()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready").status_code == 200
    except httpx.HTTPError:
        return False


def chat(url: str, messages: list[dict[str, str]], headers: dict[str, str] | None = None,
         **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60,
                      json={"model": "meshgate-tiny", "messages": messages, "max_tokens": 4, **body})


def served(r: httpx.Response) -> tuple[str, int]:
    assert r.status_code == 200, r.text
    return r.headers["x-meshgate-pool"], r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_long_prompt_warm_on_a_farther_pool_goes_there_a_short_one_to_the_nearest(mesh) -> None:
    url, _ = mesh
    ask = lambda q: [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]  # noqa: E731
    # warm Paris (residency keeps this one there); Frankfurt stays cold for this prompt
    assert served(chat(url, ask("Which fuse is it?"), {"x-meshgate-residency": "FR"}))[0] == "par-1"
    r = chat(url, ask("And the torque for the bolt?"))
    pool, cached = served(r)
    assert pool == "par-1", r.headers["x-meshgate-route"]
    assert cached > 1000  # the system prompt came from Paris' cache
    route = r.headers["x-meshgate-route"]
    assert "pool=par-1" in route and "cached_tokens=" in route
    predicted = int(route.split("cached_tokens=")[1].split()[0])
    assert predicted > 500  # the gateway expected most of the system prompt to be there
    # a short prompt gains nothing from a cache: the nearest pool
    assert served(chat(url, [{"role": "user", "content": "Hello?"}]))[0] == "fra-1"


def test_a_conversation_stays_on_its_pool_and_moves_when_the_pool_dies(mesh) -> None:
    url, proc = mesh
    messages = [{"role": "system", "content": "You are the night-shift dispatcher of a ferry line. " * 20}]
    pools, cached = [], []
    for turn in range(5):
        messages.append({"role": "user", "content": f"Turn {turn}: the ferry to the island is late again; "
                                                    "what do I tell the passengers waiting at the pier? " * 2})
        r = chat(url, messages, prompt_cache_key="ferry-conversation-7")
        pool, c = served(r)
        pools.append(pool)
        cached.append(c)
        messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
    assert len(set(pools)) == 1, pools
    assert all(b > a for a, b in zip(cached, cached[1:])), cached  # the cached prefix grows each turn
    home = pools[0]
    _kill_pool(proc.p.pid, home)
    messages.append({"role": "user", "content": "Turn 5: and now the radio is down too."})
    r = chat(url, messages, prompt_cache_key="ferry-conversation-7")
    assert r.status_code == 200, r.text
    assert r.headers["x-meshgate-pool"] != home


def test_bad_session_keys_get_openai_400s(mesh) -> None:
    url, _ = mesh
    hi = [{"role": "user", "content": "hi"}]
    for body in ({"prompt_cache_key": 42}, {"prompt_cache_key": "k" * 600}, {"user": "u" * 600}):
        r = chat(url, hi, **body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] in ("prompt_cache_key", "user")
    r = chat(url, hi, {"x-session-id": "s" * 600})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert served(chat(url, hi, {"x-session-id": "fine-session"}))[0]  # and it keeps serving


def _kill_pool(root_pid: int, pool_id: str) -> None:
    """SIGKILL the worker process of pool_id among the descendants of the `meshgate up` we started."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    todo, found = [root_pid], []
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            todo.append(c)
            try:
                cmd = (Path("/proc") / str(c) / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--pool" in cmd and pool_id.encode() in cmd:
                found.append(c)
    assert found, f"no worker process for {pool_id}"
    for pid in found:
        os.kill(pid, signal.SIGKILL)
