"""The command line's promises that scripts rely on (DESIGN.md §8)."""
from __future__ import annotations

import yaml

from tests.servers import Proc, free_port


def test_the_listening_line_comes_whatever_the_log_level(tmp_path):
    """`meshgate up` (and scripts) wait for it: at --log-level WARNING it used to be dropped, and
    `up` waited for its workers forever."""
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({"gateway": {"port": free_port()},
                                   "pools": [{"id": "p", "kind": "openai", "url": "http://127.0.0.1:1", "models": ["m"]}]}))
    proc = Proc(["serve", "--config", str(cfg), "--log-level", "WARNING"], timeout_s=30)
    assert proc.stop() == 0, proc.log()
    assert any("listening http=127.0.0.1:" in line for line in proc.lines)
