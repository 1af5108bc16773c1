"""The durable usage log: one JSON line per request, appended in batches, rotated by size.

The event loop only appends serialised lines to a list; a background task hands the batch every
`flush_every_s` to one writer thread, which writes and fsyncs it (fsync can take milliseconds to
seconds on a busy disk; it must never stall the loop). One thread keeps batches in order. A failed
write is truncated back to where it began and retried on the next flush, so a record is never
written twice nor half. Closing flushes what is left; the file is opened for append, so the log
survives restarts.

With several gateway processes (meshgate serve's forked workers) each one appends to a file of its
own, so lines are never interleaved and no process needs to lock out another: worker 0 (and a
single process) writes `path` itself, worker k writes `path` with `.wk` before its suffix
(`usage.jsonl`, `usage.w1.jsonl`, `usage.w2.jsonl`, ...; without a suffix, `usage.w1`). Each file
rotates on its own (`usage.w1.jsonl.1`, ...), so all of a gateway's records are in
`usage.jsonl*` and `usage.w*.jsonl*`; order across files is by each record's `ts`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from gateway.config import ConfigError, UsageLogConfig

log = logging.getLogger("meshgate.usage")


def worker_path(path: Path, worker_index: int) -> Path:
    """The file worker `worker_index` appends to: `path` for worker 0, `stem.wK.suffix` for the others."""
    return path if worker_index == 0 else path.with_name(f"{path.stem}.w{worker_index}{path.suffix}")


class UsageLog:
    def __init__(self, cfg: UsageLogConfig, worker_index: int = 0):
        self.cfg = cfg
        self.path = worker_path(Path(cfg.path).expanduser(), worker_index) if cfg.path else None
        self._lines: list[bytes] = []  # appended on the loop, taken whole by flush()
        self._fd: int | None = None  # touched only by the writer thread once started
        self._size = 0
        self._writer: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.path is not None

    async def start(self) -> None:
        if self.path is None:
            return
        try:
            self._open()  # here, on the loop, so a bad path fails the start with a one-line reason
        except OSError as e:
            raise ConfigError(f"gateway.usage_log.path: cannot open {self.path}: {e.strerror}") from None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshgate-usage-log")
        self._task = asyncio.create_task(self._run(), name="usage-log-flush")

    def append(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        line = orjson.dumps(record) + b"\n"
        if self._closed:
            # A request that ended after close() (a front still draining): write it now, blocking,
            # rather than lose it; this happens only during shutdown.
            left = self._write([line])
            self._close_fd()
            if left:
                log.error("usage log %s: a record after shutdown was lost", self.path)
            return
        self._lines.append(line)

    async def flush(self) -> None:
        """Write and fsync what was appended so far (on the writer thread)."""
        if not self._lines or self._writer is None:
            return
        batch, self._lines = self._lines, []
        loop = asyncio.get_running_loop()
        # shield: if this task is cancelled, the batch still reaches the disk and is not re-queued.
        left = await asyncio.shield(loop.run_in_executor(self._writer, self._write, batch))
        if left:
            self._lines[:0] = left  # keep order: the failed ones go first next time

    async def close(self) -> None:
        """Stop the flush task and write everything appended so far."""
        if self._task is not None:
            self._stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._writer is not None:
            await self.flush()
            if self._lines:
                log.error("usage log %s: %d records could not be written", self.path, len(self._lines))
            await asyncio.get_running_loop().run_in_executor(self._writer, self._close_fd)
            self._writer.shutdown(wait=True)
            self._writer = None
        self._closed = True

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.cfg.flush_every_s)
            await self.flush()

    # -- the writer thread --------------------------------------------------------------------
    def _open(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A raw fd, not a buffered file: nothing may linger in a buffer after a failed write.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self, lines: list[bytes]) -> list[bytes]:
        """Append lines, rotating when the next one would pass max_bytes. Returns those not written."""
        done = 0
        try:
            while done < len(lines):
                if self._fd is None:
                    self._open()
                room = self.cfg.max_bytes - self._size
                n = nbytes = 0
                # A single line larger than max_bytes still goes to a file of its own.
                while done + n < len(lines) and (nbytes + len(lines[done + n]) <= room or self._size + nbytes == 0):
                    nbytes += len(lines[done + n])
                    n += 1
                if n == 0:
                    self._rotate()
                    continue
                self._commit(b"".join(lines[done:done + n]))
                done += n
        except OSError as e:
            log.error("usage log %s: %s; %d records kept for the next flush", self.path, e, len(lines) - done)
        return lines[done:]

    def _commit(self, data: bytes) -> None:
        assert self._fd is not None
        start = self._size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)  # no partial line stays behind to be written again
            raise
        self._size = start + len(data)

    def _rotate(self) -> None:
        """path -> path.1 -> path.2 ... up to path.keep; the oldest is dropped."""
        assert self.path is not None
        self._close_fd()
        keep = self.cfg.keep
        if keep == 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(keep - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        _fsync_dir(self.path.parent)  # the renames must survive a crash too
        self._open()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
