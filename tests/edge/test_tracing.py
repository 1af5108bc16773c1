"""Tracing and access logs: a span per request with the routing decision, W3C context in and out."""
from __future__ import annotations

import json
import logging

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.edge.tracing import Tracing
from gateway.config import TracingConfig
from tests.api.harness import Harness, chat

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"


@pytest.fixture
async def h():
    harness = Harness()
    yield harness
    await harness.stop()


async def test_span_per_request_child_of_the_client_and_propagated_to_the_pool(h):
    await h.start(["a", "b"])
    spans = InMemorySpanExporter()
    h.server.tracing = Tracing(TracingConfig(enabled=True), exporter=spans)
    h.stubs["a"].mode = "error"  # first attempt may fail over: attempts show on the span
    for _ in range(2):
        status, _ = await h.post(chat(stream=True), headers={"traceparent": TRACEPARENT})
        assert status == 200
    done = spans.get_finished_spans()
    assert len(done) == 2
    for span in done:
        assert span.context.trace_id == int(CLIENT_TRACE, 16)
        assert span.parent.span_id == int(CLIENT_PARENT, 16)
        attrs = span.attributes
        assert attrs["meshgate.pool"] == "b"
        # the routing decision as made (its first choice may have failed over to the runner-up)
        first_choice = "a" if attrs["meshgate.failovers"] else "b"
        assert f"pool={first_choice}" in attrs["meshgate.route"]
        assert attrs["meshgate.ttft_ms"] > 0
        assert attrs["http.response.status_code"] == 200
    assert any(s.attributes["meshgate.failovers"] == 1 for s in done)
    # the pool saw the gateway's span as its parent, in the client's trace
    seen = [hdrs["traceparent"] for hdrs, _ in h.stubs["b"].received]
    assert all(tp.split("-")[1] == CLIENT_TRACE for tp in seen)
    assert {tp.split("-")[2] for tp in seen} == {format(s.context.span_id, "016x") for s in done}


async def test_tracing_off_passes_the_client_context_through(h):
    await h.start(["a"])
    assert h.server.tracing.provider is None
    await h.post(chat(), headers={"traceparent": TRACEPARENT, "tracestate": "k=v"})
    hdrs, _ = h.stubs["a"].received[-1]
    assert hdrs["traceparent"] == TRACEPARENT and hdrs["tracestate"] == "k=v"


async def test_access_log_line_per_request_with_request_id(h, caplog):
    await h.start(["a"])
    with caplog.at_level(logging.INFO, logger="meshgate.access"):
        status, headers, _ = await h.request(chat(), headers={"x-request-id": "req-42"})
        await h.post({"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "meshgate.access"]
    assert len(lines) == 1  # refused before admission: no line (the request never became a Call)
    line = lines[0]
    assert line["request_id"] == "req-42"
    assert {k.lower(): v for k, v in headers.items()}["x-request-id"] == "req-42"
    assert line["status"] == 200 and line["pool"] == "a" and line["e2e_ms"] > 0
    # the id reached the pool too
    assert {k.lower(): v for k, v in h.stubs["a"].received[-1][0].items()}["x-request-id"] == "req-42"
