"""Request bookkeeping can never leak: a meter, tracer or decision log that raises is logged and
counted, and the request's in-flight count and its key's concurrency slot still come back."""
from __future__ import annotations

import pytest

from gateway.edge import forward
from gateway.edge.admission import hash_key
from tests.api.harness import Harness, chat

KEY = "sk-bookkeeping-0123456789"
AUTH = {"enabled": True, "keys": [{"id": "k", "sha256": hash_key(KEY), "max_concurrent": 1}]}
BEARER = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def h():
    harness = Harness()
    yield harness
    await harness.stop()


def _boom(*args: object) -> None:
    raise RuntimeError("bookkeeping failed")


async def _errors(h: Harness, stage: str) -> float:
    assert h.session is not None
    async with h.session.get(h.url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(f'meshgate_bookkeeping_errors_total{{stage="{stage}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("stage", ["metering", "tracing", "decision_log"])
async def test_a_raising_bookkeeping_step_never_holds_a_slot(h, monkeypatch, stage):
    # max_in_flight 2 and one concurrent request per key: a leaked count or slot refuses the next request
    await h.start(["a"], auth=AUTH, limits={"max_in_flight": 2})
    assert h.server is not None
    if stage == "metering":
        monkeypatch.setattr(h.server.metering, "record", _boom)
    elif stage == "tracing":
        monkeypatch.setattr(forward, "end_request", _boom)
    else:
        monkeypatch.setattr(h.server.decisions, "record", _boom)
    for i in range(6):
        status, body = await h.post(chat(stream=i % 2 == 1), headers=BEARER)
        assert status == 200, body
    assert h.server.in_flight == 0
    assert await _errors(h, stage) == 6
