"""Requests in flight as every gateway process sees them: per pool, and the gateway's own.

Routing credits a pool with the requests sent to it since its last load report (DESIGN.md §3), and
the gateway's in-flight limit and on-demand shedding count its client requests: with `meshgate serve
--workers N` those counts must cover all N processes, or each would see only its share of the
traffic. They live in a SharedTable (gateway/pools/shared.py) made before the processes fork; one
process alone gets a table of its own.

No lock: each process writes only its own two fields of a record (its requests in flight, and sent
in total), and readers sum over the processes. A single writer per field needs no read-modify-write
protection, and an aligned 8-byte store is never seen torn. Locking instead cost ~1 µs a time and
four times a request. When a process dies its in-flight field is zeroed (release_worker): its
requests will never finish.
"""
from __future__ import annotations

from gateway.pools.shared import SharedTable

GATEWAY = "gateway"  # the record of the gateway's own client requests
_FIELDS = 2  # per process: in flight, sent in total


def load_table(num_workers: int = 1, capacity: int = 8192) -> SharedTable:
    """capacity: pools the gateway may ever see, plus one (a registry may add pools later)."""
    return SharedTable(num_fields=_FIELDS * num_workers, capacity=capacity)


def num_workers(table: SharedTable) -> int:
    return table.num_fields // _FIELDS


def release_worker(table: SharedTable, worker_index: int) -> None:
    """Forget the requests a dead process had in flight (call once it is reaped: no writer then).
    Its sent totals stay: a replacement under the same index counts on from them."""
    for s in table.claimed():
        table.set(s, _FIELDS * worker_index, 0.0)


class InFlight:
    """One record: requests in flight and sent in total, summed over the processes."""

    __slots__ = ("_mine", "_n", "_rec")

    def __init__(self, table: SharedTable, key: str, worker_index: int):
        self._n = num_workers(table)
        assert 0 <= worker_index < self._n, worker_index
        self._rec = table.record(table.slot(key))
        self._mine = _FIELDS * worker_index  # this process' in-flight field; sent follows it

    @property
    def count(self) -> int:
        rec = self._rec
        return int(sum(rec[i] for i in range(0, _FIELDS * self._n, _FIELDS)))

    @property
    def sent(self) -> float:
        rec = self._rec
        return sum(rec[i] for i in range(1, _FIELDS * self._n, _FIELDS))

    def start(self) -> None:
        rec, i = self._rec, self._mine
        rec[i] += 1
        rec[i + 1] += 1

    def end(self) -> None:
        self._rec[self._mine] -= 1
