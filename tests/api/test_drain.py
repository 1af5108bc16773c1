"""SIGTERM drains the gateway: no new connections, in-flight streams finish, then a clean exit."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
import yaml

from tests.servers import Proc, free_port


def test_sigterm_finishes_in_flight_streams_then_exits(tmp_path):
    stub_port, gw_port = free_port(), free_port()
    stub = subprocess.Popen([sys.executable, "-m", "tests.stub_pool", "--port", str(stub_port), "--tokens", "30",
                             "--delay-s", "0.05"], stdout=subprocess.PIPE, text=True)
    try:
        assert "listening" in stub.stdout.readline()
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(yaml.safe_dump({
            "gateway": {"port": gw_port, "drain_timeout_s": 10},
            "pools": [{"id": "s", "url": f"http://127.0.0.1:{stub_port}", "models": ["m"]}]}))
        gw = Proc(["serve", "--config", str(cfg)])
        url = f"http://127.0.0.1:{gw_port}"
        events: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=20) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(10)
        gw.p.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            httpx.get(url + "/health", timeout=2)
            refused = False
        except httpx.TransportError:
            refused = True
        t.join(20)
        assert gw.wait(20) == 0, gw.log()
        assert refused, "the gateway still accepted connections while draining"
        assert events[-1] == "data: [DONE]" and len(events) == 31  # the whole stream arrived
        assert "stopping: draining" in gw.log()
    finally:
        stub.terminate()
        stub.wait(5)
