"""A gateway's memory of which prompt prefixes each pool's KV cache holds, and of sessions.

Two sources per pool (DESIGN §3 `cached_prefix`):
- what the pool advertises: the chunk hashes (gateway/core/prefix.py) its cache still backs, a
  bounded list carried by its load report (probes, and lines of GET /load/stream);
- what this gateway sent there recently: every routed request's chunk hashes, remembered for
  `prefix_memory_s` and at most `prefix_index_max_entries` (chunk, pool) pairs over all pools
  (least recently sent forgotten first), and aged by the pool's cache size: once this gateway has
  sent a pool more prompt tokens than its KV cache holds (kv_blocks_total x kv_block_tokens, from
  its load report), what it sent before then has likely been evicted and is forgotten. The count
  is kept as up to CHECKPOINTS (time, tokens sent so far) marks a pool, so a send is forgotten at
  most 1/CHECKPOINTS of the cache late. Turnover from other gateways' requests is not seen here;
  the pool's own advertisement covers it. A pool that reports no cache size (third-party pools,
  kind openai, which also advertise nothing) is aged by time alone. This memory covers the gap
  between a send and the pool's next advertisement.

Sessions: a session key (prompt_cache_key, else user, else x-session-id) -> the pool that last
served it and how many chunks that turn had, at most `max_sessions` keys (least recent forgotten).
The latency model takes the session's pool as holding at least that many leading chunks of the
next turn and prefers it by `session_preference`; it is never a pin: a pool that is down, full or
slower by more than the preference loses anyway.

Chars-to-tokens: the gateway does not tokenize; the ratio comes from pools' usage answers
(prompt_tokens / canonical prompt characters), an EWMA per gateway.

Memory: ~`prefix_index_max_entries` x (an OrderedDict entry of an int key and a float, ~150 bytes)
plus the advertised sets (one frozenset per pool of at most the pools' advertised count); measured
in tests/routing/test_prefix_routing.py.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence

from gateway.config import RoutingOptions
from gateway.core.types import Endpoint

TOKENS_PER_CHAR_PRIOR = 0.25  # ~4 characters a token, until pools' usage answers say otherwise
RATIO_ALPHA = 0.1  # EWMA weight of one usage answer
CHECKPOINTS = 16  # marks a pool of (time, tokens sent): forgetting by cache size is this fine-grained


class PoolPrefix:
    """One pool's entry: `matched(hashes)` is how many leading chunks of a request it likely holds
    (Endpoint.prefix; read by gateway/routing/latency.py)."""

    __slots__ = ("index", "endpoint", "salt", "_adv_src", "_adv", "last_sent", "sent_tokens", "marks", "live_from")

    def __init__(self, index: PrefixIndex, endpoint: Endpoint):
        self.index = index
        self.endpoint = endpoint
        self.salt = int.from_bytes(hashlib.blake2b(endpoint.pool_id.encode(), digest_size=8).digest(), "little")
        self._adv_src: tuple[int, ...] = ()
        self._adv: frozenset[int] = frozenset()
        self.last_sent = -float("inf")  # when this gateway last sent the pool chunks
        self.sent_tokens = 0  # prompt tokens this gateway has sent the pool, in all
        # (time of a send, sent_tokens after it); made on the first count (a deque is ~600 bytes)
        self.marks: deque[tuple[float, int]] | None = None
        # what was sent before this is taken as evicted: the pool has since been sent more than its cache holds
        self.live_from = -float("inf")

    def capacity_tokens(self) -> int:
        """The pool's KV cache in tokens, from its load report (0: not reported)."""
        load = self.endpoint.load
        return load.kv_blocks_total * load.kv_block_tokens if load is not None else 0

    def count_sent(self, now: float, tokens: int) -> None:
        """A request of `tokens` prompt tokens went there at `now`: move live_from past the sends
        that more than a cache's worth of tokens followed."""
        self.sent_tokens += tokens
        cap = self.capacity_tokens()
        if cap <= 0:
            return
        marks = self.marks
        if marks is None:
            marks = self.marks = deque()
        if not marks or self.sent_tokens - marks[-1][1] >= cap / CHECKPOINTS:
            marks.append((now, self.sent_tokens))
        while marks and self.sent_tokens - marks[0][1] >= cap:
            # sent at or before this mark: a cache's worth of tokens has gone there since
            self.live_from = math.nextafter(marks.popleft()[0], math.inf)

    def advertised(self) -> frozenset[int]:
        """The pool's advertised chunk hashes, as a set (rebuilt when a new report brings new ones)."""
        load = self.endpoint.load
        src = load.hot_prefix_hashes if load is not None else ()
        if src is not self._adv_src:  # a new report: rebuild the set once
            self._adv_src, self._adv = src, frozenset(src)
        return self._adv

    def __contains__(self, h: object) -> bool:
        if h in self.advertised():
            return True
        sent = self.index.sent.get(h ^ self.salt) if isinstance(h, int) else None
        return sent is not None and sent >= self.horizon()

    def horizon(self) -> float:
        """What was sent before this is forgotten: by time, and by the pool's cache size."""
        return max(self.index.clock() - self.index.memory_s, self.live_from)

    def matched(self, hashes: Sequence[int], oldest: float | None = None) -> int:
        """longest_match(hashes, self), inlined (it runs for every candidate of every decision):
        nothing to look up when the pool advertises nothing and was sent nothing lately; else the
        first chunk (most pools hold none), then the last (a session's pool holds them all), then
        a binary search between. oldest: the memory's horizon (clock() - memory_s), when the caller
        has it for several pools."""
        n = len(hashes)
        load = self.endpoint.load
        src = load.hot_prefix_hashes if load is not None else ()
        if src is not self._adv_src:  # a new report: rebuild the set once
            self._adv_src, self._adv = src, frozenset(src)
        adv = self._adv
        if oldest is None:
            oldest = self.index.clock() - self.index.memory_s
        if oldest < self.live_from:  # forgotten by the pool's cache size
            oldest = self.live_from
        if not n or (not adv and self.last_sent < oldest):
            return 0
        sent, salt = self.index.sent, self.salt
        h = hashes[0]
        if not (h in adv or sent.get(h ^ salt, -1.0) >= oldest):
            return 0
        h = hashes[n - 1]
        if h in adv or sent.get(h ^ salt, -1.0) >= oldest:
            return n
        lo, hi = 1, n - 1  # hashes[:lo] held; hashes[hi:] not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            h = hashes[mid - 1]
            if h in adv or sent.get(h ^ salt, -1.0) >= oldest:
                lo = mid
            else:
                hi = mid - 1
        return lo


class PrefixIndex:
    """The gateway-wide memory: `sent` is one dict over all pools, keyed by chunk hash ^ the pool's
    salt, so a decision looks up each (chunk, candidate) pair directly; `match_all` answers for a
    whole candidate set in one pass."""

    def __init__(self, options: RoutingOptions | None = None, clock: Callable[[], float] = time.monotonic):
        o = options or RoutingOptions()
        self.max_entries, self.memory_s = o.prefix_index_max_entries, o.prefix_memory_s
        self.max_sessions = o.max_sessions
        self.clock = clock
        self.sent: OrderedDict[int, float] = OrderedDict()  # chunk hash ^ pool salt -> when sent
        self.sessions: OrderedDict[str, tuple[str, int]] = OrderedDict()  # key -> (pool id, chunks)
        self.tokens_per_char = TOKENS_PER_CHAR_PRIOR
        self.num_learned = 0

    def match_all(self, hashes: Sequence[int], endpoints: Sequence[Endpoint]) -> list[int]:
        """[PoolPrefix.matched(hashes)] for each endpoint (0: no entry), in one pass: what depends
        only on the request (its first and last chunk, the memory's horizon) is worked out once and
        the per-pool test is inlined (this runs for every candidate of every decision: the call and
        attribute lookups of one matched() per pool cost more than its dict lookups). A holder of
        another kind (the simulator's) answers for itself."""
        n = len(hashes)
        if not n:
            return [0] * len(endpoints)
        oldest = self.clock() - self.memory_s
        sent = self.sent
        first, last = hashes[0], hashes[n - 1]
        out: list[int] = []
        for e in endpoints:
            p = e.prefix
            if p is None:
                out.append(0)
                continue
            if type(p) is not PoolPrefix or p.index is not self:
                out.append(p.matched(hashes))
                continue
            load = e.load
            src = load.hot_prefix_hashes if load is not None else ()
            if src is not p._adv_src:  # a new report: rebuild the set once
                p._adv_src, p._adv = src, frozenset(src)
            adv = p._adv
            live = oldest if p.live_from <= oldest else p.live_from  # this pool's horizon
            if not adv and p.last_sent < live:
                out.append(0)
                continue
            salt = p.salt
            if not (first in adv or sent.get(first ^ salt, -1.0) >= live):
                out.append(0)
            elif last in adv or sent.get(last ^ salt, -1.0) >= live:
                out.append(n)
            else:
                out.append(p.matched(hashes, live))
        return out

    def attach(self, endpoints: Iterable[Endpoint]) -> None:
        """Give each endpoint its entry (pools that join later too)."""
        for e in endpoints:
            if e.prefix is None:
                e.prefix = PoolPrefix(self, e)

    def record_sent(self, e: Endpoint, hashes: Sequence[int], tokens: int = 0) -> None:
        """A request with these chunk hashes (and `tokens` prompt tokens in all: 0 when not known)
        went to e's pool: it will hold them once prefilled."""
        holder = e.prefix
        if not isinstance(holder, PoolPrefix):
            return
        now, sent, salt = self.clock(), self.sent, holder.salt
        if tokens > 0:
            holder.count_sent(now, tokens)
        if not hashes:
            return
        holder.last_sent = now
        for h in hashes:
            k = h ^ salt
            sent[k] = now
            sent.move_to_end(k)
        while len(sent) > self.max_entries:
            sent.popitem(last=False)

    def session(self, key: str) -> tuple[str, int]:
        """(pool id, chunks of its last turn) for a session key; ("", 0) when unknown."""
        return self.sessions.get(key, ("", 0)) if key else ("", 0)

    def record_session(self, key: str, pool_id: str, num_chunks: int) -> None:
        if not key:
            return
        self.sessions[key] = (pool_id, num_chunks)
        self.sessions.move_to_end(key)
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)

    def learn(self, prompt_chars: int, prompt_tokens: int) -> None:
        """A pool's usage answer: prompt_tokens for a prompt of prompt_chars canonical characters."""
        if prompt_chars < 64 or prompt_tokens <= 0:
            return  # short prompts are mostly template overhead
        r = prompt_tokens / prompt_chars
        self.tokens_per_char += (r - self.tokens_per_char) * (RATIO_ALPHA if self.num_learned else 1.0)
        self.num_learned += 1
