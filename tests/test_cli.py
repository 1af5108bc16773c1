"""The command line's promises that scripts rely on (DESIGN.md §8)."""
from __future__ import annotations

import subprocess

import yaml

from tests.servers import Proc, free_port, tiny_pool, wait_until


def test_the_listening_line_comes_whatever_the_log_level(tmp_path):
    """`meshgate up` (and scripts) wait for it: at --log-level WARNING it used to be dropped, and
    `up` waited for its workers forever."""
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({"gateway": {"port": free_port()},
                                   "pools": [{"id": "p", "kind": "openai", "url": "http://127.0.0.1:1", "models": ["m"]}]}))
    proc = Proc(["serve", "--config", str(cfg), "--log-level", "WARNING"], timeout_s=30)
    assert proc.stop() == 0, proc.log()
    assert any("listening http=127.0.0.1:" in line for line in proc.lines)


def test_up_stopped_while_its_first_worker_starts_stops_that_worker(tmp_path):
    """SIGTERM to `meshgate up` before the mesh is up used to kill it at once and leave its pool
    worker running (the worker takes seconds to load its model)."""
    cfg = tmp_path / "mesh.yaml"
    pool = tiny_pool("solo-1", free_port(), str(tmp_path / "cache"), max_num_seqs=1, num_threads=1)
    cfg.write_text(yaml.safe_dump({"gateway": {"port": free_port()}, "pools": [pool]}))
    proc = Proc(["up", "--config", str(cfg)], ready_marker="")
    worker = f"--config {cfg} --pool solo-1"
    assert wait_until(lambda: subprocess.run(["pgrep", "-f", "--", worker]).returncode == 0, timeout_s=30)  # started
    assert proc.stop() == 0, proc.log()
    assert "meshgate is up" not in proc.log()
    assert wait_until(lambda: subprocess.run(["pgrep", "-f", "--", worker]).returncode == 1, timeout_s=10), proc.log()
