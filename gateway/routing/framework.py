"""Filter / score / pick, as in the Kubernetes inference extension's scheduler (DESIGN.md §3).

A Profile runs its filters (drop endpoints), its weighted scorers (each endpoint -> [0, 1], 1 best)
and its picker (orders the survivors; the first is tried first, the rest are failover order).
Plug-ins are synchronous and pure: they read Endpoint snapshots and do no I/O.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.core.types import Endpoint, RouteRequest


class Filter(Protocol):
    name: str

    def filter(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[Endpoint]: ...


class Scorer(Protocol):
    name: str

    def score(self, req: RouteRequest, endpoints: list[Endpoint]) -> list[float]: ...


class Picker(Protocol):
    name: str

    def pick(self, req: RouteRequest, endpoints: list[Endpoint], scores: list[float]) -> list[Endpoint]: ...


class Predictor(Protocol):
    def predict_s(self, req: RouteRequest, e: Endpoint) -> float: ...

    def cached_tokens(self, req: RouteRequest, e: Endpoint) -> int: ...


@dataclass(frozen=True, slots=True)
class Decision:
    ranked: list[Endpoint]  # try in this order
    scores: dict[str, float]  # pool id -> total score, for explaining the choice
    profile: str
    predicted_ms: dict[str, float]  # predicted TTFT of the first two, when the profile predicts
    cached_tokens: dict[str, int] = field(default_factory=dict)  # predicted cached prompt tokens of the first two
    # of the first two, the part of predicted_ms that is measured lateness (routing/lateness.py), when not 0
    late_ms: dict[str, float] = field(default_factory=dict)

    def explain(self) -> str:
        """One line: the chosen pool, its score and predicted TTFT, and the runner-up's."""
        if not self.ranked:
            return f"profile={self.profile} no-candidate"
        parts = [f"profile={self.profile}"]
        for label, e in zip(("pool", "runner-up"), self.ranked[:2]):
            parts.append(f"{label}={e.pool_id} score={self.scores.get(e.pool_id, 0):.3f}")
            if e.pool_id in self.predicted_ms:
                parts.append(f"ttft_ms={self.predicted_ms[e.pool_id]:.1f}")
            if e.pool_id in self.late_ms:
                parts.append(f"late_ms={self.late_ms[e.pool_id]:.1f}")
            if e.pool_id in self.cached_tokens:
                parts.append(f"cached_tokens={self.cached_tokens[e.pool_id]}")
        return " ".join(parts)


class Profile:
    def __init__(self, name: str, filters: Sequence[Filter], scorers: Sequence[tuple[Scorer, float]], picker: Picker,
                 predictor: Predictor | None = None):
        self.name = name
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker
        self.predictor = predictor  # only to explain decisions

    def route(self, req: RouteRequest, endpoints: Sequence[Endpoint]) -> Decision:
        cands = list(endpoints)
        for f in self.filters:
            cands = f.filter(req, cands)
            if not cands:
                return Decision([], {}, self.name, {})
        totals = [0.0] * len(cands)
        for scorer, weight in self.scorers:
            totals = [t + weight * s for t, s in zip(totals, scorer.score(req, cands))]
        ranked = self.picker.pick(req, cands, totals) if cands else []
        predicted = ({e.pool_id: 1000 * self.predictor.predict_s(req, e) for e in ranked[:2]}
                     if self.predictor is not None else {})
        cached = ({e.pool_id: self.predictor.cached_tokens(req, e) for e in ranked[:2]}
                  if self.predictor is not None and req.prefix_hashes else {})
        late = ({e.pool_id: 1000 * e.first_byte_excess_s for e in ranked[:2] if e.first_byte_excess_s > 0}
                if self.predictor is not None else {})
        return Decision(ranked, {e.pool_id: t for e, t in zip(cands, totals)}, self.name, predicted, cached, late)


class MaxScorePicker:
    """Highest score first, ties broken at random; the rest follow by score (failover order)."""

    name = "max-score"

    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.Random()

    def pick(self, req: RouteRequest, endpoints: list[Endpoint], scores: list[float]) -> list[Endpoint]:
        if len(set(scores)) == len(scores):  # no ties (the usual case): no random keys to draw
            return [endpoints[i] for i in sorted(range(len(endpoints)), key=scores.__getitem__, reverse=True)]
        keys = [(-s, self.rng.random()) for s in scores]
        order = sorted(range(len(endpoints)), key=keys.__getitem__)
        return [endpoints[i] for i in order]
