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
