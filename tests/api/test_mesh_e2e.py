"""The emulated mesh end to end (`meshgate up`): a gateway in Frankfurt and pools in Frankfurt,
Munich, Paris and Amsterdam behind delaying proxies with real round trips. Every test runs twice:
gateway to pools in cleartext, and over mutual TLS (probes, load streams and requests alike)."""
from __future__ import annotations

import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.servers import start_mesh, wait_until

PROBE_S = 0.2


_LOGS: dict[str, Callable[[], str]] = {}  # gateway URL -> its process' log, for failure messages


@pytest.fixture(scope="module", params=["cleartext", "mtls"])
def mesh(tmp_path_factory, request):
    url, cfg, proc = start_mesh(tmp_path_factory.mktemp("mesh"), PROBE_S, mtls=request.param == "mtls")
    _LOGS[url] = proc.log
    yield url, cfg, proc
    assert proc.stop() == 0, proc.log()


def route(url: str, headers: dict[str, str] | None = None, max_tokens: int = 4) -> str:
    r = httpx.post(url + "/v1/completions", headers=headers, timeout=60,
                   json={"model": "meshgate-tiny", "prompt": "The keeper", "max_tokens": max_tokens})
    assert r.status_code == 200, r.text + ("\n" + _LOGS[url]()[-4000:] if url in _LOGS else "")
    return r.headers["x-meshgate-pool"]


def test_idle_requests_go_to_the_nearest_pool(mesh):
    url, _, proc = mesh
    assert "mesh from fra" in proc.log()
    # A few probe rounds first: the RTT estimate starts at the first sample, which a machine busy
    # with four workers starting up can inflate by more than Frankfurt's lead (6.6 ms over Munich).
    time.sleep(5 * PROBE_S)
    assert [route(url) for _ in range(5)] == ["fra-1"] * 5


def test_pools_push_their_load_to_the_gateway(mesh):
    url, _, _ = mesh

    def pushed() -> set[str]:
        return {p["id"] for p in httpx.get(url + "/v1/meshgate/mesh").json()["pools"] if p["load_pushed"]}

    # every pool is among the gateway's nearest here: each keeps a GET /load/stream open to it
    assert wait_until(lambda: pushed() == {"fra-1", "muc-1", "par-1", "ams-1"}, timeout_s=5), pushed()


def test_requests_are_metered(mesh):
    url, cfg, _ = mesh
    route(url, max_tokens=3)
    text = httpx.get(url + "/metrics").text
    done = [ln for ln in text.splitlines() if ln.startswith("meshgate_usage_requests_total{") and 'status="complete"' in ln]
    assert done and sum(float(ln.rsplit(" ", 1)[1]) for ln in done) >= 1
    tokens = [ln for ln in text.splitlines() if ln.startswith("meshgate_usage_completion_tokens_total{")]
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in tokens) >= 3
    if "pki" in {p.name for p in cfg.parent.iterdir()}:  # mutual TLS: the client certificate's expiry is shown
        assert 'meshgate_tls_cert_expiry_seconds{cert="upstream_client"}' in text


def test_residency_keeps_requests_in_the_allowed_countries(mesh):
    url, _, _ = mesh
    assert {route(url, {"x-meshgate-residency": "FR"}) for _ in range(3)} == {"par-1"}
    # Under load too: spread or not, a DE request never leaves Germany.
    seen: list[str] = []
    threads = [threading.Thread(target=lambda: seen.append(route(url, {"x-meshgate-residency": "DE"}, 60)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 and set(seen) <= {"fra-1", "muc-1"}


def _fra_1_client(cfg: Path) -> tuple[str, dict[str, Any]]:
    """fra-1's URL and the httpx options to reach it as the gateway does (its client certificate
    under mutual TLS): the test fills the pool from outside the gateway."""
    conf = yaml.safe_load(cfg.read_text())
    pool = next(p for p in conf["pools"] if p["id"] == "fra-1")
    tls = conf["gateway"]["upstream"].get("tls")
    if not tls:
        return pool["url"], {}
    ctx = ssl.create_default_context(cafile=tls["ca_file"])
    ctx.load_cert_chain(tls["cert_file"], tls["key_file"])
    return pool["url"], {"verify": ctx}


def test_saturated_nearest_pool_spills_to_the_next_best(mesh):
    url, cfg, _ = mesh
    pool_url, opts = _fra_1_client(cfg)
    body = {"model": "meshgate-tiny", "prompt": "go", "max_tokens": 480, "ignore_eos": True, "stream": True}
    holders = []
    stop = threading.Event()

    def hold() -> None:  # a long stream that occupies one of fra-1's sequence slots until released
        with httpx.Client(timeout=60, **opts) as c, c.stream("POST", pool_url + "/v1/completions", json=body) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    break

    def fra_1_running() -> int:
        pools = httpx.get(url + "/v1/meshgate/mesh").json()["pools"]
        queue = next(p for p in pools if p["id"] == "fra-1")["queue"]
        return queue["running"] if queue else 0

    try:
        for _ in range(2):  # fra-1 has 2 slots: both taken, straight at the pool
            t = threading.Thread(target=hold)
            t.start()
            holders.append(t)
        # the gateway learns it from fra-1's pushed load report; then the nearest pool is full
        assert wait_until(lambda: fra_1_running() == 2, timeout_s=10), fra_1_running()
        assert route(url) != "fra-1"
    finally:
        stop.set()
        for t in holders:
            t.join(60)
    ok = wait_until(lambda: route(url) == "fra-1", timeout_s=10)  # and back once it drains
    assert ok, [(p["id"], p.get("late_ms"), p.get("queue")) for p in httpx.get(url + "/v1/meshgate/mesh").json()["pools"]]


def test_killed_pool_is_routed_around_within_a_probe_period(mesh):
    url, cfg, _ = mesh
    assert route(url) == "fra-1"
    subprocess.run(["pkill", "-KILL", "-f", f"{cfg} --pool fra-1"], check=True)
    t0 = time.monotonic()
    got = [route(url) for _ in range(5)]  # failover covers the gap before the probe notices
    # Answered elsewhere (route() asserts a 200): which pool depends on the others' load reports,
    # which the earlier tests of this module leave behind (Munich's fresh report can tip it).
    assert "fra-1" not in got
    assert wait_until(lambda: 'meshgate_pool_healthy{pool="fra-1"} 0.0' in httpx.get(url + "/metrics").text,
                      timeout_s=2 * PROBE_S + 3)
    assert time.monotonic() - t0 < 5
