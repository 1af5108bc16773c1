"""Usage metering: each request's prompt and completion tokens, counted once, when it ends.

For streams the gateway asks the pool for `stream_options.include_usage` (and removes the usage
chunk again when the client did not ask for it), so a complete stream is metered with the pool's
own count. A stream cut short (by the client or the pool) never gets that chunk: it is metered with
what passed so far: one completion token per content chunk (pools send a chunk per decode step) and
the prompt estimate (chars/4). Non-stream answers carry `usage`.

The end of a request (Call.finish, from Upstream.close or a failed Forwarder.open) settles the
key's tokens/min bucket with the real count, counts Prometheus counters and appends one line to the
usage log.
"""
from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from gateway.edge.admission import Ticket
from gateway.edge.metrics import GatewayMetrics
from gateway.edge.usage_log import UsageLog
from gateway.edge.usage_window import UsageWindow
from gateway.config import UsageLogConfig
from gateway.core.protocol import GenerationRequest
from gateway.core.types import RouteRequest

if TYPE_CHECKING:
    from gateway.edge.forward import Call, Upstream

log = logging.getLogger("meshgate.usage")

# SSE events end with a blank line; pools may use any of the three line endings.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_NULL_USAGE = re.compile(rb',"usage":null|"usage":null,')


def estimate_prompt_tokens(g: GenerationRequest, prompt_chars: int) -> int:
    """About 4 characters a token for text; token-id prompts are exact."""
    return math.ceil(prompt_chars / 4) + len(g.prompt_token_ids or ())


class Metering:
    def __init__(self, cfg: UsageLogConfig, metrics: GatewayMetrics, window: UsageWindow | None = None,
                 worker_index: int = 0):
        self.log = UsageLog(cfg, worker_index)  # a file per gateway process: see usage_log
        self.m = metrics
        self.window = window or UsageWindow()  # recent usage by key, model and priority: GET /v1/meshgate/usage
        # told each pool-reported prompt_tokens (the chars-to-tokens ratio: gateway/edge/prefix_routing.py)
        self.on_usage: Callable[[RouteRequest, int], None] | None = None

    async def start(self) -> None:
        await self.log.start()

    async def close(self) -> None:
        await self.log.close()

    def track(self, ticket: Ticket, g: GenerationRequest, body: bytes, request_id: str,
              prompt_estimate: int) -> tuple[bytes, RequestMeter]:
        """The body to send upstream, and the meter to put on the request's Call."""
        strip = False
        if g.kind == "responses":  # its stream always ends with the whole response, usage included
            return body, ResponsesMeter(self, ticket, g.model, request_id, prompt_estimate, False)
        if g.stream and not g.include_usage:
            body, strip = _ask_usage(body)
        return body, RequestMeter(self, ticket, g.model, request_id, prompt_estimate, strip)

    def record(self, meter: RequestMeter, pool: str, status: str, prompt: int, completion: int) -> None:
        key, m = meter.ticket.key_id or "", self.m
        if prompt:
            m.child(m.usage_prompt, key, meter.model, pool).inc(prompt)
        if completion:
            m.child(m.usage_completion, key, meter.model, pool).inc(completion)
        m.child(m.usage_requests, key, meter.model, pool, status).inc()
        self.window.add(key, meter.model, meter.ticket.priority or "", prompt, completion)
        self.log.append({"ts": round(time.time(), 3), "request_id": meter.request_id, "key": meter.ticket.key_id,
                         "model": meter.model, "pool": pool or None, "prompt_tokens": prompt,
                         "completion_tokens": completion, "status": status})


class RequestMeter:
    """Watches one request's stream (feed) and meters it once it ends (finish): the Call's meter."""

    __slots__ = ("metering", "ticket", "model", "request_id", "prompt_estimate", "strip", "_buf", "done",
                 "errored", "chunks", "usage", "hold_errors", "held")

    def __init__(self, metering: Metering, ticket: Ticket, model: str, request_id: str, prompt_estimate: int,
                 strip: bool):
        self.metering = metering
        self.ticket = ticket
        self.model = model
        self.request_id = request_id
        self.prompt_estimate = prompt_estimate
        self.strip = strip  # the client did not ask for usage: remove what we asked the pool for
        self._buf = b""  # an event not yet complete
        self.done = False  # the pool's [DONE] went by
        self.errored = False  # the pool put an error event in the stream
        self.chunks = 0  # content chunks seen
        self.usage: tuple[int, int] | None = None  # (prompt, completion) from the pool's usage chunk
        # A stream that may go on on another pool (edge/resume.py): the pool's error event is held
        # here, not passed on, and nothing after it is; the stream's relay decides what the client sees.
        self.hold_errors = False
        self.held: bytes | None = None

    # -- streams ------------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> bytes:
        """Take bytes from the pool; return whole events to pass on (possibly fewer than came)."""
        if self.held is not None:  # after an error held back, nothing goes on; only the end is noted
            self.done = self.done or b"[DONE]" in chunk
            return b""
        if not self._buf and chunk.endswith(b"\n\n"):
            whole = chunk  # the usual read: whole LF-ended events (a CR or CRLF pool's never end so)
        else:
            buf = self._buf + chunk if self._buf else chunk
            if b"\r" in buf:  # CR line ends (rare): the general parser
                parts = _EVENT_END.split(buf)
                self._buf = parts.pop()
                return self._events(parts)
            end = buf.rfind(b"\n\n") + 2
            if end < 2:
                self._buf = buf  # no whole event yet
                return b""
            self._buf = buf[end:]
            whole = buf[:end] if self._buf else buf
        if self.strip:
            # Compact JSON cannot hold this byte sequence inside a string (its quotes would be escaped),
            # so removing it from the whole read at once is safe; a leading-position field is left
            # for the per-event path below.
            whole = whole.replace(b',"usage":null', b"")
        # A read may hold many events (one per decode step); only the rare ones (usage, error, the
        # end) need a look of their own, from the first of them on. Almost every read is a token
        # or a few: passed on as they came, after three substring scans and a count.
        # A chunk of a stream that asked for usage carries "usage":null (OpenAI's, vLLM's, ours):
        # that is not the usage chunk, and is not parsed.
        if (b'"usage"' not in whole or whole.count(b'"usage"') == whole.count(b'"usage":null')) and (
                b"[DONE]" not in whole and b'"error"' not in whole):
            self.chunks += whole.count(b"\n\ndata:") + whole.startswith(b"data:")
            return whole
        rare = _first_rare(whole)
        start = whole.rfind(b"\n\n", 0, rare)
        cut = start + 2 if start >= 0 else 0  # where the event holding it begins
        head = whole[:cut]
        self.chunks += head.count(b"\n\ndata:") + head.startswith(b"data:")
        return head + self._events(whole[cut:].split(b"\n\n")[:-1])

    def _events(self, parts: list[bytes]) -> bytes:
        out = [kept + b"\n\n" for ev in parts if (kept := self._event(ev)) is not None]
        return b"".join(out)

    def rejoin(self) -> None:
        """A cut stream goes on from another pool (edge/resume.py): the cut pool's unfinished event
        is dropped, and its error event (held back from the client) no longer counts."""
        self._buf = b""
        self.errored = self.done = False
        self.held = None

    def tail(self) -> bytes:
        """At the stream's end: bytes of an event never terminated, passed on as they are."""
        rest, self._buf = self._buf, b""
        return rest

    def _event(self, ev: bytes) -> bytes | None:
        """Note what one event says; return it (possibly rewritten), or None to drop it."""
        if self.held is not None:  # after an error held back (hold_errors)
            self.done = self.done or ev[5:].strip() == b"[DONE]"
            return None
        if not ev.startswith(b"data:"):
            return ev  # comments, keep-alives
        if self.strip and b'"usage":null' in ev:
            ev = _NULL_USAGE.sub(b"", ev, count=1)  # the field OpenAI adds to every chunk asked for usage
        if (b'"usage"' in ev and b'"usage":null' not in ev) or b'"error"' in ev:
            return self._parse(ev, ev[5:].strip())
        if ev[5:].strip() == b"[DONE]":
            self.done = True
            return ev
        self.chunks += 1
        return ev

    def _parse(self, ev: bytes, payload: bytes) -> bytes | None:
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return ev
        if not isinstance(obj, dict):
            return ev
        if "error" in obj:
            self.errored = True
            if self.hold_errors:
                self.held = ev
                return None
            return ev
        use = obj.get("usage")
        if isinstance(use, dict):
            self.usage = _counts(use)
        if not self.strip:
            if obj.get("choices"):
                self.chunks += 1
            return ev
        if not obj.get("choices"):
            return None  # the usage-only chunk the client did not ask for
        self.chunks += 1
        obj.pop("usage", None)
        return b"data: " + orjson.dumps(obj)

    # -- the end ------------------------------------------------------------------------------
    def finish(self, call: Call, up: Upstream | None) -> None:
        """Called once (Call.finish): settle the key's limits, count, log."""
        used: int | None = None  # None: keep the estimate admission charged
        try:
            status, prompt, completion = self._outcome(call, up)
            used = prompt + completion
            pool = up.pool_id if up is not None else ""
            if call.resumed_from:  # a continued stream: one record naming every pool that served it
                pool = ",".join((*call.resumed_from, pool))
            self.metering.record(self, pool, status, prompt, completion)
            if self.usage is not None and status != "error" and self.metering.on_usage is not None:
                self.metering.on_usage(call.route, self.usage[0])
        finally:  # the key's slot comes back even when counting or logging fails
            self.ticket.settle(used)

    def _outcome(self, call: Call, up: Upstream | None) -> tuple[str, int, int]:
        if up is None or up.status >= 400:
            return "error", 0, 0  # the pool did no work we bill for
        if not call.stream:
            use = self.usage = _usage_of(up.first)
            if use is None:
                log.warning("request %s: pool %s answered without usage; metering an estimate",
                            self.request_id, up.pool_id)
                return "complete", self.prompt_estimate, 0
            return "complete", *use
        status = "complete" if self.done and not self.errored else "cut_short"
        if self.usage is not None:
            return status, *self.usage
        return status, self.prompt_estimate, self.chunks


class ResponsesMeter(RequestMeter):
    """A Responses API stream: typed events (`event: ...` then `data: {...}`), no [DONE]; it is
    complete at response.completed (or .incomplete), whose response carries the usage."""

    __slots__ = ()

    def feed(self, chunk: bytes) -> bytes:
        buf = self._buf + chunk if self._buf else chunk
        ends = list(_EVENT_END.finditer(buf))
        if not ends:
            self._buf = buf
            return b""
        whole, self._buf = buf[:ends[-1].end()], buf[ends[-1].end():]
        for ev in _EVENT_END.split(whole)[:-1]:
            self._note(ev)
        return whole  # passed on as the pool sent it

    def _note(self, ev: bytes) -> None:
        data = b"".join(line[5:].strip() for line in ev.splitlines() if line.startswith(b"data:"))
        if b".delta" in data[:80]:
            self.chunks += 1  # an output delta: counted in case the stream is cut short
            return
        if not any(t in data for t in (b"response.completed", b"response.incomplete", b"response.failed",
                                       b'"error"')):
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind in ("response.completed", "response.incomplete"):
            self.done = True
            use = (obj.get("response") or {}).get("usage")
            if isinstance(use, dict):
                self.usage = _counts(use)
        elif kind in ("response.failed", "error"):
            self.errored = True


def _ask_usage(body: bytes) -> tuple[bytes, bool]:
    """The body with stream_options.include_usage set, and whether it was changed. Without a
    stream_options field the field is appended, so the client's bytes reach the pool as they came;
    with one, the body is encoded anew."""
    if b'"stream_options"' not in body:
        head = body.rstrip()
        if head.endswith(b"}"):
            return head[:-1] + b',"stream_options":{"include_usage":true}}', True
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:  # a front that sends another encoding: count chunks instead
        return body, False
    if not isinstance(obj, dict):
        return body, False
    obj["stream_options"] = {**(obj.get("stream_options") or {}), "include_usage": True}
    return orjson.dumps(obj), True


def _first_rare(whole: bytes) -> int:
    """Where the first usage object, error or [DONE] is in whole (-1: none)."""
    usage = whole.find(b'"usage"')
    while usage >= 0 and whole.startswith(b":null", usage + 7):  # a chunk's "usage":null is not the usage
        usage = whole.find(b'"usage"', usage + 7)
    found = [i for i in (usage, whole.find(b'"error"'), whole.find(b"[DONE]")) if i >= 0]
    return min(found) if found else -1


def _counts(use: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) of a usage object: chat/completions/embeddings name them prompt_ and
    completion_tokens, the Responses API input_ and output_tokens."""
    p = use.get("prompt_tokens", use.get("input_tokens"))
    c = use.get("completion_tokens", use.get("output_tokens"))
    return (p if isinstance(p, int) else 0), (c if isinstance(c, int) else 0)


def _usage_of(body: bytes) -> tuple[int, int] | None:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    use = obj.get("usage") if isinstance(obj, dict) else None
    return _counts(use) if isinstance(use, dict) else None
