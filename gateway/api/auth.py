"""API keys, per-key limits and priority classes: the admission policy GatewayServer.prepare applies.

Keys live in config as the SHA-256 of the key (`meshgate hash-key`), so a leaked config does not leak
keys. A request's `Authorization: Bearer <key>` resolves to a Principal; each key has token buckets
for requests/min and tokens/min and a concurrency cap. Tokens are charged as an estimate at admission
and settled with the real usage when the request ends (Ticket.settle, called from the metering hook).
Under overload, on-demand requests are shed before contracted ones.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

from gateway.api.metrics import GatewayMetrics
from gateway.config import ApiKeyConfig, AuthConfig, LimitsConfig
from gateway.core.errors import Overloaded, RateLimited, Unauthorized

PRIORITY_HEADER = "x-meshgate-priority"
# The pool worker's scheduler admits lower numbers first; routing sees the same numbers.
PRIORITIES = {"contracted": 0, "on-demand": 1}
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

    def may_use(self, model: str) -> bool:
        return not self.models or model in self.models


class TokenBucket:
    """per_min units a minute, refilled continuously, holding at most one minute's worth.

    The level may go below zero when a request's settled usage exceeds what it was charged: that
    debt delays the key's next requests, so the limit holds for real usage, not just estimates.
    """

    __slots__ = ("capacity", "rate_per_s", "level", "stamp")

    def __init__(self, per_min: int, now: float):
        self.capacity = float(per_min)
        self.rate_per_s = per_min / 60.0
        self.level = self.capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate_per_s)
        self.stamp = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken (0: now)."""
        self._refill(now)
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate_per_s

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def give(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)


class _KeyState:
    """One key's live limits (None: unlimited)."""

    __slots__ = ("principal", "digest", "requests", "tokens", "max_concurrent", "in_flight")

    def __init__(self, k: ApiKeyConfig, now: float):
        self.digest = bytes.fromhex(k.sha256)
        self.principal = Principal(k.id, k.priority, frozenset(k.models), frozenset(c.upper() for c in k.countries))
        self.requests = TokenBucket(k.requests_per_min, now) if k.requests_per_min else None
        self.tokens = TokenBucket(k.tokens_per_min, now) if k.tokens_per_min else None
        self.max_concurrent = k.max_concurrent
        self.in_flight = 0


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

    def settle(self, tokens_used: int) -> None:
        """Free the concurrency slot and replace the token estimate with the real count."""
        state, self._state = self._state, None
        if state is None:
            return
        state.in_flight -= 1
        if state.tokens is not None:
            now = self._clock()
            if tokens_used <= self._charged:
                state.tokens.give(self._charged - tokens_used, now)
            else:
                state.tokens.take(tokens_used - self._charged, now)


class Admission:
    """Authentication, model visibility, shedding and per-key rate limits, in that order."""

    def __init__(self, cfg: AuthConfig, limits: LimitsConfig, metrics: GatewayMetrics,
                 clock: Callable[[], float] = time.monotonic):
        self.enabled = cfg.enabled
        self.clock = clock
        self.metrics = metrics
        now = clock()
        # Looked up by digest: the table is keyed by SHA-256 of the secret under Python's per-process
        # random SipHash, so lookup timing tells an attacker nothing about stored keys; compare_digest
        # then makes the final equality check constant-time, without an O(number of keys) scan.
        states = [_KeyState(k, now) for k in cfg.keys] if cfg.enabled else []
        self._by_digest = {s.digest: s for s in states}
        self._by_id = {s.principal.key_id: s for s in states}
        self.shed_at = max(1, int(limits.max_in_flight * limits.shed_on_demand_at))

    def authenticate(self, headers: Mapping[str, str]) -> Principal | None:
        """The caller's principal; None when auth is off. Raises Unauthorized (401)."""
        if not self.enabled:
            return None
        value = headers.get("authorization") or headers.get("Authorization") or ""
        scheme, _, key = value.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            self.metrics.rejected.labels("", "unauthenticated").inc()
            raise Unauthorized("You didn't provide an API key. You need to provide your API key in an "
                               "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        digest = hashlib.sha256(key.encode()).digest()
        state = self._by_digest.get(digest)
        if state is None or not hmac.compare_digest(digest, state.digest):
            self.metrics.rejected.labels("", "unauthenticated").inc()
            raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
        return state.principal

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
        now = self.clock()
        if state.max_concurrent and state.in_flight >= state.max_concurrent:
            # A slot frees when some request of this key ends: no way to know when, so a short hint.
            self._limited(state, "max_concurrent", f"concurrent requests (limit {state.max_concurrent})", 1.0)
        charge = float(tokens_estimate)
        if state.tokens is not None:
            # A request larger than a whole minute's tokens waits for a full bucket, then drains it;
            # settling charges the rest. Refusing it outright would make Retry-After a lie.
            charge = min(charge, state.tokens.capacity)
        wait_tok = state.tokens.wait_s(charge, now) if state.tokens is not None else 0.0
        if state.requests is not None and (wait_req := state.requests.wait_s(1, now)) > 0:
            # Retry-After covers both buckets, so a client that waits it out is admitted.
            self._limited(state, "requests_per_min", f"requests per min (limit {state.requests.capacity:g})",
                          max(wait_req, wait_tok))
        if state.tokens is not None and wait_tok > 0:
            self._limited(state, "tokens_per_min",
                          f"tokens per min (limit {state.tokens.capacity:g}, requested {charge:g})", wait_tok)
        if state.requests is not None:
            state.requests.take(1, now)
        if state.tokens is not None:
            state.tokens.take(charge, now)
        state.in_flight += 1
        return Ticket(principal.key_id, priority, state, charge if state.tokens is not None else 0, self.clock)

    def _limited(self, state: _KeyState, reason: str, what: str, wait_s: float) -> NoReturn:
        self.metrics.rejected.labels(state.principal.key_id, reason).inc()
        retry = max(1, math.ceil(wait_s))  # round up: retrying at Retry-After must succeed
        raise RateLimited(f"Rate limit reached for {what} on key '{state.principal.key_id}'. "
                          f"Please try again in {retry}s.", retry_after_s=retry, code="rate_limit_exceeded")

