"""Open-loop load at a fixed rate: requests leave on a fixed schedule whatever the answers do.

    python -m benchmarks.openloop --url URL [--url BASELINE] --rate 200 --duration 10 [--stream]
                                  [--body JSON] [--out PATH]

Request i is due at t0 + i/rate and is sent then (its own task), so a slow answer never delays the
next request (no coordinated omission from the generator's side). Per request: TTFT, from just
before the request goes out to the first body bytes (the first whole SSE event when streaming), and
E2E, to the end of the body; plus the schedule lag (send time minus due time), which says whether
the generator kept up. Latencies start at the send, not the due time, so the generator's own
scheduling jitter on a shared machine does not count against the target; the lag is reported
beside them. A streamed answer counts as an error unless it ends in `data: [DONE]`; a whole answer
unless it is a 200 with a JSON body holding "choices".

With a second --url (a baseline: the upstream without the router), each URL gets --rate req/s and
the baseline's requests fall halfway between the target's, so both see the same moments of machine
noise and "added latency" compares like with like, not runs minutes apart.

Bounded: at most rate * duration requests per URL, each with a timeout, at most --max-in-flight at once
(further ones count as errors, "dropped"), and the whole run ends by duration + timeout.
Writes a JSON summary (with the per-request samples) to --out, or stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

DEFAULT_BODY = {"model": "m", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}


@dataclass(slots=True)
class Samples:
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    lag_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    num_sent: int = 0
    num_ok: int = 0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool, due: float,
               timeout_s: float, out: Samples) -> None:
    t0 = time.perf_counter()
    out.lag_s.append(t0 - due)
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                if stream:
                    head = b""  # until the first whole event
                    tail = b""  # then: the last bytes, where [DONE] must be
                    ttft = None
                    while chunk := await resp.content.readany():
                        if ttft is None:
                            head += chunk
                            if b"\n\n" in head or b"\r\n\r\n" in head:
                                ttft = time.perf_counter() - t0
                                tail = head[-64:]
                        else:
                            tail = (tail + chunk)[-64:]
                    e2e = time.perf_counter() - t0
                    ok = resp.status == 200 and ttft is not None and b"data: [DONE]" in tail
                else:
                    first = await resp.content.readany()
                    ttft = time.perf_counter() - t0
                    data = first + await resp.read() if first else b""
                    e2e = time.perf_counter() - t0
                    ok = resp.status == 200 and b'"choices"' in data
                if not ok:
                    out.error(f"status {resp.status}" if resp.status != 200 else "bad body")
                    return
    except TimeoutError:
        out.error("timeout")
        return
    except (aiohttp.ClientError, ConnectionError, OSError) as e:
        out.error(type(e).__name__)
        return
    out.num_ok += 1
    out.ttft_s.append(ttft)  # type: ignore[arg-type]
    out.e2e_s.append(e2e)


async def run(urls: list[str], rate: float, duration_s: float, stream: bool, body: bytes, timeout_s: float = 10.0,
              max_in_flight: int = 1000, warmup: int = 10, cafile: str | None = None) -> dict[str, Any]:
    """`rate` req/s to each of `urls`, interleaved: with two, the second's requests fall halfway
    between the first's, so a target and its baseline share the same moments of machine noise.
    warmup: requests per URL sent one after another before the schedule (connections, caches),
    not measured. The same request count goes to every URL."""
    num = max(1, int(rate * duration_s))
    k = len(urls)
    outs = [Samples() for _ in urls]
    scratch = [Samples() for _ in urls]
    tls = None
    if cafile is not None:  # https URLs whose certificates a private CA signed
        import ssl

        tls = ssl.create_default_context(cafile=cafile)
    connector = aiohttp.TCPConnector(limit=0, force_close=False, keepalive_timeout=60, ssl=tls if tls else True)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        for url, sc in zip(urls, scratch):
            for _ in range(warmup):
                await _one(session, url, body, stream, time.perf_counter(), timeout_s, sc)
                if sc.errors:  # a dead target must not cost warmup * timeout_s
                    break
        tasks: set[asyncio.Task[None]] = set()
        gc.collect()
        gc.freeze()  # the generator's own GC pauses would show up as latency
        start = time.perf_counter() + 0.02
        for j in range(num * k):
            due = start + j / (rate * k)
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            out = outs[j % k]
            out.num_sent += 1
            if len(tasks) >= max_in_flight:
                out.error("dropped")
                continue
            t = asyncio.create_task(_one(session, urls[j % k], body, stream, due, timeout_s, out))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        sent_s = time.perf_counter() - start
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s + 1)
            for t in pending:
                t.cancel()  # its request counts as an error ("unfinished") below
        elapsed = time.perf_counter() - start
    runs = []
    for url, out, sc in zip(urls, outs, scratch):
        missing = out.num_sent - out.num_ok - sum(out.errors.values())
        if missing > 0:
            out.errors["unfinished"] = out.errors.get("unfinished", 0) + missing
        runs.append({
            "url": url, "num_sent": out.num_sent, "num_ok": out.num_ok, "errors": out.errors,
            "num_warmup": warmup, "warmup_errors": sc.errors,
            "ttft_s": out.ttft_s, "e2e_s": out.e2e_s, "lag_s": out.lag_s,
        })
    return {"rate": rate, "duration_s": duration_s, "stream": stream, "send_s": sent_s, "elapsed_s": elapsed,
            "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.openloop", description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, action="append",
                   help="a URL to load at --rate; given twice (target, then baseline), the two interleave")
    p.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sending (default 10)")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--body", help="request JSON (default: a 16-token chat request); 'stream' is set from --stream")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout in seconds")
    p.add_argument("--max-in-flight", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=10, help="unmeasured requests before the schedule (default 10)")
    p.add_argument("--out", help="write the JSON here (default: stdout)")
    p.add_argument("--cafile", help="trust this CA for https URLs (default: the system's store)")
    args = p.parse_args(argv)
    body_obj = orjson.loads(args.body) if args.body else dict(DEFAULT_BODY)
    body_obj["stream"] = bool(args.stream)
    body = orjson.dumps(body_obj)
    coro = run(list(args.url), args.rate, args.duration, args.stream, body, args.timeout, args.max_in_flight,
               args.warmup, args.cafile)
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
