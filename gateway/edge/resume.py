"""Streams that outlive their pool (issue 17): stall detection, and continuation on another pool.

Guard (the forwarder's AttemptGuard): before the first byte, an attempt on a streaming request waits
at most first_byte_factor x the pool's predicted TTFT (within a floor and a cap), and, while other
pools remain, at most half of what the deadline leaves; an attempt on a pool that is marked down
meanwhile (probes missed, breaker opened, load stream lost: Pool.went_down) gives up at once.

ResumableStream (what a front relays: relay(sink), pushed from the pool connection's callback like
Upstream.relay; chunks() for the gRPC front): the pool's stream as the client should see it. It keeps what
went to the client (text; for meshgate pools the token ids, which the worker adds to each chunk when
asked: wire.TOKEN_IDS_HEADER) and watches the stream: no chunk for the stall bound (stall_factor x
the pool's per-stream token interval, from its load report, within a floor and a cap), or its pool
marked down, cuts it. A cut, a broken connection or an error event from the pool is then continued
on the next pool under the same constraints (model, residency, key; the cut pools avoided): a meshgate
pool gets the output token ids as its own earlier output (worker/resume.py), so the text goes on
exactly; a `kind: openai` pool gets the best the API allows (completions: prompt + text so far; chat:
the partial answer as a final assistant message with vLLM's continue_final_message) — best effort,
its tokenization of the join may differ. Continuation chunks are rewritten to the first pool's id and
created time (and a chat chunk's repeated role dropped), so the client sees one stream. At most
max_resumes per request, within its deadline; usage comes from the last pool (a meshgate pool counts
the prompt once and every completion token), one usage-log record names every pool.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from gateway.config import ResilienceConfig
from gateway.core.errors import APIError, InternalError
from gateway.core.wire import RESUME_FIELD, TOKEN_IDS_FIELD, TOKEN_IDS_HEADER
from gateway.edge.forward import Call, Forwarder, Sink, StreamBroken, Upstream
from gateway.edge.metering import RequestMeter
from gateway.pools.upstream import Pool
from gateway.routing.framework import Predictor

log = logging.getLogger("meshgate.gateway")

_IDS = b',"' + TOKEN_IDS_FIELD.encode() + b'":['
_IDS_RE = re.compile(re.escape(_IDS) + rb"[0-9,]*\]")  # the worker writes it compact, last in its chunk
_KEEP_BYTES = 64 * 1024  # relayed bytes a stream keeps unparsed before one bulk parse folds them
DONE = b"data: [DONE]\n\n"
_QUEUE_HIGH = 64 * 1024  # chunks(): bytes queued for a consumer that has fallen behind


def _clamp(v: float, lo: float, hi: float) -> float:
    return lo if v < lo else hi if v > hi else v


class _Watch:
    """Fires once when its pool is marked down: expires the attempt's first-byte timer."""

    __slots__ = ("pool", "timer", "reason")

    def __init__(self, pool: Pool, timer: asyncio.Timeout):
        self.pool, self.timer = pool, timer
        self.reason: str | None = None
        pool.down_watchers.add(self._down)

    def _down(self, why: str) -> None:
        if self.reason is None:
            try:
                self.timer.reschedule(asyncio.get_running_loop().time())
            except RuntimeError:  # the attempt is over already (this very failure marked the pool down)
                return
            self.reason = f"pool marked down ({why})"

    def stop(self) -> None:
        self.pool.down_watchers.discard(self._down)


class Guard:
    """The stall and pool-down policy (Forwarder.guard) and the stall bound of a stream."""

    def __init__(self, cfg: ResilienceConfig, predictor: Predictor | None):
        self.cfg = cfg
        self.predictor = predictor

    def first_byte_s(self, call: Call, pool: Pool, wait_s: float, last: bool) -> float:
        if not call.stream or call.whole:  # a whole answer's client waits for all of it: only the watch
            return wait_s
        cfg = self.cfg
        bound = cfg.first_byte_cap_s
        predicted = self._predicted_s(call, pool)
        if predicted is not None:
            bound = _clamp(cfg.first_byte_factor * predicted, cfg.first_byte_floor_s, cfg.first_byte_cap_s)
        if not last:  # other pools remain: spend the deadline trying them, not waiting on this one
            bound = min(bound, max(call.deadline - time.monotonic(), 0.0) / 2)
        return min(wait_s, bound)

    def _predicted_s(self, call: Call, pool: Pool) -> float | None:
        pid = pool.endpoint.pool_id
        if call.decision is not None and pid in call.decision.predicted_ms:
            return float(call.decision.predicted_ms[pid]) / 1000
        if self.predictor is not None:
            return self.predictor.predict_s(call.route, pool.endpoint)
        return None

    def watch(self, pool: Pool, timer: asyncio.Timeout) -> _Watch:
        return _Watch(pool, timer)

    def stall_s(self, pool: Pool, observed_gap_s: float) -> float:
        """How long a stream on this pool may go without a chunk: stall_factor x the per-stream token
        interval (the pool's running streams over its decode tokens/s; at least the mean gap seen)."""
        cfg = self.cfg
        load = pool.endpoint.load
        itl = observed_gap_s
        if load is not None and load.decode_tps > 0:
            itl = max(itl, max(load.running, 1) / load.decode_tps)
        if itl <= 0:
            return cfg.stall_cap_s
        return _clamp(cfg.stall_factor * itl, cfg.stall_floor_s, cfg.stall_cap_s)

    def alive(self, pool: Pool) -> bool:
        """The pool's load stream is up and spoke within the stall floor: its process runs (a
        SIGSTOPped or dead one falls silent). Its slow stream is then load, not a stall, and is
        only cut at stall_cap_s (a wedged engine under a live event loop)."""
        e = pool.endpoint
        return e.load_pushed and time.monotonic() - e.load_at < self.cfg.stall_floor_s


class _StallWatch:
    """Cuts a stream (Response.abort) that stalls or whose pool is marked down. One timer a
    stream, checked at the bound; it reads the time of the pool's last read off the Upstream, so
    the relay's per-token path does nothing for it."""

    def __init__(self, guard: Guard, up: Upstream):
        self.guard, self.up = guard, up
        self.loop = asyncio.get_running_loop()
        self.start = time.monotonic()
        self.reason: str | None = None  # stalled / down, once it fired
        self.pool = up.pool
        self.pool.down_watchers.add(self._down)
        self.handle = self.loop.call_later(self._bound(), self._check)

    def _bound(self) -> float:
        n = self.up.num_reads
        mean_gap = (self.up.last_read - self.start) / n if n else 0.0
        return self.guard.stall_s(self.pool, max(mean_gap, 0.0))

    def _check(self) -> None:
        tight = self._bound()
        if self.up.behind:  # not reading: the client is slow, which is not the pool's fault
            self.handle = self.loop.call_later(tight, self._check)
            return
        gap = time.monotonic() - max(self.up.last_read, self.start)
        bound = self.guard.cfg.stall_cap_s if self.guard.alive(self.pool) else tight
        if gap >= bound:
            self._cut("stalled", f"no token for {gap:.2f} s (bound {bound:.2f} s)")
        else:  # looked at again within the tight bound: the pool may fall silent meanwhile
            self.handle = self.loop.call_later(max(min(bound - gap, tight), 0.05), self._check)

    def _down(self, why: str) -> None:
        self._cut("down", f"pool marked down ({why})")

    def _cut(self, kind: str, detail: str) -> None:
        if self.reason is None:
            self.reason = kind
            log.info("request %s: stream on pool %s cut: %s", self.up.call.request_id, self.up.pool_id, detail)
            self.up.resp.abort(detail)

    def stop(self) -> None:
        self.handle.cancel()
        self.pool.down_watchers.discard(self._down)


class _Tracker:
    """The Sink a resumable stream relays through (Upstream.relay): passes the pool's events to the
    client's sink and keeps what a continuation needs — text, token ids, the stream's id.

    Cheap while nothing is cut: the first pool's events (whole, from the meter) are passed on as
    they came, token ids cut off by one regex substitution when there are any, and the bytes kept
    unparsed; they are parsed (fold) only when the stream is cut, or in one bulk parse each
    _KEEP_BYTES for a long stream. Errors and [DONE] are the meter's to see (RequestMeter with
    hold_errors: an error event is held back there, the stream may yet go on elsewhere). After a
    continuation every event is parsed: its id and created are rewritten to the first pool's, and a
    chat chunk's repeated role is dropped."""

    def __init__(self, meter: RequestMeter | None) -> None:
        self.meter = meter
        self.sink: Sink | None = None  # the client's (set by ResumableStream.relay)
        self.kept: list[bytes] = []  # relayed, not parsed yet
        self.kept_bytes = 0
        self.buf = b""  # an event not yet whole
        self.text: list[str] = []
        self.ids: list[int] = []
        self.ids_complete = True  # every chunk with text came with its token ids
        self.num_chunks = 0  # chunks with content (a token each, roughly: for openai pools' max_tokens)
        self.head: tuple[Any, Any] | None = None  # (id, created) of the first chunk
        self.finish_reason: str | None = None
        self.parsing = meter is None  # parse each event as it passes (after a join; with no meter to see errors)
        self._done = False  # [DONE] went by (parsing)
        self._error: bytes | None = None  # an error event from the pool, held back (parsing, no meter)
        self.cut_at: float | None = None  # monotonic: the last chunk before a cut, until the next one went out
        self.join_gaps_s: list[float] = []  # client-visible: the last chunk before a cut to the next one

    @property
    def done(self) -> bool:
        return self._done or (self.meter is not None and self.meter.done)

    @property
    def error(self) -> bytes | None:
        return self._error if self._error is not None or self.meter is None else self.meter.held

    # -- Sink -------------------------------------------------------------------------------
    def push(self, data: bytes) -> bool:
        assert self.sink is not None
        if self.parsing:
            if not (data := self._take(data)):
                return False
            if self.cut_at is not None:
                self.join_gaps_s.append(time.monotonic() - self.cut_at)
                self.cut_at = None
            return self.sink.push(data)
        self.kept.append(data)
        self.kept_bytes += len(data)
        if self.kept_bytes > _KEEP_BYTES:
            self.fold()
        return self.sink.push(_IDS_RE.sub(b"", data) if _IDS in data else data)

    async def drained(self) -> None:
        assert self.sink is not None
        await self.sink.drained()

    # -- bookkeeping ------------------------------------------------------------------------
    def fold(self) -> None:
        """Parse the kept bytes into text, ids, head and finish reason (one bulk parse)."""
        if not self.kept:
            return
        data = self.buf + b"".join(self.kept)
        self.kept.clear()
        self.kept_bytes = 0
        end = data.rfind(b"\n\n")
        if end < 0:
            self.buf = data
            return
        self.buf = data[end + 2:]
        payloads = [ev[5:].strip() for ev in data[:end].split(b"\n\n") if ev.startswith(b"data:")]
        payloads = [p for p in payloads if p and p != b"[DONE]"]
        try:
            objs = orjson.loads(b"[" + b",".join(payloads) + b"]") if payloads else []
        except orjson.JSONDecodeError:  # one odd event: each on its own, the odd one skipped
            objs = [_loads(p) for p in payloads]
        for obj in objs:
            if isinstance(obj, dict) and "error" not in obj:
                self._note(obj)

    def _take(self, data: bytes) -> bytes:
        buf = self.buf + data if self.buf else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.buf = buf
            return b""
        self.buf = buf[end + 2:]
        out = [e for ev in buf[:end].split(b"\n\n") if (e := self._event(ev)) is not None]
        return b"\n\n".join(out) + b"\n\n" if out else b""

    def _event(self, ev: bytes) -> bytes | None:
        if not ev.startswith(b"data:"):
            return ev
        payload = ev[5:].strip()
        if payload == b"[DONE]":
            self._done = True
            return None if self._error is not None else ev
        if self._error is not None:
            return None
        obj = _loads(payload)
        if not isinstance(obj, dict):
            return ev
        if "error" in obj:
            self._error = ev  # held: the stream may yet go on elsewhere
            return None
        self._note(obj)
        if self.head is not None:
            obj["id"], obj["created"] = self.head
        for c in obj.get("choices") or ():
            if isinstance(c, dict) and isinstance(c.get("delta"), dict):
                c["delta"].pop("role", None)
        return b"data: " + orjson.dumps(obj)

    def _note(self, obj: dict[str, Any]) -> None:
        """What one chunk adds to the answer (its token ids field is removed from obj)."""
        if self.head is None:
            self.head = (obj.get("id"), obj.get("created"))
        ids = obj.pop(TOKEN_IDS_FIELD, None)
        text = ""
        for c in obj.get("choices") or ():
            if not isinstance(c, dict):
                continue
            delta = c.get("delta")
            t = delta.get("content") if isinstance(delta, dict) else c.get("text")
            if isinstance(t, str) and t:
                text += t
            if c.get("finish_reason"):
                self.finish_reason = c["finish_reason"]
        if text:
            self.text.append(text)
            self.num_chunks += 1
        if isinstance(ids, list):
            self.ids.extend(ids)
        elif text:
            self.ids_complete = False

    def rejoin(self) -> None:
        """A continuation goes on from here: from now on every event is parsed (and rewritten)."""
        self.fold()
        self.buf = b""
        self._error = None
        self._done = False
        self.parsing = True


def _loads(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


class ResumableStream:
    """A client's stream across pools. relay(sink) (or chunks()) for the client; close() once, in a finally."""

    def __init__(self, fwd: Forwarder, guard: Guard, cfg: ResilienceConfig, up: Upstream):
        self.fwd, self.guard, self.cfg = fwd, guard, cfg
        self.up = up
        self.call = up.call
        meter = self.call.meter if isinstance(self.call.meter, RequestMeter) else None
        if meter is not None:
            meter.hold_errors = True  # an error event waits: the stream may go on elsewhere
        self.track = _Tracker(meter)
        self.num_resumes = 0

    @property
    def join_gaps_s(self) -> list[float]:
        return self.track.join_gaps_s

    async def relay(self, sink: Sink) -> None:
        """The stream to sink, across pools (Upstream.relay: pushed from the pool connection's
        callback, flow-controlled). The client going away raises ConnectionResetError."""
        track = self.track
        track.sink = sink
        while True:
            up = self.up
            watch = _StallWatch(self.guard, up)
            reason = "broken"
            try:
                await up.relay(track)
                if track.done and track.error is None:
                    return
                reason = "error" if track.error is not None else "broken"
            except StreamBroken:
                pass
            finally:
                watch.stop()
            reason = watch.reason or reason
            track.fold()
            if track.finish_reason is not None and track.error is None:
                await _push(sink, DONE)  # the answer was whole; only its end was lost
                return
            track.cut_at = up.last_read
            if not await self._resume(reason):
                await _push(sink, self._failure())
                return

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """relay(), as an async iterator of the client's bytes (the gRPC front): the relay runs in
        a task into a bounded queue; closing the iterator cancels it."""
        q = _Queue()
        task = asyncio.ensure_future(self.relay(q))
        task.add_done_callback(lambda _: q.wake())
        try:
            while True:
                if q.items:
                    yield q.take()
                elif task.done():
                    task.result()  # its exception, if any
                    return
                else:
                    await q.wait()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _failure(self) -> bytes:
        if self.track.error is not None:
            return self.track.error + b"\n\n" + DONE
        err = InternalError("the pool failed mid-stream; the response is incomplete")
        err.type = "upstream_error"
        return b"data: " + orjson.dumps(err.body()) + b"\n\n" + DONE

    async def _resume(self, reason: str) -> bool:
        """Open the continuation on the next pool; False when none may or can take it."""
        old, call = self.up, self.call
        series = self.fwd.m.child(self.fwd.m.resumes, old.pool_id, reason, "failed")
        if not self.cfg.resume or self.num_resumes >= self.cfg.max_resumes or time.monotonic() >= call.deadline:
            series.inc()
            return False
        body = self._body(old)
        if body is None:
            series.inc()
            return False
        avoid = call.avoid | {p for p in (*call.resumed_from, old.pool_id)}
        shadow = Call(path=call.path, body=body, stream=True, route=call.route, headers=call.headers,
                      request_id=call.request_id, arrival=time.monotonic(), deadline=call.deadline,
                      principal=call.principal, priority=call.priority, avoid=frozenset(avoid), whole=call.whole)
        shadow.finished = True  # bookkeeping stays with the client's Call
        try:
            new = await self.fwd.open(shadow)
        except (APIError, StreamBroken) as e:
            log.warning("request %s: no pool could continue the stream cut on %s (%s)", call.request_id,
                        old.pool_id, e)
            series.inc()
            return False
        if new.status >= 400:
            new.close(finish=False)
            series.inc()
            return False
        new.call = call  # from here on, the client's request: its meter, its finish
        self.num_resumes += 1
        call.resumed_from = (*call.resumed_from, old.pool_id)
        old.close(finish=False)
        if call.meter is not None:
            call.meter.rejoin()
        self.track.rejoin()
        self.up = new
        self.fwd.m.child(self.fwd.m.resumes, old.pool_id, reason, "continued").inc()
        log.info("request %s: stream cut on %s (%s) continues on %s after %d chunks", call.request_id,
                 old.pool_id, reason, new.pool_id, self.track.num_chunks)
        return True

    def _body(self, old: Upstream) -> bytes | None:
        """The continuation's request body; None when it cannot be built."""
        try:
            obj = orjson.loads(self.call.body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        t = self.track
        text = "".join(t.text)
        # A meshgate pool takes the original request and the output so far from this field, and
        # continues exactly from there; a third-party pool ignores it and reads the rest of the
        # body, rewritten below as the best the OpenAI API allows.
        resume: dict[str, Any] = {"output_token_ids": t.ids} if t.ids_complete and t.ids else {"text": text}
        resume["request"] = dict(obj)
        obj[RESUME_FIELD] = resume
        max_tokens = obj.get("max_tokens") or obj.get("max_completion_tokens")
        if isinstance(max_tokens, int) and text:
            left = max(max_tokens - t.num_chunks, 1)
            obj["max_tokens" if "max_tokens" in obj else "max_completion_tokens"] = left
        if text:
            if isinstance(obj.get("prompt"), str):
                obj["prompt"] += text
            elif isinstance(obj.get("messages"), list):
                obj["messages"] = [*obj["messages"], {"role": "assistant", "content": text}]
                obj["continue_final_message"], obj["add_generation_prompt"] = True, False
        return orjson.dumps(obj)

    # What a front reads of an Upstream, for the pool answering now.
    @property
    def status(self) -> int:
        return self.up.status

    @property
    def pool_id(self) -> str:
        return self.up.pool_id

    @property
    def route(self) -> str:
        return self.up.route

    @property
    def first(self) -> bytes:
        return self.up.first

    def close(self) -> None:
        self.up.close()


class _Queue:
    """chunks()'s Sink: a bounded queue between the relay and its reader."""

    def __init__(self) -> None:
        self.items: deque[bytes] = deque()
        self.size = 0
        self._ready: asyncio.Future[None] | None = None  # the reader waits for items
        self._space: asyncio.Future[None] | None = None  # the relay waits for the reader

    def push(self, data: bytes) -> bool:
        self.items.append(data)
        self.size += len(data)
        self.wake()
        return self.size > _QUEUE_HIGH

    async def drained(self) -> None:
        while self.size > _QUEUE_HIGH:
            self._space = asyncio.get_running_loop().create_future()
            await self._space

    def take(self) -> bytes:
        data = b"".join(self.items)
        self.items.clear()
        self.size = 0
        if self._space is not None and not self._space.done():
            self._space.set_result(None)
        return data

    def wake(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def wait(self) -> None:
        self._ready = asyncio.get_running_loop().create_future()
        try:
            await self._ready
        finally:
            self._ready = None


async def _push(sink: Sink, data: bytes) -> None:
    if sink.push(data):
        await sink.drained()


def ask_for_token_ids(call: Call) -> None:
    """Streams that may be continued ask meshgate pools for each chunk's token ids."""
    call.headers[TOKEN_IDS_HEADER] = "1"

