"""API keys, per-key limits and priority classes: the admission policy GatewayServer.prepare applies.

Keys live in config as the SHA-256 of the key (`meshgate hash-key`), so a leaked config does not leak
keys. A request's `Authorization: Bearer <key>` resolves to a Principal; each key has token buckets
for requests/min and tokens/min and a concurrency cap. Tokens are charged as an estimate at admission
and settled with the real usage when the request ends (Ticket.settle, called from the metering hook).
Under overload, on-demand requests are shed before contracted ones.

The live limits (both buckets and the requests in flight of each key) sit in a SharedTable, so
gateway processes forked from one parent enforce each key's limits together: N processes admit a
key's requests_per_min once, not N times. Each check-and-take holds the table's lock.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

from gateway.edge.metrics import GatewayMetrics
from gateway.config import ApiKeyConfig, AuthConfig, LimitsConfig
from gateway.core.errors import Overloaded, RateLimited, Unauthorized
from gateway.core.wire import PRIORITY_HEADER
from gateway.pools.shared import SharedTable

ON_DEMAND = "on-demand"


def hash_key(key: str) -> str:
    """The hex digest config stores for an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is from, as far as the gateway cares."""

    key_id: str
    priority: str  # contracted | on-demand
    models: frozenset[str]  # empty: every model
    countries: frozenset[str] = frozenset()  # residency; empty: any
    admin: bool = False  # may read the operator's views and every key's usage
    hedge: bool = True  # its late first tokens may be raced on a second pool (edge/hedge.py)

    def may_use(self, model: str) -> bool:
        return not self.models or model in self.models


class TokenBucket:
    """per_min units a minute, refilled continuously, holding at most one minute's worth.

    The level may go below zero when a request's settled usage exceeds what it was charged: that
    debt delays the key's next requests, so the limit holds for real usage, not just estimates.

    The state is two fields of a SharedTable record, so every gateway process sharing the table draws
    from one bucket: `used` (units taken and not yet refilled: 0 is a full bucket, so a freshly
    claimed record needs no setup) and `stamp` (the clock at the last refill; time.monotonic is one
    clock for all processes of a Linux host). Call the methods under the table's lock.
    """

    __slots__ = ("capacity", "rate_per_s", "_rec", "_used", "_stamp")

    def __init__(self, per_min: int, table: SharedTable | None = None, slot: int = 0, field: int = 0):
        if table is None:  # a bucket of its own
            table = SharedTable(num_fields=2, capacity=1)
            slot, field = table.slot("bucket"), 0
        self.capacity = float(per_min)
        self.rate_per_s = per_min / 60.0
        self._rec = table.record(slot)
        self._used, self._stamp = field, field + 1

    @property
    def level(self) -> float:
        return self.capacity - self._rec[self._used]

    def _refill(self, now: float) -> float:
        """Bring the bucket to now; returns its level."""
        rec, used, stamp = self._rec, self._used, self._stamp
        if now > rec[stamp]:  # not otherwise: another process may have stamped a later clock reading
            rec[used] = max(0.0, rec[used] - (now - rec[stamp]) * self.rate_per_s)
            rec[stamp] = now
        return self.capacity - rec[used]

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken (0: now)."""
        level = self._refill(now)
        return 0.0 if level >= amount else (amount - level) / self.rate_per_s

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self._rec[self._used] += amount

    def give(self, amount: float, now: float) -> None:
        self._refill(now)
        self._rec[self._used] = max(0.0, self._rec[self._used] - amount)


class FailureLimiter:
    """Failed key checks per client address, in fixed one-minute windows; past `per_min` the address
    is refused (429) until its window ends. Bounded: at most `max_addresses` tracked (expired ones go
    first; then the oldest), so a flood from many addresses costs memory once, not per address.
    Per process: with N gateway processes an address may fail up to N times the bound."""

    __slots__ = ("per_min", "clock", "max_addresses", "_seen")

    def __init__(self, per_min: int, clock: Callable[[], float], max_addresses: int = 65536):
        self.per_min = per_min
        self.clock = clock
        self.max_addresses = max_addresses
        self._seen: dict[str, list[float]] = {}  # address -> [failures, window start]

    def check(self, client: str) -> None:
        rec = self._seen.get(client)
        if rec is None or not self.per_min or rec[0] < self.per_min:
            return
        left = rec[1] + 60.0 - self.clock()
        if left <= 0:
            del self._seen[client]
            return
        raise RateLimited("Too many failed API key checks from this address; try again later.",
                          retry_after_s=max(1, math.ceil(left)), code="too_many_auth_failures")

    def failed(self, client: str) -> None:
        if not self.per_min:
            return
        now = self.clock()
        rec = self._seen.get(client)
        if rec is None or now - rec[1] >= 60.0:
            if rec is None and len(self._seen) >= self.max_addresses:
                self._evict(now)
            self._seen[client] = [1.0, now]
        else:
            rec[0] += 1

    def _evict(self, now: float) -> None:
        for addr in [a for a, r in self._seen.items() if now - r[1] >= 60.0]:
            del self._seen[addr]
        while len(self._seen) >= self.max_addresses:
            del self._seen[next(iter(self._seen))]  # the oldest window first (insertion order)


# A key's record in the limits table: its two buckets, its requests in flight in all processes, then
# each worker's share of those (so a dead worker's share can be given back: release_worker).
_REQUESTS, _TOKENS, _IN_FLIGHT, _WORKER_IN_FLIGHT = 0, 2, 4, 5


def limit_table(cfg: AuthConfig, num_workers: int = 1) -> SharedTable:
    """The table Admission keeps live key limits in. For N processes, make it before forking them
    and give it to each one's Admission with its worker_index (0..num_workers-1)."""
    # Twice the keys: open addressing stays short; records of keys dropped from config linger, harmlessly.
    return SharedTable(num_fields=_WORKER_IN_FLIGHT + num_workers, capacity=2 * len(cfg.keys) + 1)


def release_worker(table: SharedTable, worker_index: int) -> None:
    """Give back the concurrency slots a dead worker held: its requests will never settle. Called
    by a worker's Admission as it starts (a replacement takes over its index) and fit for a
    supervisor to call when it reaps a worker."""
    column = _WORKER_IN_FLIGHT + worker_index
    with table.lock:
        for s in table.claimed():
            table.set(s, _IN_FLIGHT, table.get(s, _IN_FLIGHT) - table.get(s, column))
            table.set(s, column, 0.0)


class _KeyState:
    """One key's limits (None: unlimited); the live counts are in its record of the limits table."""

    __slots__ = ("principal", "digest", "requests", "tokens", "max_concurrent", "table", "rec", "column")

    def __init__(self, k: ApiKeyConfig, table: SharedTable, worker_index: int):
        self.digest = bytes.fromhex(k.sha256)
        self.principal = Principal(k.id, k.priority, frozenset(k.models), frozenset(c.upper() for c in k.countries),
                                   k.admin, k.hedge)
        self.table = table
        s = table.slot(f"key:{k.id}")
        self.rec = table.record(s)
        self.requests = TokenBucket(k.requests_per_min, table, s, _REQUESTS) if k.requests_per_min else None
        self.tokens = TokenBucket(k.tokens_per_min, table, s, _TOKENS) if k.tokens_per_min else None
        self.max_concurrent = k.max_concurrent
        self.column = _WORKER_IN_FLIGHT + worker_index  # this process' share of in_flight

    @property
    def in_flight(self) -> float:
        return self.rec[_IN_FLIGHT]

    def count_in_flight(self, delta: float) -> None:
        """Under the table's lock."""
        self.rec[_IN_FLIGHT] += delta
        self.rec[self.column] += delta


class Ticket:
    """An admitted request's hold on its key's limits. settle() once, when the request ends."""

    __slots__ = ("key_id", "priority", "_state", "_charged", "_clock")

    def __init__(self, key_id: str | None, priority: str | None, state: _KeyState | None, charged: float,
                 clock: Callable[[], float]):
        self.key_id = key_id
        self.priority = priority  # what the pool is told (x-meshgate-priority); None: nothing
        self._state = state
        self._charged = charged
        self._clock = clock

    def settle(self, tokens_used: int | None) -> None:
        """Free the concurrency slot and replace the token estimate with the real count (None:
        unknown, the estimate stands)."""
        state, self._state = self._state, None
        if state is None:
            return
        with state.table.lock:
            state.count_in_flight(-1)
            if state.tokens is not None:
                now = self._clock()
                used = self._charged if tokens_used is None else tokens_used
                if used <= self._charged:
                    state.tokens.give(self._charged - used, now)
                else:
                    state.tokens.take(used - self._charged, now)


class Admission:
    """Authentication, model visibility, shedding and per-key rate limits, in that order.

    Live limits (buckets, requests in flight) are kept in `shared`, a limit_table(): one per process
    by default; with several gateway processes, one made before forking, shared by all of them, so a
    key gets its limits once across the processes, not once per process.
    """

    def __init__(self, cfg: AuthConfig, limits: LimitsConfig, metrics: GatewayMetrics,
                 clock: Callable[[], float] = time.monotonic, shared: SharedTable | None = None,
                 worker_index: int = 0):
        self.enabled = cfg.enabled
        self.clock = clock
        self.metrics = metrics
        table = shared if shared is not None else limit_table(cfg)
        if not 0 <= worker_index < table.num_fields - _WORKER_IN_FLIGHT:
            raise ValueError(f"worker_index {worker_index}: the limits table was made for "
                             f"{table.num_fields - _WORKER_IN_FLIGHT} workers")
        # Looked up by digest: the table is keyed by SHA-256 of the secret under Python's per-process
        # random SipHash, so lookup timing tells an attacker nothing about stored keys; compare_digest
        # then makes the final equality check constant-time, without an O(number of keys) scan.
        states = [_KeyState(k, table, worker_index) for k in cfg.keys] if cfg.enabled else []
        release_worker(table, worker_index)  # whatever a former holder of this index left counted
        self._by_digest = {s.digest: s for s in states}
        self._by_id = {s.principal.key_id: s for s in states}
        self.shed_at = max(1, int(limits.max_in_flight * limits.shed_on_demand_at))
        self.failures = FailureLimiter(cfg.max_failures_per_min, clock)

    def authenticate(self, headers: Mapping[str, str], client: str | None = None) -> Principal | None:
        """The caller's principal; None when auth is off. Raises Unauthorized (401), or RateLimited
        (429) when `client` (its address) has failed too often this minute."""
        if not self.enabled:
            return None
        if client is not None:
            self.failures.check(client)  # before any hashing: a 401 storm costs a dict lookup a request
        value = headers.get("authorization") or headers.get("Authorization") or ""
        scheme, _, key = value.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            self._failed(client)
            raise Unauthorized("You didn't provide an API key. You need to provide your API key in an "
                               "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        digest = hashlib.sha256(key.encode()).digest()
        state = self._by_digest.get(digest)
        if state is None or not hmac.compare_digest(digest, state.digest):
            self._failed(client)
            raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
        return state.principal

    def _failed(self, client: str | None) -> None:
        self.metrics.rejected.labels("", "unauthenticated").inc()
        if client is not None:
            self.failures.failed(client)

    def may_use(self, principal: Principal | None, model: str) -> bool:
        if principal is None or principal.may_use(model):
            return True
        self.metrics.rejected.labels(principal.key_id, "model_not_allowed").inc()
        return False

    def admit(self, principal: Principal | None, headers: Mapping[str, str], in_flight: int,
              tokens_estimate: int) -> Ticket:
        """Admit one request or raise 429/503 with Retry-After. Call last in prepare: it takes from
        the key's buckets, which only Ticket.settle gives back."""
        # With auth on, the key decides the class; with auth off, the client's header passes through.
        priority = principal.priority if principal is not None else headers.get(PRIORITY_HEADER)
        if priority == ON_DEMAND and in_flight >= self.shed_at:
            self.metrics.rejected.labels(principal.key_id if principal else "", "shed").inc()
            raise Overloaded("The gateway is busy and sheds on-demand requests first; retry later.", retry_after_s=1)
        if principal is None:
            return Ticket(None, priority, None, 0, self.clock)
        state = self._by_id[principal.key_id]
        charge = float(tokens_estimate)
        if state.tokens is not None:
            # A request larger than a whole minute's tokens waits for a full bucket, then drains it;
            # settling charges the rest. Refusing it outright would make Retry-After a lie.
            charge = min(charge, state.tokens.capacity)
        # Check and take in one hold of the lock: other processes admit against the same key.
        with state.table.lock:
            refused = self._take(state, charge, self.clock())
        if refused is not None:
            self._limited(state, *refused)
        return Ticket(principal.key_id, priority, state, charge if state.tokens is not None else 0, self.clock)

    @staticmethod
    def _take(state: _KeyState, charge: float, now: float) -> tuple[str, str, float] | None:
        """Under the lock: take a request's share of the key's limits, or say why not
        (reason, what was exceeded, seconds to wait) and take nothing."""
        if state.max_concurrent and state.in_flight >= state.max_concurrent:
            # A slot frees when some request of this key ends: no way to know when, so a short hint.
            return "max_concurrent", f"concurrent requests (limit {state.max_concurrent})", 1.0
        wait_tok = state.tokens.wait_s(charge, now) if state.tokens is not None else 0.0
        if state.requests is not None and (wait_req := state.requests.wait_s(1, now)) > 0:
            # Retry-After covers both buckets, so a client that waits it out is admitted.
            return ("requests_per_min", f"requests per min (limit {state.requests.capacity:g})",
                    max(wait_req, wait_tok))
        if state.tokens is not None and wait_tok > 0:
            return "tokens_per_min", f"tokens per min (limit {state.tokens.capacity:g}, requested {charge:g})", wait_tok
        if state.requests is not None:
            state.requests.take(1, now)
        if state.tokens is not None:
            state.tokens.take(charge, now)
        state.count_in_flight(1)
        return None

    def _limited(self, state: _KeyState, reason: str, what: str, wait_s: float) -> NoReturn:
        self.metrics.rejected.labels(state.principal.key_id, reason).inc()
        retry = max(1, math.ceil(wait_s))  # round up: retrying at Retry-After must succeed
        raise RateLimited(f"Rate limit reached for {what} on key '{state.principal.key_id}'. "
                          f"Please try again in {retry}s.", retry_after_s=retry, code="rate_limit_exceeded")

