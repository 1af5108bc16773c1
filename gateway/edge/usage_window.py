"""Recent usage per key, model and priority class, for `GET /v1/meshgate/usage`: fed by the same
Metering.record that counts the Prometheus counters and writes the usage log, so the three agree.

One-minute buckets, kept for `retention_min`: memory is bounded by keys (from config) x models
(served) x priority classes (two) x minutes, whatever the traffic. Per gateway process, like the
usage log: with `--workers N`, one answer covers the process that served it (the usage log files,
or Prometheus' merged counters, hold the whole gateway's).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class Tally:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


Row = tuple[str, str, str]  # key id ("" with auth off), model, priority ("" when none)


class UsageWindow:
    def __init__(self, retention_min: int = 60, clock: Callable[[], float] = time.time):
        self.retention_min = retention_min
        self.clock = clock
        self._minutes: deque[tuple[int, dict[Row, Tally]]] = deque()  # (minute number, tallies), oldest first

    def add(self, key: str, model: str, priority: str, prompt_tokens: int, completion_tokens: int) -> None:
        minute = int(self.clock() // 60)
        if not self._minutes or self._minutes[-1][0] != minute:
            self._minutes.append((minute, {}))
            while self._minutes[0][0] <= minute - self.retention_min:
                self._minutes.popleft()
        tallies = self._minutes[-1][1]
        t = tallies.get((key, model, priority))
        if t is None:
            t = tallies[(key, model, priority)] = Tally()
        t.requests += 1
        t.prompt_tokens += prompt_tokens
        t.completion_tokens += completion_tokens

    def query(self, window_s: float, key: str | None = None) -> list[dict[str, object]]:
        """Totals over the last window_s (whole minutes, the current one included), for one key
        (None: every key), one row per (key, model, priority)."""
        first = int(self.clock() // 60) - max(1, int(-(-window_s // 60))) + 1
        out: dict[Row, Tally] = {}
        for minute, tallies in self._minutes:
            if minute < first:
                continue
            for row, t in tallies.items():
                if key is not None and row[0] != key:
                    continue
                acc = out.setdefault(row, Tally())
                acc.requests += t.requests
                acc.prompt_tokens += t.prompt_tokens
                acc.completion_tokens += t.completion_tokens
        return [{"key": k or None, "model": m, "priority": p or None, "requests": t.requests,
                 "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
                 "total_tokens": t.prompt_tokens + t.completion_tokens}
                for (k, m, p), t in sorted(out.items())]
