"""The routing plug-ins and the profiles built from them."""
from __future__ import annotations

import itertools
import random

from gateway.core.types import Endpoint, RouteRequest
from gateway.routing.framework import MaxScorePicker, Profile


class ServesModel:
    name = "serves-model"

    def filter(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        return [e for e in endpoints if req.model in e.models]


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


def build_profile(name: str, rng: random.Random | None = None) -> Profile:
    base = [ServesModel(), Available()]
    if name == "least-load":
        return Profile(name, base, [(LeastLoad(), 1.0)], MaxScorePicker(rng))
    if name == "round-robin":
        return Profile(name, base, [], RoundRobinPicker())
    if name == "random":
        return Profile(name, base, [], RandomPicker(rng))
    if name == "p2c":
        return Profile(name, base, [], PowerOfTwoPicker(rng))
    raise ValueError(f"unknown routing profile {name!r} (known: {', '.join(PROFILES)})")


PROFILES = ("least-load", "round-robin", "random", "p2c")
