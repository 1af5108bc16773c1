"""A pool in the simulation: continuous batching as a FIFO multi-server queue, and the load report
its worker would give at any past moment (gateway/worker/engine.py's load_report)."""
from __future__ import annotations

import heapq
from bisect import bisect_right, insort

from gateway.core.types import LoadReport


class PoolSim:
    """A continuous-batching pool as a FIFO multi-server queue. Service is known at admission
    (prefill, then decode), so the Kiefer-Wolfowitz recursion gives start, first-token and end times
    at once: start = max(arrival, earliest free slot); prefill runs one prompt at a time. Starts and
    first tokens are then non-decreasing, so the state at any past time is a few bisections."""

    __slots__ = ("slots", "heap", "prefill_free", "ptps", "dtps", "mean_service_s", "arr", "start", "first", "cum",
                 "ends", "end_i", "cap_i", "report_slots")

    def __init__(self, slots: int, ptps: float, dtps: float, mean_service_s: float, report_slots: bool = True):
        """mean_service_s: the pool's mean request duration (its report's mean_request_s); report_slots:
        False for a pool whose reports carry no slot figures (max_num_seqs 0, as third-party pools)."""
        self.slots = slots
        self.report_slots = report_slots
        self.heap = [0.0] * slots  # when each slot is next free
        self.prefill_free = 0.0
        self.ptps, self.dtps, self.mean_service_s = ptps, dtps, mean_service_s
        self.arr: list[float] = []
        self.start: list[float] = []
        self.first: list[float] = []
        self.cum = [0]  # prompt tokens arrived, cumulative
        self.ends: list[float] = []  # sorted
        self.end_i: list[float] = []  # by arrival
        self.cap_i: list[int] = []  # max_tokens, by arrival

    def admit(self, a: float, prompt: int, output: int, max_tokens: int) -> tuple[float, float]:
        """The request arrives now (a >= every earlier arrival, except for the clairvoyant oracle's
        reservations, whose runs never ask for a report): its first-token and end times."""
        s = max(a, self.heap[0])
        first = max(s, self.prefill_free) + prompt / self.ptps
        self.prefill_free = first
        end = first + output / self.dtps
        heapq.heapreplace(self.heap, end)
        self.arr.append(a)
        self.start.append(s)
        self.first.append(first)
        self.cum.append(self.cum[-1] + prompt)
        insort(self.ends, end)
        self.end_i.append(end)
        self.cap_i.append(max_tokens)
        return first, end

    def waiting(self, tau: float) -> int:
        return bisect_right(self.arr, tau) - bisect_right(self.start, tau)

    def report(self, tau: float, mean_wait: bool = False) -> LoadReport:
        """What the worker's load report said at time tau (engine.py's load_report)."""
        na, ns = bisect_right(self.arr, tau), bisect_right(self.start, tau)
        nf, ne = bisect_right(self.first, tau), bisect_right(self.ends, tau)
        waiting, running, queued = na - ns, ns - ne, self.cum[na] - self.cum[nf]
        qw = queued / self.ptps
        ahead = waiting + 1 - (self.slots - running)  # requests to finish before a new one gets a slot
        if ahead > 0 and running > 0:
            qw += ahead * self.mean_service_s / self.slots if mean_wait else self._slot_wait_s(tau, ns, running, ahead)
        return LoadReport(waiting=waiting, running=running, queued_prompt_tokens=queued, prefill_tps=self.ptps,
                          decode_tps=running * self.dtps, queue_wait_s=qw,
                          max_num_seqs=self.slots if self.report_slots else 0,
                          mean_request_s=self.mean_service_s if self.report_slots else 0.0)

    def slot_wait_s(self, tau: float, extra: int = 0) -> float:
        """engine.py's wait for a batch slot at time tau for a request with `extra` more requests
        (not arrived yet) ahead of it: what the pool knows then, its running requests' max_tokens
        and progress, not their lengths."""
        na, ns, ne = bisect_right(self.arr, tau), bisect_right(self.start, tau), bisect_right(self.ends, tau)
        running = ns - ne
        ahead = na - ns + extra + 1 - (self.slots - running)
        return self._slot_wait_s(tau, ns, running, ahead) if ahead > 0 and running > 0 else 0.0

    def _slot_wait_s(self, tau: float, ns: int, running: int, ahead: int) -> float:
        """engine.py's _slot_wait_s: the ahead-th smallest (max_tokens - tokens so far) of the running
        requests, times the decode step."""
        left, i = [], ns - 1
        while len(left) < running and i >= 0:
            if self.end_i[i] > tau:
                left.append(self.cap_i[i] - max(0.0, tau - self.first[i]) * self.dtps)
            i -= 1
        left.sort()
        return max(0.0, left[min(ahead, len(left)) - 1]) / self.dtps


    # -- failures (benchmarks/sim/failures.py) ---------------------------------------------------
    # Each keeps the per-request lists non-decreasing where report() bisects them.
    def crash(self, t: float, up_at: float, live: list[int]) -> None:
        """The pool dies at t (every request in it is lost with it) and takes requests again from
        up_at, empty. live: the indices of the requests it held."""
        for k in live:
            self.start[k] = min(self.start[k], t)
            self.first[k] = min(self.first[k], t)
            self._set_end(k, t)
        self.heap = [up_at] * self.slots
        self.prefill_free = up_at

    def stall(self, t: float, duration_s: float, live: list[int]) -> None:
        """The pool stops producing at t for duration_s: everything it would have done after t
        happens duration_s later (a new request cannot start before it wakes)."""
        for lst in (self.start, self.first):
            for k in range(bisect_right(lst, t), len(lst)):
                lst[k] += duration_s
        for k in range(bisect_right(self.ends, t), len(self.ends)):
            self.ends[k] += duration_s
        for k in live:
            if self.end_i[k] > t:
                self.end_i[k] += duration_s
        self.heap = [max(h, t) + duration_s for h in self.heap]  # order kept: still a heap
        self.prefill_free = max(self.prefill_free, t) + duration_s

    def abort(self, k: int, at: float) -> None:
        """Request k is dropped at `at` (its client went away): its slot frees then. Not before its
        prefill ends, and a request queued behind it on its slot keeps its start: the pool frees
        less than an engine would (a simplification that can only slow the pool)."""
        end = max(at, self.first[k])
        if end >= self.end_i[k]:
            return
        old = self.end_i[k]
        self._set_end(k, end)
        try:
            i = self.heap.index(old)
        except ValueError:
            return
        self.heap[i] = end
        heapq.heapify(self.heap)

    def _set_end(self, k: int, end: float) -> None:
        old = self.end_i[k]
        i = bisect_right(self.ends, old) - 1
        while i >= 0 and self.ends[i] != old:
            i -= 1
        if i >= 0:
            del self.ends[i]
        insort(self.ends, end)
        self.end_i[k] = end
