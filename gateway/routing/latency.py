"""Latency-aware plug-ins: the expected time to first token of a request at each pool.

    expected_ttft = rtt(client -> gateway) + rtt(gateway -> pool) + queue_wait(pool) + prefill(pool)
                  + late(pool)

late(pool) is how much later than this model predicted the pool's first bytes have come lately
(gateway/routing/lateness.py; 0 until measured).

rtt(gateway -> pool) is the probes' EWMA when measured, else the estimate (coordinates, else distance). queue_wait is
the prefill backlog the pool last reported plus the prefill of what this gateway sent since
(in-flight crediting), plus the wait for a batch slot, weighted by how likely the pool is to have
none left when the request gets there. That likelihood is what a stale report hides: a pool that
said "one slot free" a second ago has most likely been filled since by other gateways, while one
that said "full" may have freed several. From the report's headroom (slots - running - waiting),
less what this gateway sent since, the occupancy when the request gets there is taken as normal
around the reported one with the variance of the departures until then (slot turnover x time):
the time is the report's age plus the round trip to the pool (the report was made half a round
trip before it came, the request gets there half a round trip after it leaves); a pushed report
(Endpoint.load_pushed) has no age, since the pool would have said had it changed. P(full)
follows, and a full pool's wait is a slot's turnover time per request ahead (mean request duration
/ slots). Pools that do not report their slots (third-party servers) keep their own queue_wait_s,
counted down by the report's age. A pool whose connections from this gateway are all busy has a
queue here too: the recent connection wait (Endpoint.connection_wait_s) is added.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable

from gateway.core.errors import RateLimited
from gateway.core.types import Endpoint, LoadReport, RouteRequest

UNKNOWN_RTT_MS = 100.0  # a pool with no measurement and no coordinates: assume far
# The spread of the slot count at a report's own moment (it is at least an RTT old, and its count
# is a sample): a fresh report of one free slot is full with probability ~0.16, of none ~0.84.
BASE_SPREAD_SLOTS = 0.5
_SQRT2 = math.sqrt(2.0)
MAX_WAIT_MEMO = 65_536  # pools whose last no-age wait is kept (cleared when full: pools come and go)
MEMO_S = 0.001  # a prediction is reused for the same request this long (the rest of its decision)


def full_probability(load: LoadReport, headroom: int, age_s: float) -> float:
    """P(no free slot now) for a pool that reported `headroom` free slots age_s ago: the occupancy
    is taken as normal around the reported one, with the variance of the slots freed since (a
    Poisson count at the pool's turnover rate) and BASE_SPREAD_SLOTS at the report itself."""
    # (conditionals, not min/max: this runs for every candidate of every decision)
    busy = load.running if load.running < load.max_num_seqs else load.max_num_seqs
    turnover = (busy if busy > 1 else 1) / load.mean_request_s  # slots freed per second
    spread = math.sqrt(turnover * age_s + BASE_SPREAD_SLOTS**2)
    return 0.5 * math.erfc((headroom - 0.5) / (spread * _SQRT2))


class TtftModel:
    """clock: the time base of Endpoint.load_at (time.monotonic in the gateway; the simulator's
    clock in benchmarks/mesh_sim.py). use_cache: charge prefill only for the part of the prompt the
    pool is estimated to hold (Endpoint.prefix, the session's pool); False: the whole prompt."""

    def __init__(self, default_prefill_tps: float, clock: Callable[[], float] = time.monotonic,
                 use_cache: bool = True):
        self.default_prefill_tps = default_prefill_tps
        self.clock = clock
        self.use_cache = use_cache
        # The last predict_all_s (request, clock, endpoints, predictions, cached tokens): a decision
        # explains its first two pools right after scoring them (framework.Profile.route), so
        # predict_s / cached_tokens of the same request within MEMO_S answer from it
        self._memo: tuple[RouteRequest, float, list[Endpoint], list[float], list[int]] | None = None
        # pool id -> (report, sent since it, rtt_s, prefill tps, its wait): _pool_queue_s for reports without age
        self._wait_memo: dict[str, tuple[LoadReport, int, float, float, float]] = {}

    def _memo_index(self, req: RouteRequest, e: Endpoint) -> int:
        """e's place in the last predict_all_s when it was for this request just now, else -1."""
        memo = self._memo
        if memo is None or memo[0] is not req or self.clock() - memo[1] > MEMO_S:
            return -1
        for i, x in enumerate(memo[2]):
            if x is e:
                return i
        return -1

    def cached_tokens(self, req: RouteRequest, e: Endpoint) -> int:
        """Prompt tokens the pool is estimated to hold: leading chunks matched x tokens a chunk (the
        session's last pool: at least its last turn's chunks), at most the prompt less one token."""
        i = self._memo_index(req, e)
        if i >= 0 and self._memo is not None:
            return self._memo[4][i]
        hashes = req.prefix_hashes
        if not self.use_cache or not hashes:
            return 0
        k = e.prefix.matched(hashes) if e.prefix is not None else 0
        if req.session_pool and e.pool_id == req.session_pool:
            k = max(k, min(req.session_chunks, len(hashes)))
        return min(int(k * req.tokens_per_chunk), req.prompt_tokens - 1) if k else 0

    def rtt_s(self, e: Endpoint) -> float:
        ms = e.rtt_ms if e.rtt_ms is not None else e.prior_rtt_ms
        return (ms if ms is not None else UNKNOWN_RTT_MS) / 1000.0

    def prefill_tps(self, e: Endpoint) -> float:
        tps = e.load.prefill_tps if e.load is not None else 0.0
        return tps if tps > 0 else self.default_prefill_tps

    def queue_s(self, req: RouteRequest, e: Endpoint) -> float:
        """Expected wait before the request's first step: prefill backlog + P(no slot) x slot wait.
        With no report, the prefill of what is in flight from here."""
        return self._queue_s(e, req.prompt_tokens, self.prefill_tps(e), self.clock(), self.rtt_s(e))

    def predict_s(self, req: RouteRequest, e: Endpoint) -> float:
        i = self._memo_index(req, e)
        if i >= 0 and self._memo is not None:
            return self._memo[3][i]
        return self._predict_s(e, req.prompt_tokens, req.client_rtt_ms / 1000.0, self.clock(),
                               self.cached_tokens(req, e))

    def predict_all_s(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[float]:
        """predict_s for each endpoint; what depends only on the request is worked out once."""
        tokens, base_s, now = req.prompt_tokens, req.client_rtt_ms / 1000.0, self.clock()
        hashes = req.prefix_hashes
        if not self.use_cache or not hashes:
            pred = [self._predict_s(e, tokens, base_s, now) for e in endpoints]
            self._memo = (req, now, endpoints, pred, [0] * len(endpoints))
            return pred
        # cached_tokens for each endpoint, with what depends only on the request worked out once
        per_chunk, cap, n = req.tokens_per_chunk, tokens - 1, len(hashes)
        session, session_k = req.session_pool, min(req.session_chunks, n)
        matched = matched_chunks(hashes, endpoints)
        out, cached = [], []
        for e, k in zip(endpoints, matched):
            if session and session_k > k and e.pool_id == session:
                k = session_k
            c = min(int(k * per_chunk), cap) if k else 0
            cached.append(c)
            out.append(self._predict_s(e, tokens, base_s, now, c))
        self._memo = (req, now, endpoints, out, cached)
        return out

    def _predict_s(self, e: Endpoint, tokens: int, client_rtt_s: float, now: float, cached: int = 0) -> float:
        tps = self.prefill_tps(e)
        rtt = self.rtt_s(e)
        # the queue ahead is charged whole prompts (what is queued there is not known to be cached);
        # this request's own prefill only its uncached part
        return (client_rtt_s + rtt + self._queue_s(e, tokens, tps, now, rtt) + (tokens - cached) / tps
                + e.first_byte_excess_s)  # first bytes measured later than this predicts (routing/lateness.py)

    def _queue_s(self, e: Endpoint, tokens: int, tps: float, now: float, rtt_s: float = 0.0) -> float:
        # Plus the gateway's own queue in front of the pool: the recent wait for a free connection.
        return self._pool_queue_s(e, tokens, tps, now, rtt_s) + e.connection_wait_s

    def _pool_queue_s(self, e: Endpoint, tokens: int, tps: float, now: float, rtt_s: float) -> float:
        load = e.load
        if load is None:
            return e.in_flight * tokens / tps
        mine = e.sent_since_report * tokens / tps  # sent since the report: it cannot know them
        if e.load_at > 0 and not e.load_pushed:
            return self._pool_wait_s(e, load, tps, max(0.0, now - e.load_at), rtt_s) + mine
        # No age (unknown, or pushed: the stream would have told of a change): the rest depends
        # only on the report, what was sent since and the RTT, so it is worked out once for them
        # (most candidates' reports are pushed; the P(full) term is most of a prediction's cost)
        memo = self._wait_memo.get(e.pool_id)
        sent = e.sent_since_report
        if memo is not None and memo[0] is load and memo[1] == sent and memo[2] == rtt_s and memo[3] == tps:
            return memo[4] + mine
        wait = self._pool_wait_s(e, load, tps, 0.0, rtt_s)
        if len(self._wait_memo) >= MAX_WAIT_MEMO:  # pools come and go: bounded
            self._wait_memo.clear()
        self._wait_memo[e.pool_id] = (load, sent, rtt_s, tps, wait)
        return wait + mine

    def _pool_wait_s(self, e: Endpoint, load: LoadReport, tps: float, age: float, rtt_s: float) -> float:
        """The wait at the pool before a request's first step, less the prefill of what this
        gateway sent since the report (the caller's `mine`)."""
        # Slots change while the report travels here (made half a round trip before it came) and
        # while the request travels there (half a round trip): the uncertainty runs over both.
        horizon = age + rtt_s
        if load.max_num_seqs <= 0 or load.mean_request_s <= 0:
            return max(0.0, load.queue_wait_s - age)
        headroom = load.max_num_seqs - load.running - load.waiting - e.sent_since_report
        slot_s = load.mean_request_s / load.max_num_seqs  # one slot frees this often when all are busy
        wait_if_full = max(1, 1 - headroom) * slot_s
        return load.queued_prompt_tokens / tps + full_probability(load, headroom, horizon) * wait_if_full


def matched_chunks(hashes: tuple[int, ...], endpoints: list[Endpoint]) -> list[int]:
    """Leading chunks each endpoint's pool likely holds: one pass of the gateway's prefix index
    (gateway/routing/prefix_index.py) when the endpoints have one, else each holder's own answer."""
    for e in endpoints:
        holder = e.prefix
        if holder is not None:
            index = getattr(holder, "index", None)
            if index is not None and hasattr(index, "match_all"):
                return list(index.match_all(hashes, endpoints))
            break
    return [e.prefix.matched(hashes) if e.prefix is not None else 0 for e in endpoints]


class LatencyScorer:
    """1 for the pool predicted to answer first, the others by how much later they would."""

    name = "latency"

    def __init__(self, model: TtftModel, session_preference: float = 1.0):
        self.model = model
        self.session_preference = session_preference  # the session's last pool: predicted TTFT x this

    def score(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[float]:
        pred = self.model.predict_all_s(req, endpoints)
        if req.session_pool and self.session_preference != 1.0 and self.model.use_cache:
            pred = [p * self.session_preference if e.pool_id == req.session_pool else p
                    for e, p in zip(endpoints, pred)]
        best = min(pred)
        return [best / p if p > 0 else 1.0 for p in pred]


class NearestScorer:
    """Network distance only: the lowest gateway -> pool RTT wins (the `nearest` baseline)."""

    name = "nearest"

    def __init__(self, model: TtftModel):
        self.model = model

    def score(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[float]:
        rtt = [self.model.rtt_s(e) for e in endpoints]
        best = min(rtt)
        return [best / r if r > 0 else 1.0 for r in rtt]


class PrefixAffinity:
    """Rendezvous hashing of the prompt's start over pools: requests sharing a prefix (a system
    prompt) prefer the same pool, whose prefix cache is then warm. Weighted low, it breaks near-ties
    so a warm pool a few ms further away can win."""

    name = "prefix-affinity"

    def __init__(self) -> None:
        self._pool_hash: dict[str, int] = {}  # pool id -> its 64-bit hash (pools are few, ids stable)

    def score(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[float]:
        if not req.prefix_key or len(endpoints) < 2:
            return [0.0] * len(endpoints)
        # One keyed hash of the prefix, then a cheap mix with each pool's: the same on every gateway
        # (no per-process hash seed), so a prefix prefers the same pool wherever it arrives.
        key = _hash64(req.prefix_key)
        weights = [_mix64(key ^ self._pool(e.pool_id)) for e in endpoints]
        top = max(weights)
        return [1.0 if w == top else 0.0 for w in weights]

    def _pool(self, pool_id: str) -> int:
        h = self._pool_hash.get(pool_id)
        if h is None:
            h = self._pool_hash[pool_id] = _hash64(pool_id)
        return h


_M64 = (1 << 64) - 1


def _hash64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")


def _mix64(x: int) -> int:
    """splitmix64's finaliser: spreads every input bit over the output (rendezvous weights)."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Residency:
    """Hard constraint: only pools in the countries the key and the request allow."""

    name = "residency"

    def filter(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        if req.countries is None:
            return endpoints
        return [e for e in endpoints if e.country in req.countries]


class SloFilter:
    """Keep the pools predicted to meet the request's TTFT SLO. If none can: spill (keep all and
    let the scorers pick the best) or shed with 429 and a Retry-After."""

    name = "slo"

    def __init__(self, model: TtftModel, policy: str):
        self.model = model
        self.policy = policy

    def filter(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        if req.ttft_slo_s is None or not endpoints:
            return endpoints
        pred = self.model.predict_all_s(req, endpoints)
        meet = [e for e, p in zip(endpoints, pred) if p <= req.ttft_slo_s]
        if meet or self.policy == "spill":
            return meet or endpoints
        raise RateLimited(
            f"no pool is predicted to meet the {req.ttft_slo_s * 1000:.0f} ms TTFT SLO "
            f"(best: {min(pred) * 1000:.0f} ms)", retry_after_s=max(1.0, min(pred)))
