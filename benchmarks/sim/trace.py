"""A production trace in the Mooncake format, mapped onto the simulated mesh; pools with prefix caches.

The format (../shared/data/traces/mooncake-fast25/SOURCE.md): one JSON object a line with
`timestamp` (ms from the trace start), `input_length`, `output_length` (tokens) and `hash_ids` (the
prompt's 512-token blocks; two requests whose lists share a leading run can reuse that many blocks).

The mapping (benchmarks/RESULTS.md repeats it):
- conversations: requests whose hash_ids share their first two ids are one conversation (the first
  id alone is shared by every request of the conversation trace: a global system prompt); a request
  with fewer than two ids is its own. Each conversation gets a home metro drawn from the demand
  model's weights (benchmarks/sim/demand.py: population proxy, no diurnal curve: the trace brings
  its own arrival times) and keeps it; its client's RTT to that metro's gateway as demand.py draws it.
- time: arrival times keep their order and spacing, scaled by one factor so that the offered load
  (each request's whole prompt at the mean prefill speed plus its answer at the mean decode speed,
  no cache reuse counted) is `mean_util` of the mesh's slots.
- requests: the trace's input and output lengths; clients send max_tokens as in the synthetic runs.
- pools: each an LRU cache of `cache_blocks` 512-token blocks (`CachedPool`); a request admitted at
  a pool finds the leading run of its blocks the cache holds, prefills only the rest (at the pool's
  calibrated prefill speed, as today) and puts all its blocks at the cache's recent end.
- the gateway's chunks are the trace's blocks (one chunk = 512 tokens, exactly), the first
  gateway/core/prefix.py MAX_CHUNKS of them; the session key is the conversation.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from benchmarks.sim.demand import Arrivals
from benchmarks.sim.mesh import F64, SITE_JITTER_KM, Mesh
from benchmarks.sim.pool import PoolSim
from benchmarks.sim.settings import Settings
from gateway.core.prefix import MAX_ADVERTISED

BLOCK_TOKENS = 512


@dataclass
class Trace:
    t_ms: F64
    prompt: NDArray[np.intp]
    output: NDArray[np.intp]
    hash_ids: list[tuple[int, ...]]


def load_trace(path: Path, limit: int | None = None) -> Trace:
    t, inp, out, hs = [], [], [], []
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            t.append(float(r["timestamp"]))
            inp.append(max(1, int(r["input_length"])))
            out.append(max(1, int(r["output_length"])))
            hs.append(tuple(int(h) for h in r.get("hash_ids") or ()))
            if limit is not None and len(t) >= limit:
                break
    order = np.argsort(np.array(t), kind="stable")
    return Trace(np.array(t)[order], np.array(inp, dtype=np.intp)[order], np.array(out, dtype=np.intp)[order],
                 [hs[i] for i in order.tolist()])


@dataclass
class TraceArrivals(Arrivals):
    hash_ids: list[tuple[int, ...]]
    conv: NDArray[np.intp]  # conversation of each request
    compression: float  # trace seconds per simulated second


def conversations(hash_ids: list[tuple[int, ...]]) -> NDArray[np.intp]:
    keys: dict[tuple[int, ...], int] = {}
    out = np.empty(len(hash_ids), dtype=np.intp)
    for i, h in enumerate(hash_ids):
        key = h[:2] if len(h) >= 2 else (-1 - i,)
        out[i] = keys.setdefault(key, len(keys))
    return out


def trace_arrivals(mesh: Mesh, s: Settings, trace: Trace, warmup_share: float = 0.1) -> TraceArrivals:
    rng = np.random.default_rng(s.seed + 1)
    n = len(trace.t_ms)
    conv = conversations(trace.hash_ids)
    w = np.array([m.weight for m in mesh.metros], dtype=np.float64)
    home = rng.choice(len(w), size=int(conv.max()) + 1, p=w / w.sum())
    metro = home[conv].astype(np.intp)
    service = trace.prompt / float(np.mean(mesh.prefill_tps)) + trace.output / float(np.mean(mesh.decode_tps))
    span_sim = n * float(np.mean(service)) / (s.mean_util * float(mesh.slots.sum()))
    t0 = float(trace.t_ms.min())
    span_trace = max((float(trace.t_ms.max()) - t0) / 1000.0, 1e-9)
    t = (trace.t_ms - t0) / 1000.0 * (span_sim / span_trace)
    client_km = np.abs(rng.normal(0, SITE_JITTER_KM, n))
    client_ms = mesh.prior.rtt_array(client_km) + rng.uniform(2.0, 10.0, n)
    return TraceArrivals(t, metro, trace.prompt.copy(), trace.output.copy(), np.zeros(n, dtype=bool), client_ms,
                         t >= warmup_share * span_sim, trace.hash_ids, conv, span_trace / span_sim)


class CachedPool(PoolSim):
    """A PoolSim with an LRU prefix cache of `capacity` blocks. `holders` (the cache oracle's
    index, block -> pools holding it) is kept up to date when given."""

    __slots__ = ("cache", "capacity", "touches", "holders", "index")

    def __init__(self, slots: int, ptps: float, dtps: float, mean_service_s: float, report_slots: bool,
                 capacity: int, index: int, holders: dict[int, set[int]] | None):
        super().__init__(slots, ptps, dtps, mean_service_s, report_slots)
        self.cache: OrderedDict[int, int] = OrderedDict()  # block -> the touch count when last used
        self.capacity, self.touches, self.holders, self.index = capacity, 0, holders, index

    def lookup(self, blocks: tuple[int, ...]) -> int:
        """Leading blocks held."""
        k, cache = 0, self.cache
        for b in blocks:
            if b not in cache:
                break
            k += 1
        return k

    def insert(self, blocks: tuple[int, ...]) -> None:
        cache, holders = self.cache, self.holders
        for b in blocks:
            self.touches += 1
            if b in cache:
                cache.move_to_end(b)
            elif holders is not None:
                holders.setdefault(b, set()).add(self.index)
            cache[b] = self.touches
        while len(cache) > self.capacity:
            b, _ = cache.popitem(last=False)
            if holders is not None:
                holders[b].discard(self.index)

    def advertises(self, b: int) -> bool:
        """In the bounded summary its worker would advertise: held, and among the MAX_ADVERTISED
        blocks most recently used."""
        v = self.cache.get(b)
        return v is not None and self.touches - v < MAX_ADVERTISED

    def reset_cache(self) -> None:
        """The pool restarts (benchmarks/sim/failures.py): its cache is gone."""
        if self.holders is not None:
            for b in self.cache:
                self.holders[b].discard(self.index)
        self.cache.clear()
