"""SharedTable: records shared with forked children, find-or-claim by key, exact adds under contention."""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from gateway.pools.shared import SharedTable, SharedTableFull, key_hash
from tests.forking import run_forked


def test_fields_start_at_zero_and_add_returns_the_new_value():
    t = SharedTable(num_fields=3, capacity=4)
    s = t.slot("a")
    assert [t.get(s, f) for f in range(3)] == [0.0, 0.0, 0.0]
    assert t.add(s, 1, 2.5) == 2.5
    assert t.add(s, 1, -1.0) == 1.5
    with t.lock:
        t.set(s, 2, 7.0)
    assert (t.get(s, 1), t.get(s, 2), t.get(s, 0)) == (1.5, 7.0, 0.0)


def test_keys_get_distinct_slots_and_the_same_key_the_same_slot():
    t = SharedTable(num_fields=1, capacity=8)
    slots = [t.slot(f"k{i}") for i in range(8)]
    assert sorted(slots) == list(range(8))
    assert [t.slot(f"k{i}") for i in range(8)] == slots
    assert sorted(t.claimed()) == list(range(8))
    with pytest.raises(SharedTableFull, match="all 8 records"):
        t.slot("one too many")


def test_colliding_home_slots_probe_on():
    t = SharedTable(num_fields=1, capacity=3)
    # Keys whose hashes share a home slot must still get records of their own.
    keys = [k for k in (f"c{i}" for i in range(200)) if key_hash(k) % 3 == 0][:3]
    assert len({t.slot(k) for k in keys}) == 3


def test_concurrent_adds_from_forked_children_are_exact():
    t = SharedTable(num_fields=2, capacity=4)
    s = t.slot("counter")
    n = 20_000

    def adder() -> None:
        for _ in range(n):
            t.add(s, 0, 1.0)
            with t.lock:  # a read-modify-write by hand must be exact too
                t.set(s, 1, t.get(s, 1) + 2.0)

    run_forked([adder, adder])
    assert t.get(s, 0) == 2 * n
    assert t.get(s, 1) == 4 * n


def test_two_processes_claiming_the_same_key_get_the_same_slot(tmp_path):
    t = SharedTable(num_fields=1, capacity=64)
    t.slot("claimed before the fork")  # children inherit the cache and the record

    def claim(name: str) -> Callable[[], None]:
        def child() -> None:
            # Other keys first, in a different order per child, so each would land elsewhere if
            # the claim were not shared.
            others = [f"other{i}" for i in range(10)]
            for k in (others if name == "a" else others[::-1]):
                t.slot(k)
            s = t.slot("shared key")
            t.add(s, 0, 1.0)
            (tmp_path / name).write_text(str(s))
        return child

    run_forked([claim("a"), claim("b")])
    a, b = int((tmp_path / "a").read_text()), int((tmp_path / "b").read_text())
    assert a == b and t.slot("shared key") == a
    assert t.get(a, 0) == 2.0
    assert len(t.claimed()) == 12  # the pre-fork key, 10 others, the shared one: each once


def test_a_child_killed_holding_the_lock_does_not_block_the_rest():
    t = SharedTable(num_fields=1, capacity=2)
    s = t.slot("k")
    pid = os.fork()
    if pid == 0:
        t.lock.acquire()
        os.kill(os.getpid(), 9)  # dies inside the critical section
        os._exit(1)
    os.waitpid(pid, 0)
    # Take the lock in another child, so a regression fails this test instead of hanging pytest.
    pid = os.fork()
    if pid == 0:
        t.add(s, 0, 1.0)
        os._exit(0)
    for _ in range(3000):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the lock stayed held after its holder died")
    assert os.waitstatus_to_exitcode(status) == 0 and t.get(s, 0) == 1.0


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        SharedTable(num_fields=0, capacity=1)
    with pytest.raises(ValueError):
        SharedTable(num_fields=1, capacity=0)
