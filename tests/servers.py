"""Start meshgate processes for tests: real subprocesses on free loopback ports."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A meshgate subprocess whose stderr is kept (last lines) for assertions and failures."""

    def __init__(self, args: list[str], ready_marker: str = "listening http=", timeout_s: float = 120.0):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.p = subprocess.Popen([sys.executable, "-m", "gateway", *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: deque[str] = deque(maxlen=400)
        self._ready = threading.Event()
        self._marker = ready_marker
        threading.Thread(target=self._read, daemon=True).start()
        if ready_marker and not self._ready.wait(timeout_s):
            self.stop()
            raise RuntimeError("server did not start:\n" + self.log())

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))
            if self._marker and self._marker in line:
                self._ready.set()

    def log(self) -> str:
        return "\n".join(self.lines)

    def wait(self, timeout_s: float = 30.0) -> int:
        return self.p.wait(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        return self.p.returncode


def write_config(path: Path, pools: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"pools": pools}))
    return path


def tiny_pool(pool_id: str, port: int, cache_dir: str, **engine: object) -> dict:
    """A pool entry serving the untrained tiny model (fast to make), small engine limits."""
    eng = {"num_blocks": 256, "block_size": 16, "max_num_seqs": 16, "max_num_batched_tokens": 256,
           "max_model_len": 512, "max_waiting": 64, "num_threads": 1, **engine}
    return {"id": pool_id, "host": "127.0.0.1", "port": port,
            "model": {"name": "meshgate-tiny", "cache_dir": cache_dir, "tiny": {"train_steps": 0}},
            "engine": eng}


def wait_until(pred, timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval_s)
    return pred()


# The embedded default's mesh (configs/local.yaml), for end-to-end tests of `meshgate up`.
MESH_SITES = [
    {"id": "fra", "name": "Frankfurt", "country": "DE", "lat": 50.1167, "lon": 8.6833},
    {"id": "muc", "name": "Munich", "country": "DE", "lat": 48.1333, "lon": 11.5667},
    {"id": "par", "name": "Paris", "country": "FR", "lat": 48.8742, "lon": 2.347},
    {"id": "ams", "name": "Amsterdam", "country": "NL", "lat": 52.3, "lon": 4.7},
]
MESH_RTT_MS = {"fra": 1.0, "muc": 7.6, "par": 10.5, "ams": 13.7}


def start_mesh(tmp: Path, probe_s: float, mtls: bool = False, auth: dict | None = None) -> tuple[str, Path, Proc]:
    """`meshgate up` on a Frankfurt gateway and four emulated sites (untrained tiny model, 2 slots
    per pool, free ports). Returns the gateway's URL, the config path and the process.
    mtls: the gateway reaches the pools over mutual TLS (a test CA; pools require the gateway's
    client certificate by name); the client-facing front stays cleartext. auth: gateway.auth."""
    pool_tls: dict = {}
    upstream_tls: dict = {}
    if mtls:
        from tests.tlsutil import TestPKI

        pki = TestPKI(tmp / "pki")
        cert, key = pki.issue("pool")
        client_cert, client_key = pki.issue("gateway-client", ("meshgate-gateway",), server=False, client=True)
        pool_tls = {"tls": {"cert_file": cert, "key_file": key, "client_ca_file": pki.ca_file,
                            "require_client_cert": True, "allowed_client_names": ["meshgate-gateway"]}}
        upstream_tls = {"tls": {"ca_file": pki.ca_file, "cert_file": client_cert, "key_file": client_key}}
    pools = []
    for s in MESH_SITES:
        # A pool refuses a request (the gateway then tries the next) past 50 ms of predicted wait:
        # the tiny model decodes fast, so a "saturated" pool frees within a second.
        p = tiny_pool(f"{s['id']}-1", free_port(), str(tmp / "cache"), max_num_seqs=2, num_threads=1,
                      refuse_queue_wait_s=0.05)
        p.update(site=s["id"], url=f"{'https' if mtls else 'http'}://127.0.0.1:{free_port()}",
                 emulate_rtt_ms=MESH_RTT_MS[s["id"]], **pool_tls)
        pools.append(p)
    port = free_port()
    cfg = tmp / "mesh.yaml"
    cfg.write_text(yaml.safe_dump({
        "gateway": {"site": "fra", "port": port, "routing": "latency", "upstream": upstream_tls,
                    **({"auth": auth} if auth else {}),
                    "probe": {"period_s": probe_s, "timeout_s": 1.0, "down_after": 2, "up_after": 1}},
        "sites": MESH_SITES, "pools": pools}))
    proc = Proc(["up", "--config", str(cfg)], ready_marker="meshgate is up", timeout_s=180)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            import httpx

            return httpx.get(url + "/ready").status_code == 200
        except Exception:
            return False

    if not wait_until(ready, timeout_s=30):
        proc.stop()
        raise RuntimeError("the mesh did not become ready:\n" + proc.log())
    return url, cfg, proc
