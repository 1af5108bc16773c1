"""Streams that outlive their pool (issue 17): stall detection, and continuation on another pool.

Guard (the forwarder's AttemptGuard): before the first byte, an attempt on a streaming request waits
at most first_byte_factor x the pool's predicted TTFT (within a floor and a cap), and, while other
pools remain, at most half of what the deadline leaves; an attempt on a pool that is marked down
meanwhile (probes missed, breaker opened, load stream lost: Pool.went_down) gives up at once.

ResumableStream (what a front relays): the pool's stream as the client should see it. It keeps what
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
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from gateway.config import ResilienceConfig
from gateway.core.errors import APIError, InternalError
from gateway.core.wire import RESUME_FIELD, TOKEN_IDS_FIELD, TOKEN_IDS_HEADER
from gateway.edge.forward import Call, Forwarder, StreamBroken, Upstream
from gateway.pools.upstream import Pool
from gateway.routing.framework import Predictor

log = logging.getLogger("meshgate.gateway")

_IDS = b',"' + TOKEN_IDS_FIELD.encode() + b'":['
DONE = b"data: [DONE]\n\n"


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
        if not call.stream:  # the first byte of a whole answer comes after all of it: only the watch
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
    stream, checked at the bound; a chunk only notes the time (cheap on the relay path)."""

    def __init__(self, guard: Guard, up: Upstream):
        self.guard, self.up = guard, up
        self.loop = asyncio.get_running_loop()
        self.start = self.last = self.loop.time()
        self.num_gaps = 0
        self.reason: str | None = None  # stalled / down, once it fired
        self.pool = up.pool
        self.pool.down_watchers.add(self._down)
        self.handle = self.loop.call_later(self._bound(), self._check)

    def _bound(self) -> float:
        mean_gap = (self.last - self.start) / self.num_gaps if self.num_gaps else 0.0
        return self.guard.stall_s(self.pool, mean_gap)

    def tick(self) -> None:
        self.last = self.loop.time()
        self.num_gaps += 1

    def waiting(self) -> None:
        """Reading from the pool again after the client took a chunk: time spent on a slow client
        is not the pool's."""
        self.last = self.loop.time()

    def _check(self) -> None:
        gap, tight = self.loop.time() - self.last, self._bound()
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
    """What reached the client: text, token ids, the stream's id; rewrites continuation chunks."""

    def __init__(self) -> None:
        self.buf = b""
        self.text: list[str] = []
        self.ids: list[int] = []
        self.ids_complete = True  # every chunk with text came with its token ids
        self.num_chunks = 0  # chunks with content (a token each, roughly: for openai pools' max_tokens)
        self.head: tuple[Any, Any] | None = None  # (id, created) of the first chunk
        self.finish_reason: str | None = None
        self.done = False  # [DONE] went by
        self.error: bytes | None = None  # an error event from the pool, held back
        self.joined = False  # from a continuation on: rewrite chunks

    def take(self, data: bytes) -> bytes:
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
            self.done = True
            return None if self.error is not None else ev
        if self.error is not None:
            return None
        ids: list[int] | None = None
        at = payload.rfind(_IDS)
        if at >= 0:  # the worker puts it last: cut it off without re-encoding
            close = payload.index(b"]", at)
            raw = payload[at + len(_IDS):close]
            ids = [int(t) for t in raw.split(b",")] if raw else []
            payload = payload[:at] + payload[close + 1:]
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return ev
        if not isinstance(obj, dict):
            return ev
        if "error" in obj:
            self.error = ev  # held: the stream may yet go on elsewhere
            return None
        if self.head is None:
            self.head = (obj.get("id"), obj.get("created"))
        text = self._note(obj)
        if ids is not None:
            self.ids.extend(ids)
        elif text:
            self.ids_complete = False
        if self.joined:
            obj["id"], obj["created"] = self.head
            for c in obj.get("choices") or ():
                if isinstance(c, dict) and isinstance(c.get("delta"), dict):
                    c["delta"].pop("role", None)
            return b"data: " + orjson.dumps(obj)
        return b"data: " + payload if at >= 0 else ev

    def _note(self, obj: dict[str, Any]) -> str:
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
        return text

    def rejoin(self) -> None:
        self.buf = b""
        self.error = None
        self.done = False
        self.joined = True


class ResumableStream:
    """A client's stream across pools. chunks() for the client; close() once, in a finally."""

    def __init__(self, fwd: Forwarder, guard: Guard, cfg: ResilienceConfig, up: Upstream):
        self.fwd, self.guard, self.cfg = fwd, guard, cfg
        self.up = up
        self.call = up.call
        self.track = _Tracker()
        self.num_resumes = 0
        self.join_gaps_s: list[float] = []  # client-visible: the last chunk before a cut to the next one

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        last_out = time.monotonic()
        while True:
            up = self.up
            watch = _StallWatch(self.guard, up)
            reason = "broken"
            try:
                async for chunk in up.chunks():
                    watch.tick()
                    if out := self.track.take(chunk):
                        if self.num_resumes and len(self.join_gaps_s) < self.num_resumes:
                            self.join_gaps_s.append(time.monotonic() - last_out)
                        yield out
                        last_out = time.monotonic()
                    watch.waiting()
                if self.track.done and self.track.error is None:
                    return
                reason = "error" if self.track.error is not None else "broken"
            except StreamBroken:
                pass
            finally:
                watch.stop()
            reason = watch.reason or reason
            if self.track.finish_reason is not None and self.track.error is None:
                yield DONE  # the answer was whole; only its end was lost
                return
            if not await self._resume(reason):
                yield self._failure()
                return

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
                      principal=call.principal, priority=call.priority, avoid=frozenset(avoid))
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


def ask_for_token_ids(call: Call) -> None:
    """Streams that may be continued ask meshgate pools for each chunk's token ids."""
    call.headers[TOKEN_IDS_HEADER] = "1"

