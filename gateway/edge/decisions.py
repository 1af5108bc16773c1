"""Recent routing decisions, for operators: a bounded ring buffer and a live SSE feed.

DecisionLog.record is the Call.finish hook (Gateway.prepare attaches it, so every front's
requests pass here exactly once). It keeps one small record per request — where the client is,
the pool routing chose and the runner-up with their predicted TTFTs, the pool that answered and
the TTFT measured — and hands it to live subscribers. It never blocks and never raises into the
request: a subscriber that falls behind loses records (counted), it does not slow requests down.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from gateway.core.errors import Overloaded

if TYPE_CHECKING:
    from gateway.edge.forward import Call, Upstream

_CLOSE = None  # queued to a subscriber on shutdown: end the stream


class DecisionLog:
    def __init__(self, size: int = 200, max_subscribers: int = 32, queue_size: int = 256,
                 heartbeat_s: float = 10.0):
        self.recent: deque[tuple[Any, ...]] = deque(maxlen=size)
        self.max_subscribers = max_subscribers
        self.queue_size = queue_size
        self.heartbeat_s = heartbeat_s
        self.dropped = 0  # records a slow subscriber did not get
        self._subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._closed = False

    # -- the hook -------------------------------------------------------------------------
    def record(self, call: Call, up: Upstream | None, status: int) -> None:
        """Call.finish's hook: one record per request that reached routing. Kept as a tuple; the
        dict is made when someone looks (a subscriber, or the snapshot)."""
        decision = call.decision
        if decision is None:  # refused before routing (limits, auth): not a routing decision
            return
        raw = (time.time(), call.request_id, call.path, call.client, decision,
               up.pool_id if up is not None else None, up.failovers if up is not None else None,
               up.ttft_s if up is not None else None, status)
        self.recent.append(raw)
        if self._subscribers:
            rec = _as_dict(raw)
            for q in self._subscribers:
                try:
                    q.put_nowait(rec)
                except asyncio.QueueFull:
                    self.dropped += 1

    def snapshot(self) -> list[dict[str, Any]]:
        """The recent decisions, newest last."""
        return [_as_dict(raw) for raw in self.recent]

    # -- the live feed ----------------------------------------------------------------------
    def subscribe(self) -> Subscription:
        """A live feed of records; refused (503) while shutting down and past max_subscribers.
        Iterate it, and close() it at the end (a `with` block does)."""
        if self._closed:
            raise Overloaded("the gateway is shutting down", retry_after_s=1)
        if len(self._subscribers) >= self.max_subscribers:
            raise Overloaded("too many decision streams open; retry later", retry_after_s=5)
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(self.queue_size)
        self._subscribers.add(q)
        return Subscription(q, self.heartbeat_s, lambda: self._subscribers.discard(q))

    async def close(self) -> None:
        """On shutdown (before handlers are awaited): end every open stream."""
        self._closed = True
        for q in list(self._subscribers):
            while True:
                try:
                    q.put_nowait(_CLOSE)
                    break
                except asyncio.QueueFull:
                    q.get_nowait()  # drop the oldest: the stream is ending anyway


class Subscription:
    """One subscriber's records, in batches (a burst is one batch); None after heartbeat_s of quiet
    (for a keep-alive line); ends on the gateway's shutdown. The front frames the batches."""

    def __init__(self, q: asyncio.Queue[dict[str, Any] | None], heartbeat_s: float, close: Callable[[], None]):
        self._q = q
        self._heartbeat_s = heartbeat_s
        self.close = close

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aiter__(self) -> AsyncIterator[list[dict[str, Any]] | None]:
        q = self._q
        while True:
            try:
                rec = await asyncio.wait_for(q.get(), self._heartbeat_s)
            except TimeoutError:
                yield None
                continue
            if rec is _CLOSE:
                return
            batch, closing = [rec], False
            while not q.empty() and len(batch) < 64:
                nxt = q.get_nowait()
                if nxt is _CLOSE:
                    closing = True
                    break
                batch.append(nxt)
            yield batch
            if closing:
                return


def _as_dict(raw: tuple[Any, ...]) -> dict[str, Any]:
    at, request_id, path, loc, decision, answered_by, failovers, ttft_s, status = raw
    ranked = decision.ranked
    chosen = ranked[0].pool_id if ranked else None
    runner_up = ranked[1].pool_id if len(ranked) > 1 else None
    return {
        "time": at,
        "request_id": request_id,
        "path": path,
        "client": {"source": loc.source, "site": loc.site_id, "lat": round(loc.lat, 3),
                   "lon": round(loc.lon, 3)} if loc is not None else None,
        "profile": decision.profile,
        "pool": chosen,
        "predicted_ttft_ms": _ms(decision.predicted_ms.get(chosen or "")),
        "runner_up": runner_up,
        "runner_up_predicted_ttft_ms": _ms(decision.predicted_ms.get(runner_up or "")),
        # the part of each prediction that is first-byte lateness measured (gateway/routing/lateness.py)
        "late_ms": _ms(decision.late_ms.get(chosen or "", 0.0)),
        "runner_up_late_ms": _ms(decision.late_ms.get(runner_up or "", 0.0)),
        "answered_by": answered_by,
        "failovers": failovers,
        "measured_ttft_ms": _ms(1000 * ttft_s) if ttft_s is not None else None,
        "status": status,
    }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v, 2)
