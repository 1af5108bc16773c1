"""Vivaldi network coordinates (Dabek, Cox, Kaashoek, Morris, SIGCOMM 2004) with the fixes of
Ledlie, Gardner, Seltzer ("Stable and accurate network coordinates", ICDCS 2006; "Network
coordinates in the wild", NSDI 2007) as carried by Pyxida:

- model: a 2-D Euclidean plane plus a height per node (the access link every path crosses), so
  rtt(a, b) ~= |va - vb| + ha + hb; the dimension is configurable;
- adaptive timestep: a node moves by cc * e_i / (e_i + e_j) of the spring's tension and keeps an
  EWMA (weight ce) of its own relative error, so confident nodes stay put and new ones move fast;
- latency filter: each link's RTT is a moving percentile (median by default) of its last few
  samples, so one queueing spike does not fling a node across the map;
- neighbour decay: each update sums the springs to all neighbours heard from recently, weighted by
  how recently, instead of only the link just sampled (less oscillation, no stale neighbours);
- update filter: the coordinate a node *publishes* (the application coordinate, which travels with
  its registry entry) is the centroid of its recent system coordinates, and is replaced only when
  that centroid has moved by a meaningful fraction of the distance to its nearest neighbour.

`VivaldiNode` is one node's state (what a gateway runs); `VivaldiSystem` runs N nodes at once with
numpy for simulation and evaluation. Both use the same spring arithmetic (`_springs`).
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .sites import KM_PER_MS_RTT, DistancePrior, azimuthal_equidistant_km

F64 = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class VivaldiConfig:
    dim: int = 2
    cc: float = 0.25  # timestep constant (Dabek et al.: 0.25)
    ce: float = 0.25  # error EWMA constant (Dabek et al.: 0.25)
    error_init: float = 1.0  # a node that has measured nothing is 100 % unsure
    error_min: float = 0.01  # a floor keeps a converged node able to learn of route changes
    error_max: float = 1.5  # a ceiling keeps a wild sample from making the weights degenerate
    height_min_ms: float = 0.01
    filter_window: int = 4  # latency filter: samples kept per neighbour (Ledlie: 4)
    filter_percentile: float = 50.0  # median; Ledlie used 25 for positively skewed noise
    neighbour_max_age_s: float = 600.0  # neighbour decay: weight falls linearly to 0 at this age
    max_neighbours: int = 64  # the oldest are forgotten beyond this
    update_window: int = 8  # update filter: system coordinates averaged into the published one
    update_threshold: float = 0.05  # publish when the centroid moved > this x nearest-neighbour RTT
    neighbour_decay: bool = True  # False: only the link just measured pulls (original Vivaldi)
    # Ours, not Dabek's or Ledlie's: also weight each neighbour's spring by 1 / rtt, so the error a
    # node minimises is relative, as routing experiences it. With random neighbours (mostly far
    # away) the absolute springs let long links inflate every height, and short pairs suffer:
    # 246-city matrix, k = 16, 5 seeds: median 0.094 with it, 0.107 without (0.105 for the
    # original, no-decay Vivaldi), p90 0.41 against 0.51.
    relative_weights: bool = True

    def __post_init__(self) -> None:
        assert self.dim >= 1 and self.filter_window >= 1 and self.update_window >= 1 and self.max_neighbours >= 1
        assert 0 < self.cc <= 1 and 0 < self.ce <= 1 and 0 < self.error_min <= self.error_max


@dataclass(frozen=True, slots=True)
class Coord:
    """A coordinate as it travels: position (ms), height (ms), and the owner's relative error."""

    vec: tuple[float, ...]
    height_ms: float
    error: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        # 0.001 ms resolution is far below RTT noise and keeps registry entries short
        return {"v": [round(x, 3) for x in self.vec], "h": round(self.height_ms, 3), "e": round(self.error, 4)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Coord:
        try:
            vec = tuple(float(x) for x in d["v"])
            coord = cls(vec, float(d["h"]), float(d.get("e", 1.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad coordinate {d!r}: {e}") from None
        if not all(map(math.isfinite, (*coord.vec, coord.height_ms, coord.error))) or coord.height_ms < 0:
            raise ValueError(f"bad coordinate {d!r}: values must be finite, height >= 0")
        return coord


def estimate_rtt(a: Coord, b: Coord) -> float:
    """Predicted round trip in ms between two coordinates."""
    if len(a.vec) != len(b.vec):
        raise ValueError(f"coordinates of different dimensions: {len(a.vec)} and {len(b.vec)}")
    return math.dist(a.vec, b.vec) + a.height_ms + b.height_ms


def estimate_matrix(pos: F64, height: F64) -> F64:
    """All-pairs predicted RTT (N, N) from positions (N, dim) and heights (N,)."""
    diff = pos[:, None, :] - pos[None, :, :]
    return np.sqrt((diff**2).sum(-1)) + height[:, None] + height[None, :]


def seed_from_prior(
    lat: ArrayLike, lon: ArrayLike, prior: DistancePrior, centre: tuple[float, float], dim: int = 2
) -> tuple[F64, F64]:
    """Starting positions (N, dim) and heights (N,) that reproduce the distance prior near the
    projection centre: km -> ms by the prior's slope, and the intercept split between the two
    heights. A new node starts near its geographic place instead of at the origin."""
    xy = np.atleast_2d(azimuthal_equidistant_km(lat, lon, *centre)) * (prior.inflation / KM_PER_MS_RTT)
    pos = np.zeros((xy.shape[0], dim))
    pos[:, : min(dim, 2)] = xy[:, : min(dim, 2)]
    if dim > 2:  # extra axes must not start flat: springs never push along an axis all nodes share
        pos[:, 2:] = _spread(xy, dim - 2)
    return pos, np.full(xy.shape[0], max(prior.intercept_ms / 2, 0.0))


def _spread(xy: F64, extra: int) -> F64:
    """Small deterministic offsets (N, extra) in ms, derived from the position itself so that a
    node seeds the same way everywhere."""
    phase = xy[:, :1] * 0.37 + xy[:, 1:2] * 0.61 + np.arange(1, extra + 1)[None, :]
    return np.sin(phase * 12.9898) * 1.0


def _springs(
    pos: F64, height: F64, error: F64, nb_pos: F64, nb_height: F64, nb_error: F64, nb_rtt: F64, cc: float,
    rng: np.random.Generator,
) -> tuple[F64, F64, F64, F64]:
    """The move each neighbour's spring asks for, and the sample error and confidence weight.

    Shapes: pos (..., dim), height/error (...), nb_pos (..., n, dim), nb_* (..., n). Returns
    dpos (..., n, dim), dheight (..., n), rel_err (..., n), weight (..., n).
    """
    diff = pos[..., None, :] - nb_pos  # (..., n, dim)
    norm = np.sqrt((diff**2).sum(-1))
    same = norm < 1e-9
    if same.any():
        # Coincident in the plane (all nodes start at the origin): a tiny random offset picks a
        # direction. The push is then almost all height at first, as the paper's unit vector of
        # [0, hsum] prescribes; heights grow, the plane unfolds under them, heights shrink back.
        # Pushing the plane alone (a random unit vector) was worse on the 246-city matrix
        # (median 0.100 against 0.090 at k = 16): it folds the map early.
        diff = np.where(same[..., None], rng.normal(size=diff.shape) * 1e-3, diff)
        norm = np.sqrt((diff**2).sum(-1))
    hsum = height[..., None] + nb_height
    dist = norm + hsum
    weight = error[..., None] / (error[..., None] + nb_error)
    rel_err = np.abs(dist - nb_rtt) / nb_rtt
    force = cc * weight * (nb_rtt - dist)
    # The unit vector of a height vector [diff, hsum] in the norm |v| + h is [diff, hsum] / dist:
    # moving by `force` along it changes the predicted RTT by exactly `force`, shared between the
    # plane and the heights in proportion (Dabek et al. §5.5).
    scale = force / dist
    return diff * scale[..., None], hsum * scale, rel_err, weight


def _decay_weights(age_s: F64, max_age_s: float, rtt_ms: F64 | None = None) -> F64:
    """Per-neighbour weights (..., n) summing to 1: linear in how recently each was heard from
    (and, with `rtt_ms`, inversely proportional to the link's RTT)."""
    w = np.clip(max_age_s - age_s, 0.0, None)  # never heard: age inf -> 0
    if rtt_ms is not None:
        w = w / rtt_ms
    total = w.sum(-1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


def _row_percentile(x: F64, q: float) -> F64:
    """np.nanpercentile(x, q, axis=-1) for 2-D x with at least one value per row; numpy's own
    loops over rows in Python, which dominated a 246-node simulation."""
    xs = np.sort(x, axis=-1)  # NaN sorts last
    n = np.isfinite(xs).sum(-1)
    k = (n - 1) * (q / 100.0)
    lo = np.floor(k).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    r = np.arange(xs.shape[0])
    return xs[r, lo] + (xs[r, hi] - xs[r, lo]) * (k - lo)


@dataclass(slots=True, eq=False)  # compared by identity: it holds arrays
class _Neighbour:
    samples: deque[float]
    pos: F64 = field(default_factory=lambda: np.zeros(0))
    height_ms: float = 0.0
    error: float = 1.0
    last_s: float = -math.inf
    rtt_ms: float = math.nan  # filtered


class VivaldiNode:
    """One node's Vivaldi state. Feed it every RTT measured to a peer along with the peer's
    current (system) coordinate; publish `app_coord` (the update-filtered coordinate)."""

    def __init__(self, config: VivaldiConfig | None = None, seed: Coord | None = None, rng_seed: int | None = None):
        self.cfg = config or VivaldiConfig()
        self._rng = np.random.default_rng(rng_seed)
        if seed is not None and len(seed.vec) != self.cfg.dim:
            raise ValueError(f"seed coordinate has dim {len(seed.vec)}, config dim {self.cfg.dim}")
        self._pos = np.array(seed.vec if seed else [0.0] * self.cfg.dim, dtype=np.float64)
        self._height = seed.height_ms if seed else self.cfg.height_min_ms
        self._error = seed.error if seed else self.cfg.error_init
        self._neighbours: dict[str, _Neighbour] = {}
        self._window: deque[F64] = deque(maxlen=self.cfg.update_window)
        self._app: F64 | None = None

    @property
    def coord(self) -> Coord:
        """The system coordinate: what peers need for their own updates (send it with probe answers)."""
        return Coord(tuple(float(x) for x in self._pos), float(self._height), float(self._error))

    @property
    def app_coord(self) -> Coord:
        """The published coordinate (update-filtered): what the registry carries."""
        if self._app is None:
            return self.coord
        return Coord(tuple(float(x) for x in self._app[:-1]), float(self._app[-1]), float(self._error))

    @property
    def error(self) -> float:
        return float(self._error)

    def filtered_rtt(self, peer_id: str) -> float | None:
        nb = self._neighbours.get(peer_id)
        return None if nb is None else nb.rtt_ms

    def update(
        self, peer_id: str, peer_coord: Coord, peer_error: float | None, rtt_ms: float, now_s: float | None = None
    ) -> None:
        """One RTT sample to `peer_id`. `peer_error` defaults to the error inside `peer_coord`."""
        if not (rtt_ms > 0 and math.isfinite(rtt_ms)):
            return  # a lost probe or a clock glitch carries no distance information
        if len(peer_coord.vec) != self.cfg.dim:
            raise ValueError(f"peer {peer_id!r} coordinate has dim {len(peer_coord.vec)}, expected {self.cfg.dim}")
        now = time.monotonic() if now_s is None else now_s
        self._remember(peer_id, peer_coord, peer_error, rtt_ms, now)
        self._move(peer_id, now)
        self._filter_update()

    def _remember(self, peer_id: str, c: Coord, peer_error: float | None, rtt_ms: float, now: float) -> None:
        cfg = self.cfg
        nb = self._neighbours.get(peer_id)
        if nb is None:
            nb = self._neighbours[peer_id] = _Neighbour(deque(maxlen=cfg.filter_window))
        nb.samples.append(rtt_ms)
        nb.rtt_ms = float(np.percentile(np.fromiter(nb.samples, float), cfg.filter_percentile))
        nb.pos = np.array(c.vec, dtype=np.float64)
        nb.height_ms = c.height_ms
        nb.error = min(max(c.error if peer_error is None else peer_error, cfg.error_min), cfg.error_max)
        nb.last_s = now
        stale = [p for p, n in self._neighbours.items() if now - n.last_s > cfg.neighbour_max_age_s]
        for p in stale:
            del self._neighbours[p]
        while len(self._neighbours) > cfg.max_neighbours:  # forget whoever we heard from least recently
            del self._neighbours[min(self._neighbours, key=lambda p: self._neighbours[p].last_s)]

    def _move(self, peer_id: str, now: float) -> None:
        cfg = self.cfg
        nbs = list(self._neighbours.values())
        idx = list(self._neighbours).index(peer_id)
        dpos, dh, rel_err, weight = _springs(
            self._pos, np.asarray(self._height), np.asarray(self._error),
            np.stack([n.pos for n in nbs]), np.array([n.height_ms for n in nbs]),
            np.array([n.error for n in nbs]), np.array([n.rtt_ms for n in nbs]), cfg.cc, self._rng,
        )
        # the error estimate learns from the link just measured only: the others are not news
        w, es = float(weight[idx]), float(rel_err[idx])
        err = cfg.ce * w * es + self._error * (1 - cfg.ce * w)
        ages = np.array([now - n.last_s for n in nbs])
        if not cfg.neighbour_decay:
            ages = np.where(np.arange(len(nbs)) == idx, 0.0, np.inf)
        a = _decay_weights(ages, cfg.neighbour_max_age_s,
                           np.array([n.rtt_ms for n in nbs]) if cfg.relative_weights else None)
        self._pos = self._pos + (a[:, None] * dpos).sum(0)
        self._height = max(cfg.height_min_ms, self._height + float((a * dh).sum()))
        self._error = min(max(err, cfg.error_min), cfg.error_max)

    def _filter_update(self) -> None:
        self._window.append(np.append(self._pos, self._height))
        centroid = np.mean(np.stack(self._window), axis=0)
        if self._app is None:
            self._app = centroid
            return
        moved = float(np.linalg.norm(centroid[:-1] - self._app[:-1]) + abs(centroid[-1] - self._app[-1]))
        nearest = min((n.rtt_ms for n in self._neighbours.values()), default=math.inf)
        if moved > self.cfg.update_threshold * nearest:
            self._app = centroid


class VivaldiSystem:
    """N Vivaldi nodes updated together with numpy: node i measures only the peers in row i of
    `neighbours` (N, k). Each `observe` call is one probe round: every node has measured at most
    one of its neighbours, and all nodes move at once from what they knew before the round (as
    real nodes would, acting on the coordinates their peers sent with the probe answers)."""

    def __init__(
        self, neighbours: NDArray[np.intp], config: VivaldiConfig | None = None, pos: F64 | None = None,
        height: F64 | None = None, rng: np.random.Generator | None = None,
    ):
        cfg = self.cfg = config or VivaldiConfig()
        self.neighbours = np.asarray(neighbours, dtype=np.intp)
        n, k = self.neighbours.shape
        self._rng = rng or np.random.default_rng()
        self.pos = np.zeros((n, cfg.dim)) if pos is None else np.array(pos, dtype=np.float64)
        self.height = np.full(n, cfg.height_min_ms) if height is None else np.array(height, dtype=np.float64)
        self.error = np.full(n, cfg.error_init)
        self._samples = np.full((n, k, cfg.filter_window), np.nan)  # latency filter rings
        self._ring = np.zeros((n, k), dtype=np.intp)
        self._nb_pos = np.zeros((n, k, cfg.dim))  # each neighbour's coordinate when last heard from
        self._nb_height = np.zeros((n, k))
        self._nb_error = np.full((n, k), cfg.error_init)
        self._nb_last = np.full((n, k), -np.inf)
        self._nb_rtt = np.full((n, k), np.nan)  # filtered
        self._window = np.zeros((n, cfg.update_window, cfg.dim + 1))  # update filter rings
        self._window_len = np.zeros(n, dtype=np.intp)
        self._app = np.concatenate([self.pos, self.height[:, None]], axis=1)

    @property
    def app_pos(self) -> F64:
        return self._app[:, :-1]

    @property
    def app_height(self) -> F64:
        return self._app[:, -1]

    def estimate(self, published: bool = True) -> F64:
        """Predicted all-pairs RTT (N, N) from the published (or the system) coordinates."""
        if published:
            return estimate_matrix(self.app_pos, self.app_height)
        return estimate_matrix(self.pos, self.height)

    def coord(self, i: int, published: bool = True) -> Coord:
        v, h = (self._app[i, :-1], self._app[i, -1]) if published else (self.pos[i], self.height[i])
        return Coord(tuple(float(x) for x in v), float(h), float(self.error[i]))

    def observe(self, slot: NDArray[np.intp], rtt_ms: F64, now_s: float) -> None:
        """Node i measured `rtt_ms[i]` to its neighbour `neighbours[i, slot[i]]` (NaN: no answer)."""
        cfg = self.cfg
        rtt = np.asarray(rtt_ms, dtype=np.float64)
        rows = np.flatnonzero(np.isfinite(rtt) & (rtt > 0))
        if rows.size == 0:
            return
        s = np.asarray(slot, dtype=np.intp)[rows]
        peers = self.neighbours[rows, s]
        self._samples[rows, s, self._ring[rows, s]] = rtt[rows]
        self._ring[rows, s] = (self._ring[rows, s] + 1) % cfg.filter_window
        self._nb_rtt[rows, s] = _row_percentile(self._samples[rows, s], cfg.filter_percentile)
        self._nb_pos[rows, s] = self.pos[peers]
        self._nb_height[rows, s] = self.height[peers]
        self._nb_error[rows, s] = np.clip(self.error[peers], cfg.error_min, cfg.error_max)
        self._nb_last[rows, s] = now_s
        self._move(rows, s, now_s)
        self._filter_update(rows)

    def _move(self, rows: NDArray[np.intp], s: NDArray[np.intp], now_s: float) -> None:
        cfg = self.cfg
        heard = np.isfinite(self._nb_rtt[rows])
        nb_rtt = np.where(heard, self._nb_rtt[rows], 1.0)  # never-heard links get weight 0 below
        dpos, dh, rel_err, weight = _springs(
            self.pos[rows], self.height[rows], self.error[rows], self._nb_pos[rows], self._nb_height[rows],
            self._nb_error[rows], nb_rtt, cfg.cc, self._rng,
        )
        cur = np.arange(rows.size)
        w, es = weight[cur, s], rel_err[cur, s]
        err = cfg.ce * w * es + self.error[rows] * (1 - cfg.ce * w)
        ages = np.where(heard, now_s - self._nb_last[rows], np.inf)
        if not cfg.neighbour_decay:
            ages = np.where(np.arange(ages.shape[1])[None, :] == s[:, None], 0.0, np.inf)
        a = _decay_weights(ages, cfg.neighbour_max_age_s, nb_rtt if cfg.relative_weights else None)
        self.pos[rows] += (a[..., None] * dpos).sum(1)
        self.height[rows] = np.maximum(cfg.height_min_ms, self.height[rows] + (a * dh).sum(1))
        self.error[rows] = np.clip(err, cfg.error_min, cfg.error_max)

    def _filter_update(self, rows: NDArray[np.intp]) -> None:
        cfg = self.cfg
        cur = np.concatenate([self.pos[rows], self.height[rows, None]], axis=1)
        self._window[rows, self._window_len[rows] % cfg.update_window] = cur
        self._window_len[rows] += 1
        filled = np.minimum(self._window_len[rows], cfg.update_window)
        ring = self._window[rows]  # (r, W, dim + 1); slots past `filled` are unused zeros
        used = np.arange(cfg.update_window)[None, :] < filled[:, None]
        centroid = (ring * used[..., None]).sum(1) / filled[:, None]
        old = self._app[rows]
        moved = np.linalg.norm(centroid[:, :-1] - old[:, :-1], axis=1) + np.abs(centroid[:, -1] - old[:, -1])
        nearest = np.nanmin(np.where(np.isfinite(self._nb_rtt[rows]), self._nb_rtt[rows], np.inf), axis=1)
        first = self._window_len[rows] == 1
        go = first | (moved > cfg.update_threshold * nearest)
        self._app[rows[go]] = centroid[go]


def seed_coord(lat: float, lon: float, prior: DistancePrior, centre: tuple[float, float], dim: int = 2) -> Coord:
    """One node's starting coordinate from its site (see `seed_from_prior`)."""
    pos, height = seed_from_prior([lat], [lon], prior, centre, dim)
    return Coord(tuple(float(x) for x in pos[0]), float(height[0]), 1.0)
