"""Runs the Engine on its own thread; the event loop talks to it through queues.

Commands (add, abort, stop) go in through a thread-safe queue; each step's TokenEvents come back
to the loop in one call_soon_threadsafe, where they become RequestOutputs (detokenization and stop
strings, off the engine thread's critical path) and are fanned out to per-request asyncio queues;
a request a stop string ended goes back to the engine as a `stop` command. A request whose
consumer goes away (client disconnect, timeout) is aborted, which frees its KV blocks before the
next step.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator
from typing import Any

import torch

from gateway.core.types import LoadReport
from gateway.worker.embeddings import embed
from gateway.worker.engine import Engine, RequestOutput, TokenEvent
from gateway.worker.request import Request

log = logging.getLogger("meshgate.worker")

REPORT_PERIOD_S = 0.05  # how often the engine thread refreshes the load snapshot
# ...and sooner, after a step that changed how many requests wait or run (what gateways route on,
# and what GET /load/stream pushes), but not more often than this
REPORT_MIN_S = 0.005
IDLE_POLL_S = 0.1


class EngineDeadError(RuntimeError):
    pass


class PoolFull(Exception):
    """A request that allowed refusal was not queued: the wait predicted for it (s) was too long."""

    def __init__(self, wait_s: float):
        super().__init__(f"predicted wait {wait_s:.3f} s")
        self.wait_s = wait_s


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._cmds: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.report: LoadReport = engine.load_report()  # replaced whole, read without a lock
        self.num_preemptions = 0
        self.num_aborted = 0
        self.num_steps = 0
        self.num_refused = 0  # requests refused as PoolFull (counted on the engine thread)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        self._cmds.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout_s)

    async def generate(self, req: Request, refuse_above_s: float | None = None
                       ) -> AsyncGenerator[RequestOutput, None]:
        """Submit a request and yield its outputs; closing the iterator early aborts it.

        refuse_above_s: the engine thread, when it takes the request, refuses it (PoolFull, raised
        here before any output) instead of queueing it if the wait predicted for it is longer;
        decided there so that a burst is judged against the queue it really finds."""
        if self._thread is None or not self._thread.is_alive():
            raise EngineDeadError("the engine is not running")
        q: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._streams[req.request_id] = q
        self._cmds.put(("add", (req, refuse_above_s)))
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, Exception):
                    finished = True
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(req.request_id, None)
            if not finished:
                self._cmds.put(("abort", req.request_id))

    # -- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        last_report = 0.0
        counts = (-1, -1)
        sched = self.engine.scheduler
        while not self._stopping.is_set():
            self._drain_commands(block=not self.engine.has_work())
            if self.engine.has_work():
                try:
                    events = self.engine.step_tokens()
                except Exception as e:  # a bug: fail the requests in flight, keep serving
                    log.exception("engine step failed")
                    self._fail_all(e)
                    continue
                self.num_steps += 1
                if events:
                    assert self._loop is not None
                    self._loop.call_soon_threadsafe(self._dispatch, events)
            now = time.monotonic()
            # Refresh on a period while busy, soon after the queue or the batch changed, and at
            # once when the engine falls idle.
            since = now - last_report
            if (since >= REPORT_PERIOD_S or not self.engine.has_work()
                    or (since >= REPORT_MIN_S and (len(sched.waiting), len(sched.running)) != counts)):
                counts = (len(sched.waiting), len(sched.running))
                self.report = self.engine.load_report()
                self.num_preemptions = self.engine.scheduler.num_preemptions
                self.num_aborted = self.engine.num_aborted
                last_report = now

    def _drain_commands(self, block: bool) -> None:
        embeds: list[tuple[list[list[int]], asyncio.Future[Any]]] = []
        try:
            cmd, arg = self._cmds.get(timeout=IDLE_POLL_S) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while True:
            if cmd == "add":
                self._add(*arg)  # type: ignore[misc]
            elif cmd == "abort":
                self.engine.abort_request(arg)  # type: ignore[arg-type]
            elif cmd == "stop":
                self.engine.finish_stopped(arg)  # type: ignore[arg-type]
            elif cmd == "embed":
                embeds.append(arg)  # type: ignore[arg-type]
            try:
                cmd, arg = self._cmds.get_nowait()
            except queue.Empty:
                break
        if embeds:
            self._embed(embeds)

    def _embed(self, jobs: list[tuple[list[list[int]], asyncio.Future[Any]]]) -> None:
        """Every embeddings request that came since the last step, in one batch."""
        assert self._loop is not None
        seqs = [s for inputs, _ in jobs for s in inputs]
        try:
            vectors = embed(self.engine.runner.model, seqs)  # type: ignore[attr-defined]
        except Exception as e:  # a bug: these requests fail, the engine keeps serving
            log.exception("embedding failed")
            for _, fut in jobs:
                self._loop.call_soon_threadsafe(_settle, fut, None, EngineDeadError(f"embedding failed: {e}"))
            return
        at = 0
        for inputs, fut in jobs:
            self._loop.call_soon_threadsafe(_settle, fut, vectors[at:at + len(inputs)], None)
            at += len(inputs)

    async def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        """Embeddings (len(inputs), hidden) of token sequences, computed on the engine thread."""
        if self._thread is None or not self._thread.is_alive():
            raise EngineDeadError("the engine is not running")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._cmds.put(("embed", (inputs, fut)))
        return await fut

    def _add(self, req: Request, refuse_above_s: float | None) -> None:
        err: Exception | None = None
        if refuse_above_s is not None and (wait_s := self.engine.queue_wait_s()) > refuse_above_s:
            err = PoolFull(wait_s)  # not queued: the engine's state is as if it never came
            self.num_refused += 1
        else:
            try:
                self.engine.add_request(req)
            except ValueError as e:  # the server checks lengths first; this is the backstop
                err = e
        if err is not None:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._dispatch_error, [req.request_id], err)

    def _fail_all(self, err: Exception) -> None:
        ids = self.engine.abort_all()
        if self._loop is not None:
            dead = EngineDeadError(f"engine step failed: {type(err).__name__}")
            self._loop.call_soon_threadsafe(self._dispatch_error, ids, dead)

    # -- event loop side --------------------------------------------------------------------
    def _dispatch(self, events: list[TokenEvent]) -> None:
        try:
            outputs, stopped = self.engine.process_outputs(events)
        except Exception as e:  # a bug: fail these requests (their streams would hang), keep serving
            log.exception("output processing failed")
            ids = [ev.request_id for ev in events]
            for rid in ids:
                self._cmds.put(("abort", rid))
            self._dispatch_error(ids, EngineDeadError(f"output processing failed: {type(e).__name__}"))
            return
        if stopped:
            self._cmds.put(("stop", stopped))
        for out in outputs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _dispatch_error(self, ids: list[str], err: Exception) -> None:
        for rid in ids:
            q = self._streams.get(rid)
            if q is not None:
                q.put_nowait(err)


def _settle(fut: asyncio.Future[Any], value: Any, err: Exception | None) -> None:
    if fut.done():  # the client went away
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(value)
