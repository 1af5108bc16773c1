"""The routing plug-ins and the profiles built from them."""
from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable

from gateway.config import RoutingOptions
from gateway.core.types import Endpoint, RouteRequest
from gateway.routing.framework import Filter, MaxScorePicker, Picker, Profile, Scorer
from gateway.routing.latency import (LatencyScorer, NearestScorer, PrefixAffinity, Residency, SloFilter, TtftModel,
                                     matched_chunks)


class ServesModel:
    name = "serves-model"

    def filter(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        """Serves the model, and can serve the request (its endpoint and features)."""
        needs = req.needs
        return [e for e in endpoints if req.model in e.models
                and (not needs or e.capabilities is None or needs <= e.capabilities)]


class Available:
    """Healthy by probes and circuit not open."""

    name = "available"

    def filter(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        return [e for e in endpoints if e.healthy and not e.breaker_open]


def outstanding(e: Endpoint) -> float:
    """Requests ahead of a new one at this pool: the last report's queue plus what this gateway
    has sent since (in-flight crediting), so a burst spreads instead of piling on one pool."""
    if e.load is None:
        return float(e.in_flight)
    return float(max(e.load.waiting + e.load.running, e.in_flight))


class LeastLoad:
    name = "least-load"

    def score(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[float]:
        return [1.0 / (1.0 + outstanding(e)) for e in endpoints]


class PrefixCache:
    """The in-cluster routers' rule (llm-d, Dynamo, SGLang's router): the longest prefix the pool is
    estimated to hold, as a share of the request's chunks; blind to the network and to the wait."""

    name = "prefix-cache"

    def score(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[float]:
        hashes = req.prefix_hashes
        if not hashes:
            return [0.0] * len(endpoints)
        n = len(hashes)
        return [max(k, min(req.session_chunks, n) if req.session_pool == e.pool_id else 0) / n
                for e, k in zip(endpoints, matched_chunks(hashes, endpoints))]


class RoundRobinPicker:
    name = "round-robin"

    def __init__(self) -> None:
        self.counter = itertools.count()

    def pick(self, req: RouteRequest, endpoints: list[Endpoint], scores: list[float]) -> list[Endpoint]:
        eps = sorted(endpoints, key=lambda e: e.pool_id)
        k = next(self.counter) % len(eps)
        return eps[k:] + eps[:k]


class RandomPicker:
    name = "random"

    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.Random()

    def pick(self, req: RouteRequest, endpoints: list[Endpoint], scores: list[float]) -> list[Endpoint]:
        eps = list(endpoints)
        self.rng.shuffle(eps)
        return eps


class PowerOfTwoPicker:
    """Two at random, the less loaded first; the rest follow at random."""

    name = "p2c"

    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.Random()

    def pick(self, req: RouteRequest, endpoints: list[Endpoint], scores: list[float]) -> list[Endpoint]:
        eps = list(endpoints)
        self.rng.shuffle(eps)
        if len(eps) >= 2 and outstanding(eps[1]) < outstanding(eps[0]):
            eps[0], eps[1] = eps[1], eps[0]
        return eps


# Built-in profiles: (filters, weighted scorers, picker). Residency is a hard constraint for all.
_BASE = ("serves-model", "available", "residency")
BUILTIN: dict[str, tuple[tuple[str, ...], dict[str, float], str]] = {
    # the default: expected TTFT with prefill charged only for what the pool is not estimated to hold
    "latency": (_BASE + ("slo",), {"latency": 1.0, "prefix-affinity": 0.05}, "max-score"),
    # the latency profile before prefix-aware routing: whole-prompt prefill, a prefix-hash tie-break
    "latency-no-cache": (_BASE + ("slo",), {"latency-no-cache": 1.0, "prefix-affinity": 0.05}, "max-score"),
    # network-blind, as the in-cluster routers: longest cached prefix, then least load
    "prefix": (_BASE, {"prefix-cache": 1.0, "least-load": 0.001}, "max-score"),
    "nearest": (_BASE, {"nearest": 1.0}, "max-score"),
    "least-load": (_BASE, {"least-load": 1.0}, "max-score"),
    "round-robin": (_BASE, {}, "round-robin"),
    "random": (_BASE, {}, "random"),
    "p2c": (_BASE, {}, "p2c"),
}
PROFILES = tuple(BUILTIN)


def build_profile(name: str, options: RoutingOptions | None = None, rng: random.Random | None = None,
                  clock: Callable[[], float] = time.monotonic) -> Profile:
    """The named profile: built in, or defined in options.profiles (which may override one). clock:
    the time base of the endpoints' load_at (the age of a load report matters to the TTFT model)."""
    options = options or RoutingOptions()
    if name in options.profiles:
        pc = options.profiles[name]
        filters, scorers, picker = pc.filters, pc.scorers, pc.picker
    elif name in BUILTIN:
        filters, scorers, picker = BUILTIN[name]
    else:
        raise ValueError(f"unknown routing profile {name!r} (known: {', '.join([*BUILTIN, *options.profiles])})")
    model = TtftModel(options.default_prefill_tps, clock, use_cache=options.prefix_routing)
    blind = TtftModel(options.default_prefill_tps, clock, use_cache=False)
    make_filter: dict[str, Callable[[], Filter]] = {
        "serves-model": ServesModel, "available": Available, "residency": Residency,
        "slo": lambda: SloFilter(model, options.slo_policy)}
    make_scorer: dict[str, Callable[[], Scorer]] = {
        "latency": lambda: LatencyScorer(model, options.session_preference),
        "latency-no-cache": lambda: LatencyScorer(blind), "nearest": lambda: NearestScorer(model),
        "least-load": LeastLoad, "prefix-affinity": PrefixAffinity, "prefix-cache": PrefixCache}
    make_picker: dict[str, Callable[[], Picker]] = {"max-score": lambda: MaxScorePicker(rng), "round-robin": RoundRobinPicker,
                   "random": lambda: RandomPicker(rng), "p2c": lambda: PowerOfTwoPicker(rng)}
    for kind, names, known in (("filter", filters, make_filter), ("scorer", scorers, make_scorer),
                               ("picker", [picker], make_picker)):
        for n in names:
            if n not in known:
                raise ValueError(f"profile {name!r}: unknown {kind} {n!r} (known: {', '.join(known)})")
    return Profile(name, [make_filter[f]() for f in filters], [(make_scorer[sc](), w) for sc, w in scorers.items()],
                   make_picker[picker](), predictor=blind if "latency-no-cache" in scorers else model)
