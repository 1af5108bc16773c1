"""Requests in flight as every gateway process sees them: per pool, and the gateway's own.

Routing credits a pool with the requests sent to it since its last load report (DESIGN.md §3), and
the gateway's in-flight limit and on-demand shedding count its client requests: with `meshgate serve
--workers N` those counts must cover all N processes, or each would see only its share of the
traffic. They live in a SharedTable (gateway/core/shared.py) made before the processes fork; one
process alone gets a table of its own. Each process also keeps its own share in a column of its
own, so a process that dies has its share given back (release_worker) instead of counting forever.
"""
from __future__ import annotations

from gateway.core.shared import SharedTable

IN_FLIGHT, SENT, SHARE = 0, 1, 2  # fields: in flight (all processes), sent in total, then each process' share
GATEWAY = "gateway"  # the record of the gateway's own client requests


def load_table(num_workers: int = 1, capacity: int = 8192) -> SharedTable:
    """capacity: pools the gateway may ever see, plus one (a registry may add pools later)."""
    return SharedTable(num_fields=SHARE + num_workers, capacity=capacity)


def release_worker(table: SharedTable, worker_index: int) -> None:
    """Forget the in-flight share of a process that died (its requests will never finish)."""
    column = SHARE + worker_index
    with table.lock:
        for s in table.claimed():
            table.set(s, IN_FLIGHT, table.get(s, IN_FLIGHT) - table.get(s, column))
            table.set(s, column, 0.0)


class InFlight:
    """One record: requests in flight (all processes) and sent in total."""

    __slots__ = ("_lock", "_rec", "_column")

    def __init__(self, table: SharedTable, key: str, worker_index: int):
        assert 0 <= worker_index < table.num_fields - SHARE, worker_index
        self._lock = table.lock
        self._rec = table.record(table.slot(key))
        self._column = SHARE + worker_index

    @property
    def count(self) -> int:
        return int(self._rec[IN_FLIGHT])

    @property
    def sent(self) -> float:
        return self._rec[SENT]

    def start(self) -> None:
        rec = self._rec
        with self._lock:
            rec[IN_FLIGHT] += 1
            rec[self._column] += 1
            rec[SENT] += 1

    def end(self) -> None:
        rec = self._rec
        with self._lock:
            rec[IN_FLIGHT] -= 1
            rec[self._column] -= 1
