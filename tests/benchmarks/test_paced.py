"""The paced streaming client counts what a user would see: every event, each stream whole, twins paired."""
from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from benchmarks import gateway_paced, paced_client


def test_paced_client_counts_events_and_pairs(tmp_path: Path) -> None:
    plan = gateway_paced.PacedPlan(tokens=8, itl_ms=5.0)
    stub, url = gateway_paced.start_paced_stub(tmp_path, plan)
    try:
        body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                             "stream": True})
        res = asyncio.run(paced_client.run(url + "/v1/chat/completions", url + "/v1/chat/completions", 4, 0.6,
                                           body, timeout_s=10.0, warmup_s=0.2, ramp_s=0.05))
    finally:
        stub.stop()
    t = res["target"]
    assert t["errors"] == {} and t["num_ok"] > 0
    assert t["events"] == 9 * t["requests"]  # 8 tokens and [DONE] in every stream
    assert t["num_gaps"] == 8 * t["num_ok"]  # one gap between each pair of successive events
    assert res["added_ttft_pairs"] == t["num_ok"] == res["twin"]["num_ok"]


def test_paced_client_counts_a_refused_stream_as_an_error(tmp_path: Path) -> None:
    plan = gateway_paced.PacedPlan(tokens=4, itl_ms=1.0)
    stub, url = gateway_paced.start_paced_stub(tmp_path, plan)
    try:
        res = asyncio.run(paced_client.run(url + "/nowhere", None, 2, 0.3, b"{}", timeout_s=5.0, warmup_s=0.0,
                                           ramp_s=0.0))
    finally:
        stub.stop()
    assert res["target"]["num_ok"] == 0 and res["target"]["errors"].get("status 404", 0) > 0
