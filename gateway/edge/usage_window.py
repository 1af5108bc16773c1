"""Recent usage per key, model and priority class, for `GET /v1/meshgate/usage`: fed by the same
Metering.record that counts the Prometheus counters and writes the usage log, so the three agree.

One-minute buckets, kept for `retention_min`, in shared memory (pools/shared.py): with
`meshgate serve --workers N` the window is made before the processes fork, so whichever process
answers a tenant reports every process' requests. A row (key, model, priority) owns retention_min
records, one per minute modulo retention_min, each holding the minute it counts. Memory is fixed
at start: at most max_rows rows (keys x models x priority classes); a row past the bound is left
out of this view (counted in `dropped`; Prometheus and the usage log still have it).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from gateway.pools.shared import SharedNames, SharedTable

_SEP = "\x1f"
_MINUTE, _REQUESTS, _PROMPT, _COMPLETION = range(4)


class UsageWindow:
    def __init__(self, retention_min: int = 60, clock: Callable[[], float] = time.time, max_rows: int = 1024,
                 processes: int = 1):
        """processes: how many gateway processes will share it (forked after it is made)."""
        self.retention_min = retention_min
        self.clock = clock
        self._rows = SharedNames(max_rows, capacity_bytes=max_rows * 128)
        self._table = SharedTable(num_fields=4, capacity=max_rows * retention_min)
        self.dropped = 0  # requests whose row did not fit (this process)
        # one process: no other writer, so no cross-process lock (two syscalls a request)
        self._lock = self._table.lock if processes > 1 else contextlib.nullcontext()
        # this minute's records by row, so a request costs a dict lookup (cleared each minute)
        self._minute = -1
        self._recs: dict[tuple[str, str, str], memoryview[float]] = {}

    def add(self, key: str, model: str, priority: str, prompt_tokens: int, completion_tokens: int) -> None:
        minute = int(self.clock() // 60)
        if minute != self._minute:
            self._minute = minute
            self._recs.clear()
        rec = self._recs.get((key, model, priority))
        if rec is None:
            row = f"{key}{_SEP}{model}{_SEP}{priority}"
            if not self._rows.add(row):
                self.dropped += 1
                return
            rec = self._recs[(key, model, priority)] = self._table.record(
                self._table.slot(f"{row}{_SEP}{minute % self.retention_min}"))
        with self._lock:
            if rec[_MINUTE] != minute:  # the record last counted an older minute: start over
                rec[_MINUTE], rec[_REQUESTS], rec[_PROMPT], rec[_COMPLETION] = minute, 0, 0, 0
            rec[_REQUESTS] += 1
            rec[_PROMPT] += prompt_tokens
            rec[_COMPLETION] += completion_tokens

    def query(self, window_s: float, key: str | None = None) -> list[dict[str, object]]:
        """Totals over the last window_s (whole minutes, the current one included), for one key
        (None: every key), one row per (key, model, priority)."""
        now = int(self.clock() // 60)
        minutes = range(now - min(self.retention_min, max(1, int(-(-window_s // 60)))) + 1, now + 1)
        out: list[dict[str, object]] = []
        for row in sorted(self._rows.names()):
            k, m, p = row.split(_SEP)
            if key is not None and k != key:
                continue
            requests = prompt = completion = 0
            for minute in minutes:
                slot = self._table.find(f"{row}{_SEP}{minute % self.retention_min}")
                if slot is None:
                    continue
                rec = self._table.record(slot)
                if rec[_MINUTE] == minute:
                    requests += int(rec[_REQUESTS])
                    prompt += int(rec[_PROMPT])
                    completion += int(rec[_COMPLETION])
            if requests:
                out.append({"key": k or None, "model": m, "priority": p or None, "requests": requests,
                            "prompt_tokens": prompt, "completion_tokens": completion,
                            "total_tokens": prompt + completion})
        return out
