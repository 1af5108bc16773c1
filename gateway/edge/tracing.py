"""Request tracing (OpenTelemetry, OTLP export) and the structured access log.

Tracing is off by default and then costs nothing: OpenTelemetry is not even imported, and a
client's W3C `traceparent` is passed to the pool unchanged. When on, each request gets a server
span, a child of the client's context; the pool receives the span's own traceparent.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from gateway.config import TracingConfig

if TYPE_CHECKING:
    from gateway.edge.forward import Call, Upstream

access_log = logging.getLogger("meshgate.access")
TRACE_HEADERS = ("traceparent", "tracestate")


class Tracing:
    def __init__(self, cfg: TracingConfig, exporter: Any = None):
        """exporter: an OpenTelemetry SpanExporter to use instead of OTLP (tests)."""
        self.cfg = cfg
        self._tracer: Any = None
        self.provider: Any = None
        if cfg.enabled:
            self._setup(exporter)

    def _setup(self, exporter: Any) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        self.provider = TracerProvider(resource=Resource.create({"service.name": self.cfg.service_name}),
                                       sampler=ParentBased(TraceIdRatioBased(self.cfg.sample_ratio)))
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=self.cfg.otlp_endpoint)))
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self._tracer = self.provider.get_tracer("meshgate.gateway")

    def start(self, name: str, headers: Any, upstream_headers: dict[str, str]) -> Any:
        """Open the request's span (None when tracing is off) and set the trace headers the pool
        gets in upstream_headers."""
        if self._tracer is None:
            for h in TRACE_HEADERS:
                if h in headers:
                    upstream_headers[h] = headers[h]
            return None
        from opentelemetry import trace
        from opentelemetry.propagate import extract, inject

        parent = extract({h: headers[h] for h in TRACE_HEADERS if h in headers})
        span = self._tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER)
        inject(upstream_headers, context=trace.set_span_in_context(span))
        return span

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def end_request(call: Call, up: Upstream | None, status: int) -> None:
    """Close the request's span and write its access-log line (once, from Call.finish)."""
    if call.span is None and not access_log.isEnabledFor(logging.INFO):
        return
    now = time.monotonic()
    fields: dict[str, Any] = {
        "request_id": call.request_id, "path": call.path, "model": call.route.model, "stream": call.stream,
        "status": status, "e2e_ms": round((now - call.arrival) * 1000, 3),
    }
    if up is not None:
        fields.update(pool=up.pool_id, route=up.route, failovers=up.failovers, outcome=up.outcome,
                      ttft_ms=round(up.ttft_s * 1000, 3))
    if call.principal is not None:
        fields["key"] = call.principal.key_id
    span = call.span
    if span is not None:
        call.span = None
        for k, v in fields.items():
            span.set_attribute(f"meshgate.{k}", v)
        span.set_attribute("http.response.status_code", status)
        if status >= 500 or (up is not None and up.outcome == "broken_stream"):
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR))
        span.end()
    access_log.info("%s", orjson.dumps(fields).decode())
