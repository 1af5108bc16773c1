"""Closed-loop streaming load: N streams open at once, each read event by event, timed per token.

    python -m benchmarks.paced_client --url URL [--pair-url DIRECT] --streams 300 --duration 15
                                      [--body JSON] [--timeout S] [--out PATH]

Each of N slots sends a streaming request, reads its SSE events as they arrive, and sends the next
as soon as one ends (closed loop: N streams are always open). Slots start spread over --ramp seconds
so N streams do not open in one burst. Per stream: TTFT (send to the first whole event), the gaps
between successive events (what a user sees as the text arriving) and whether it ended in `[DONE]`.

With --pair-url, each slot sends its request to both URLs at the same moment (the target and the
stub itself) and waits for both: "added TTFT" is then per request, the target's minus its twin's,
not a difference of percentiles taken at different moments. The stub then serves 2N streams.

Why not aiohttp: at 1,000 streams of 50 tokens/s the client reads 50,000 events a second on a
2-core machine it shares with the router and the stub; a raw asyncio Protocol with httptools costs a
few µs an event, aiohttp several times that, and the client would become what is measured.

Requests that start in the first --warmup seconds are read but not measured. Bounded: N streams,
each with a timeout; sending stops after --duration and the run ends by duration + timeout.
Writes a JSON summary (percentiles, not the per-event samples) to --out, or stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson

DEFAULT_BODY = {"model": "m", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 64,
                "stream": True}


@dataclass(slots=True)
class Tally:
    """One URL's measured streams."""

    ttft_s: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]
    gaps_s: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]
    errors: dict[str, int] = field(default_factory=dict)
    num_ok: int = 0
    events: int = 0  # every event received, warmup included (the CPU-per-chunk denominator)
    requests: int = 0  # every request finished, warmup included

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class _Conn(asyncio.Protocol):
    """One kept-alive connection, one streaming request at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] | None = None
        self.lost = False
        self.reset(0.0)

    def reset(self, t_send: float) -> None:
        self.t_send = t_send
        self.t_last = 0.0
        self.ttft = -1.0
        self.gaps: list[float] = []
        self.events = 0
        self.last_byte = b""
        self.tail = b""
        self.status = 0
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("closed mid-answer"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if self.done is not None and not self.done.done():
                self.done.set_exception(ConnectionError(f"bad HTTP: {e}"))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        n = (self.last_byte + body).count(b"\n\n")
        self.last_byte = body[-1:]
        self.tail = (self.tail + body)[-32:]
        if n:
            now = time.perf_counter()
            if self.ttft < 0:
                self.ttft = now - self.t_send
            else:
                self.gaps.append(now - self.t_last)
            self.gaps.extend([0.0] * (n - 1))  # events that came in the same read: no gap between them
            self.t_last = now
            self.events += n

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


class Client:
    def __init__(self, url: str, body: bytes, timeout_s: float):
        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.request = (f"POST {u.path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
                        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
        self.timeout_s = timeout_s
        self.tally = Tally()

    async def one(self, conn: _Conn | None, measured: bool) -> _Conn | None:
        """One stream; returns the connection to reuse (None: it closed or failed)."""
        loop = asyncio.get_running_loop()
        t = self.tally
        try:
            async with asyncio.timeout(self.timeout_s):
                if conn is None or conn.lost:
                    _, conn = await loop.create_connection(_Conn, self.host, self.port)
                conn.reset(time.perf_counter())
                conn.done = loop.create_future()
                assert conn.transport is not None
                conn.transport.write(self.request)
                await conn.done
        except TimeoutError:
            t.error("timeout")
            _abort(conn)
            return None
        except (ConnectionError, OSError) as e:
            t.error(type(e).__name__)
            _abort(conn)
            return None
        t.events += conn.events
        t.requests += 1
        ok = conn.status == 200 and conn.ttft >= 0 and b"data: [DONE]" in conn.tail
        if measured and ok:
            t.num_ok += 1
            t.ttft_s.append(conn.ttft)
            t.gaps_s.extend(conn.gaps)
        elif measured:
            t.error(f"status {conn.status}" if conn.status != 200 else "bad stream")
        if ok and conn.keep_alive:
            return conn
        _abort(conn)
        return None


def _abort(conn: _Conn | None) -> None:
    if conn is not None and conn.transport is not None:
        conn.transport.close()
    return None


async def run(url: str, pair_url: str | None, streams: int, duration_s: float, body: bytes, timeout_s: float,
              warmup_s: float, ramp_s: float) -> dict[str, Any]:
    target = Client(url, body, timeout_s)
    twin = Client(pair_url, body, timeout_s) if pair_url else None
    added: array = array("d")  # type: ignore[type-arg]  # per pair: target TTFT - twin TTFT
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def slot(i: int) -> None:
        await asyncio.sleep(ramp_s * i / streams)
        conns: list[_Conn | None] = [None, None]
        while (now := time.perf_counter()) < stop_at:
            measured = now >= measure_from
            if twin is None:
                conns[0] = await target.one(conns[0], measured)
                continue
            n0, m0 = target.tally.num_ok, twin.tally.num_ok
            conns[0], conns[1] = await asyncio.gather(target.one(conns[0], measured), twin.one(conns[1], measured))
            if target.tally.num_ok > n0 and twin.tally.num_ok > m0:
                added.append(target.tally.ttft_s[-1] - twin.tally.ttft_s[-1])
        for c in conns:
            _abort(c)

    gc.collect()
    gc.freeze()  # the client's own GC pauses would show up as gaps
    await asyncio.gather(*(slot(i) for i in range(streams)))
    elapsed = time.perf_counter() - start
    out: dict[str, Any] = {"streams": streams, "duration_s": duration_s, "warmup_s": warmup_s, "elapsed_s": elapsed,
                           "target": _summary(target.tally, url, elapsed)}
    if twin is not None:
        out["twin"] = _summary(twin.tally, pair_url or "", elapsed)
        out["added_ttft_ms"] = _pcts(added, (50, 99))
        out["added_ttft_pairs"] = len(added)
    return out


def _pcts(xs: array, qs: tuple[float, ...]) -> dict[str, float]:  # type: ignore[type-arg]
    """Nearest-rank percentiles in ms (nan when empty)."""
    if not len(xs):
        return {f"p{q:g}": float("nan") for q in qs}
    s = sorted(xs)
    return {f"p{q:g}": 1e3 * s[min(len(s) - 1, max(0, int(round(q / 100 * len(s))) - 1))] for q in qs}


def _summary(t: Tally, url: str, elapsed_s: float) -> dict[str, Any]:
    sent = t.num_ok + sum(t.errors.values())
    return {"url": url, "num_ok": t.num_ok, "errors": t.errors, "error_rate": sum(t.errors.values()) / max(sent, 1),
            "events": t.events, "requests": t.requests, "chunks_per_s": t.events / elapsed_s,
            "ttft_ms": _pcts(t.ttft_s, (50, 99)), "gap_ms": _pcts(t.gaps_s, (50, 99, 99.9)),
            "num_gaps": len(t.gaps_s)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paced_client", description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="the streaming endpoint to load")
    p.add_argument("--pair-url", help="the same request here at the same moment (the direct twin)")
    p.add_argument("--streams", type=int, default=100, help="streams open at once (default 100)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring (default 2)")
    p.add_argument("--ramp", type=float, default=1.3, help="slots start spread over this (default 1.3 s)")
    p.add_argument("--body", help="request JSON (default: 64-token streaming chat)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-stream timeout in seconds")
    p.add_argument("--out", help="write the JSON here (default: stdout)")
    args = p.parse_args(argv)
    body = orjson.dumps(orjson.loads(args.body)) if args.body else orjson.dumps(DEFAULT_BODY)
    coro = run(args.url, args.pair_url, args.streams, args.duration, body, args.timeout, args.warmup, args.ramp)
    try:
        import uvloop
    except ImportError:
        res = asyncio.run(coro)
    else:
        res = uvloop.run(coro)
    data = orjson.dumps(res)
    if args.out:
        with open(args.out, "wb") as f:
            f.write(data)
    else:
        sys.stdout.buffer.write(data + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
