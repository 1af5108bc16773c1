"""SharedTable: float64 records shared by processes forked after it is made, keyed by string ids.

`meshgate serve` forks its worker processes after building the tables it needs, so one anonymous
MAP_SHARED mapping is all the sharing there is: no file, no name, nothing left behind; the mapping
goes away with the last process that holds it.

Layout: `capacity` records of `1 + num_fields` float64 words each. Word 0 holds the key's 64-bit
blake2b hash (read as uint64; 0 marks a free record), the rest are the fields, zero when claimed.
Records are found by open addressing (linear probing from hash % capacity) and never freed: tables
hold bounded id sets (API keys, pools), and a never-freed record needs no tombstones. Two ids with the
same 64-bit hash would share a record; at the table sizes used here that is vanishingly unlikely.

Reads take no lock: the mapping is page-aligned, so every word is an aligned 8-byte load that no
concurrent store can tear on the 64-bit machines we run on. Writes and read-modify-writes take the
table's one cross-process lock (`ProcessLock`: see there why it is a POSIX record lock).
"""
from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import threading
from types import TracebackType

_WORD = 8


class SharedTableFull(RuntimeError):
    """Every record is claimed: the table was sized too small for its ids."""


class ProcessLock:
    """A mutex across processes (forked after it is made) and across threads of each process.

    A POSIX record lock (fcntl) on a private memfd, not a semaphore: the kernel drops it when its
    holder dies, so a worker killed inside a critical section (OOM killer, kill -9) cannot leave every
    other worker blocked forever, as a multiprocessing.Lock would. Record locks belong to a process,
    not a thread, hence the threading.Lock in front. Not reentrant. Uncontended, a with-block costs
    about 1.1 us (two syscalls) against 0.3 us for a multiprocessing.Lock (measured on the 2-core dev
    machine); a request takes the lock a few times, next to hundreds of us of other work.
    """

    __slots__ = ("_fd", "_thread")

    def __init__(self) -> None:
        # CLOEXEC (the default): forked children keep the fd, exec'd programs do not get it.
        self._fd = os.memfd_create("meshgate-shared-lock")
        self._thread = threading.Lock()

    def acquire(self) -> None:
        self._thread.acquire()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread.release()
            raise

    def release(self) -> None:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread.release()

    def __enter__(self) -> ProcessLock:
        self.acquire()
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def key_hash(key: str) -> int:
    """The 64-bit id stored for a key (never 0: 0 marks a free record)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h or 1


class SharedTable:
    """`capacity` records of `num_fields` float64 fields, shared with processes forked later.

    slot(key) finds or claims a key's record; get() reads a field without locking; add() and set()
    change one. For a read-check-modify over several fields, hold `lock` around get()/set():

        with table.lock:
            if table.get(s, IN_FLIGHT) < limit:
                table.set(s, IN_FLIGHT, table.get(s, IN_FLIGHT) + 1)

    The lock is not reentrant: inside it use get/set/record only (slot() and add() take it).
    """

    def __init__(self, num_fields: int, capacity: int):
        if num_fields < 1 or capacity < 1:
            raise ValueError(f"SharedTable needs num_fields >= 1 and capacity >= 1, got {num_fields}, {capacity}")
        self.num_fields = num_fields
        self.capacity = capacity
        self._stride = 1 + num_fields  # words per record: hash, then the fields
        self._mem = mmap.mmap(-1, capacity * self._stride * _WORD, flags=mmap.MAP_SHARED)
        view = memoryview(self._mem)
        self._f = view.cast("d")  # the words as float64 (fields)
        self._h = view.cast("Q")  # the same words as uint64 (hashes)
        self.lock = ProcessLock()
        # key -> slot, per process (a forked child inherits the parent's, which stays valid): the
        # lock is taken once per key per process.
        self._slots: dict[str, int] = {}

    def slot(self, key: str) -> int:
        """The key's record, claimed on first use by any process. Raises SharedTableFull."""
        found = self._slots.get(key)
        if found is not None:
            return found
        h = key_hash(key)
        with self.lock:
            i = h % self.capacity
            for _ in range(self.capacity):
                held = self._h[i * self._stride]
                if held == h:
                    break
                if held == 0:
                    self._h[i * self._stride] = h  # fields are already 0: fresh mapping, never freed
                    break
                i = (i + 1) % self.capacity
            else:
                raise SharedTableFull(f"SharedTable: all {self.capacity} records are taken; "
                                      f"cannot add {key!r} (size the table for every id it will hold)")
        self._slots[key] = i
        return i

    def find(self, key: str) -> int | None:
        """The key's record if some process claimed it, else None; claims nothing, takes no lock."""
        found = self._slots.get(key)
        if found is not None:
            return found
        h = key_hash(key)
        i = h % self.capacity
        for _ in range(self.capacity):
            held = self._h[i * self._stride]
            if held == h:
                self._slots[key] = i
                return i
            if held == 0:
                return None
            i = (i + 1) % self.capacity
        return None

    def claimed(self) -> list[int]:
        """Every claimed slot (in any process), for sweeps such as forgetting a dead process' share."""
        return [i for i in range(self.capacity) if self._h[i * self._stride] != 0]

    def get(self, slot: int, field: int) -> float:
        """One field, read without the lock (a single aligned 8-byte load)."""
        # A field out of range would silently land in the next record: a bug, so assert.
        assert 0 <= field < self.num_fields, field
        return self._f[slot * self._stride + 1 + field]

    def set(self, slot: int, field: int, value: float) -> None:
        """Write one field. Hold `lock` (it is the only way to make a read-check-write atomic)."""
        assert 0 <= field < self.num_fields, field
        self._f[slot * self._stride + 1 + field] = value

    def add(self, slot: int, field: int, delta: float) -> float:
        """Add delta to one field under the lock; returns the new value."""
        assert 0 <= field < self.num_fields, field
        at = slot * self._stride + 1 + field
        with self.lock:
            value = self._f[at] + delta
            self._f[at] = value
        return value

    def record(self, slot: int) -> memoryview[float]:
        """The slot's fields as a float64 view (rec[field]), for code that reads and writes one record
        many times: indexing it costs a fraction of a get()/set() call. The same rules: reads
        anywhere, writes under `lock`."""
        base = slot * self._stride + 1
        return self._f[base:base + self.num_fields]


class SharedNames:
    """An append-only list of distinct short strings, shared by processes forked after it is made:
    the ids some SharedTable records belong to, when readers must list them (a table keeps hashes).

    Layout: a uint64 count of bytes used, then entries of a 2-byte length and UTF-8 bytes. Appends
    take the lock and publish the new end last, so a reader without the lock sees whole entries.
    Bounded: at most max_names names and capacity_bytes bytes; add() says False when a name does
    not fit (the caller decides what not being listed costs).
    """

    def __init__(self, max_names: int, capacity_bytes: int):
        self.max_names = max_names
        self._mem = mmap.mmap(-1, _WORD + capacity_bytes, flags=mmap.MAP_SHARED)
        self._used = memoryview(self._mem)[:_WORD].cast("Q")
        self.lock = ProcessLock()
        self._names: list[str] = []  # this process' copy of the list, read up to byte _read
        self._index: set[str] = set()
        self._read = _WORD

    def _catch_up(self) -> None:
        end = _WORD + self._used[0]
        while self._read < end:
            n = int.from_bytes(self._mem[self._read:self._read + 2], "little")
            name = self._mem[self._read + 2:self._read + 2 + n].decode()
            self._names.append(name)
            self._index.add(name)
            self._read += 2 + n

    def add(self, name: str) -> bool:
        """Lists name (once, whichever process adds it); False: the list is full."""
        if name in self._index:
            return True
        data = name.encode()
        with self.lock:
            self._catch_up()
            if name in self._index:
                return True
            at = _WORD + self._used[0]
            if len(self._names) >= self.max_names or len(data) > 0xFFFF or at + 2 + len(data) > len(self._mem):
                return False
            self._mem[at:at + 2] = len(data).to_bytes(2, "little")
            self._mem[at + 2:at + 2 + len(data)] = data
            self._used[0] = at + 2 + len(data) - _WORD  # published last: readers see whole entries
            self._catch_up()
        return True

    def names(self) -> list[str]:
        self._catch_up()
        return list(self._names)
