"""`meshgate worker` and `meshgate serve` with discovery: etcd, as processes."""
from __future__ import annotations

import time

import httpx
import pytest
import yaml

from tests.registry.harness import SITES, discovery
from tests.servers import Proc, free_port, tiny_pool, wait_until

pytestmark = [pytest.mark.etcd, pytest.mark.slow]


def _pools(url: str) -> set[str]:
    text = httpx.get(url + "/metrics").text
    return {line.split('pool="')[1].split('"')[0] for line in text.splitlines()
            if line.startswith("meshgate_pool_healthy{")}


def test_worker_registers_when_ready_and_leaves_before_draining(etcd, tmp_path):
    pool = {**tiny_pool("w0", free_port(), str(tmp_path / "cache")), "site": "fra"}
    gw_port = free_port()
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(yaml.safe_dump({
        "gateway": {"site": "fra", "port": gw_port, "probe": {"period_s": 0.2, "timeout_s": 0.5}},
        "sites": SITES, "pools": [pool],
        # long enough a lease that only deregistration (not expiry) can explain a quick removal
        "discovery": discovery(etcd.endpoint, "/cli/", lease_ttl_s=30, deregister_wait_s=0.3)}))
    gw = Proc(["serve", "--config", str(cfg)])
    url = f"http://127.0.0.1:{gw_port}"
    worker = Proc(["worker", "--config", str(cfg), "--pool", "w0"], timeout_s=180)
    try:
        assert "discovery=etcd" in gw.log()
        assert wait_until(lambda: _pools(url) == {"w0"}, timeout_s=10), gw.log()
        r = httpx.post(url + "/v1/completions", json={"model": "meshgate-tiny", "prompt": "hi", "max_tokens": 3},
                       timeout=30)
        assert r.status_code == 200 and r.headers["x-meshgate-pool"] == "w0", r.text
        gws = httpx.get(url + "/v1/meshgate/gateways").json()["data"]
        assert [g["site"]["id"] for g in gws] == ["fra"]
        t0 = time.monotonic()
        worker.p.terminate()
        assert wait_until(lambda: _pools(url) == set(), timeout_s=5)
        assert time.monotonic() - t0 < 5  # deregistered, not expired (lease 30 s)
        assert worker.wait(30) == 0, worker.log()
        assert "deregistered" in worker.log()
    finally:
        worker.stop()
        assert gw.stop() == 0, gw.log()
