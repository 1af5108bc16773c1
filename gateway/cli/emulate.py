"""Network emulation for one machine: a TCP proxy per link that delays each direction by half
the link's round trip (plus jitter), so probes and traffic really see the mesh's latency.

`tc netem` needs a kernel module; this runs anywhere, in user space. Order is kept per direction:
a chunk is never delivered before the one read ahead of it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random

log = logging.getLogger("meshgate.emulate")

CHUNK = 65536


class DelayProxy:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int], rtt_ms: float, jitter_ms: float = 0.0,
                 seed: int | None = None):
        self.listen = listen
        self.target = target
        self.one_way_s = rtt_ms / 2000.0
        self.jitter_s = jitter_ms / 2000.0
        self.rng = random.Random(seed)
        self.server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._down_until = 0.0  # loop time until which the link is cut (cut())

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, *self.listen)

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    def cut(self, down_s: float = 0.0) -> int:
        """A link failure: drop every connection through this link now, and close new ones at once
        for down_s. Returns how many connections were cut."""
        self._down_until = asyncio.get_running_loop().time() + down_s
        conns = list(self._conns)
        for t in conns:
            t.cancel()
        return len(conns)

    def _delay(self) -> float:
        return max(0.0, self.one_way_s + self.rng.uniform(-self.jitter_s, self.jitter_s))

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            if asyncio.get_running_loop().time() < self._down_until:
                return  # the link is down: the connection closes at once
            try:
                up_r, up_w = await asyncio.open_connection(*self.target)
            except OSError:
                return  # the pool is down: the client sees the connection close, as on a real link
            try:
                await asyncio.gather(self._pipe(client_r, up_w), self._pipe(up_r, client_w, from_pool=True))
            finally:
                up_w.close()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            client_w.close()
            self._conns.discard(task)

    def extra_delay_s(self, data: bytes, from_pool: bool) -> float:
        """More delay for this chunk (a subclass emulating a pool that answers late); 0 here."""
        return 0.0

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_pool: bool = False) -> None:
        """Copy src to dst, each chunk delivered one-way-delay after it was read."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=256)  # bounded: backpressure

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    with contextlib.suppress(OSError):
                        if dst.can_write_eof():
                            dst.write_eof()
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(data)
                await dst.drain()

        writer = asyncio.ensure_future(deliver())
        last_due = 0.0
        try:
            while True:
                data = await src.read(CHUNK)
                # never reorder
                last_due = max(last_due, loop.time() + self._delay() + self.extra_delay_s(data, from_pool))
                await queue.put((last_due, data))
                if not data:
                    break
            await writer
        finally:
            writer.cancel()
