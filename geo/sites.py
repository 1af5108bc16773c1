"""Sites, pools, great-circle distance, and the distance prior for round-trip time.

The prior is the last-resort RTT estimate (DESIGN.md §3): light in fibre covers about 200 km per ms,
so a round trip costs 1 ms per 100 km of great-circle distance at best; real paths are longer than
the great circle and pass through queues, so measured RTTs sit an `inflation` factor above that
bound (about 2 on the public Internet, 1.7 on a cloud backbone), plus a small last-mile constant.
`fit_prior` fits both numbers from measured (distance, rtt) pairs.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

EARTH_RADIUS_KM = 6371.0088  # mean radius (IUGG): the choice moves distances by < 0.5 %
KM_PER_MS_RTT = 100.0  # ~200 km/ms one way in fibre (refractive index ~1.47), halved for a round trip


@dataclass(frozen=True, slots=True)
class Site:
    """A place where gateways and pools run (a data center, a metro, or a client's location)."""

    id: str
    name: str
    country: str  # ISO 3166-1 alpha-2, upper case: residency rules compare it verbatim
    lat: float
    lon: float

    def __post_init__(self) -> None:
        if not -90.0 <= self.lat <= 90.0 or not -180.0 <= self.lon <= 180.0:
            raise ValueError(f"site {self.id!r}: lat/lon out of range ({self.lat}, {self.lon})")
        if len(self.country) != 2 or not self.country.isalpha() or not self.country.isupper():
            raise ValueError(f"site {self.id!r}: country must be ISO-2 upper case, got {self.country!r}")

    def distance_km(self, other: Site) -> float:
        return haversine_km(self.lat, self.lon, other.lat, other.lon)


@dataclass(frozen=True, slots=True)
class Pool:
    """A GPU pool at a site, as the registry lists it."""

    id: str
    site: str  # Site.id
    endpoint: str  # base URL gateways forward to
    models: tuple[str, ...] = ()
    capacity: int = 1  # concurrent sequences it is sized for; a weight, not a hard limit


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km on a spherical Earth (haversine: stable for short distances)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(min(a, 1.0)))  # min(): rounding can exceed 1


def pairwise_km(lat: ArrayLike, lon: ArrayLike) -> NDArray[np.float64]:
    """All-pairs great-circle distances (N, N) in km for N points given in degrees."""
    p = np.radians(np.asarray(lat, dtype=np.float64))
    lam = np.radians(np.asarray(lon, dtype=np.float64))
    dp = p[None, :] - p[:, None]
    dl = lam[None, :] - lam[:, None]
    a = np.sin(dp / 2) ** 2 + np.cos(p)[:, None] * np.cos(p)[None, :] * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def azimuthal_equidistant_km(
    lat: ArrayLike, lon: ArrayLike, centre_lat: float, centre_lon: float
) -> NDArray[np.float64]:
    """Plane coordinates (..., 2) in km: distances and bearings from the centre are exact, and
    distortion grows slowly away from it. It seeds network coordinates (a node starts near its
    geographic place), so every node of one mesh must use the same centre."""
    p = np.radians(np.asarray(lat, dtype=np.float64))
    dl = np.radians(np.asarray(lon, dtype=np.float64) - centre_lon)
    p0 = math.radians(centre_lat)
    cos_c = np.clip(math.sin(p0) * np.sin(p) + math.cos(p0) * np.cos(p) * np.cos(dl), -1.0, 1.0)
    c = np.arccos(cos_c)  # angular distance from the centre
    # c / sin(c) -> 1 at the centre; the antipode (sin c = 0, c = pi) has no bearing: pin it at scale 1
    k = np.where(np.sin(c) > 1e-12, c / np.maximum(np.sin(c), 1e-12), 1.0)
    x = k * np.cos(p) * np.sin(dl)
    y = k * (math.cos(p0) * np.sin(p) - math.sin(p0) * np.cos(p) * np.cos(dl))
    return np.stack([x, y], axis=-1) * EARTH_RADIUS_KM


def centroid_latlon(lat: Sequence[float], lon: Sequence[float]) -> tuple[float, float]:
    """The point on the sphere nearest the mean of the points (via unit vectors, so the
    antimeridian does not split a Pacific mesh): a projection centre for a whole mesh."""
    p, lam = np.radians(np.asarray(lat, dtype=float)), np.radians(np.asarray(lon, dtype=float))
    v = np.stack([np.cos(p) * np.cos(lam), np.cos(p) * np.sin(lam), np.sin(p)]).mean(axis=1)
    if float(np.linalg.norm(v)) < 1e-9:  # points spread evenly over the globe: any centre will do
        return 0.0, 0.0
    return math.degrees(math.atan2(v[2], math.hypot(v[0], v[1]))), math.degrees(math.atan2(v[1], v[0]))


@dataclass(frozen=True, slots=True)
class DistancePrior:
    """rtt_ms = intercept_ms + inflation * distance_km / 100."""

    inflation: float = 2.0  # public-Internet median (WonderProxy 2020: 1.98 at >= 500 km)
    intercept_ms: float = 2.0  # last mile, stack and serialisation on both ends

    def rtt_ms(self, distance_km: float) -> float:
        return self.intercept_ms + self.inflation * distance_km / KM_PER_MS_RTT

    def rtt_between(self, a: Site, b: Site) -> float:
        return self.rtt_ms(a.distance_km(b))

    def rtt_array(self, distance_km: ArrayLike) -> NDArray[np.float64]:
        return self.intercept_ms + self.inflation * np.asarray(distance_km, dtype=np.float64) / KM_PER_MS_RTT


@dataclass(frozen=True, slots=True)
class PriorFit:
    prior: DistancePrior
    method: str
    num_pairs: int
    median_rel_err: float  # |prior - measured| / measured over the pairs it was fitted on
    p90_rel_err: float


FIT_METHODS = ("relative", "lsq", "median")


def fit_prior(
    distance_km: ArrayLike, rtt_ms: ArrayLike, method: str = "relative", min_km: float = 500.0
) -> PriorFit:
    """Fit inflation and intercept from measured pairs.

    - "relative" (default): least absolute *relative* residual (IRLS). Routing cares about ratios
      (5 ms off matters next door, not across an ocean), and L1 shrugs off the outliers that
      geolocation errors and congested paths put in real matrices.
    - "lsq": ordinary least squares; long paths dominate, so the intercept soaks up their spread.
    - "median": inflation = median of (rtt - intercept) / (d / 100) over pairs >= min_km (where
      the constant matters least), intercept = median residual (floored at 0), alternated.
    """
    d = np.asarray(distance_km, dtype=np.float64).ravel()
    y = np.asarray(rtt_ms, dtype=np.float64).ravel()
    ok = np.isfinite(d) & np.isfinite(y) & (y > 0) & (d >= 0)
    d, y = d[ok], y[ok]
    if len(d) < 2:
        raise ValueError(f"fit_prior needs at least 2 valid pairs, got {len(d)}")
    x = d / KM_PER_MS_RTT
    if method == "lsq":
        inflation, intercept = _weighted_lsq(x, y, np.ones_like(y))
    elif method == "median":
        inflation, intercept = _median_of_ratios(x, y, min_km / KM_PER_MS_RTT)
    elif method == "relative":
        inflation, intercept = _irls_relative_l1(x, y)
    else:
        raise ValueError(f"unknown fit method {method!r}; expected one of {FIT_METHODS}")
    prior = DistancePrior(inflation=inflation, intercept_ms=intercept)
    rel = np.abs(prior.rtt_array(d) - y) / y
    return PriorFit(prior, method, len(d), float(np.median(rel)), float(np.percentile(rel, 90)))


def _median_of_ratios(x: NDArray[np.float64], y: NDArray[np.float64], min_x: float) -> tuple[float, float]:
    far = x >= min_x
    if not far.any():
        far = x > 0
    intercept = 0.0
    for _ in range(10):  # converges in a few passes: the intercept moves far-pair ratios only a little
        inflation = float(np.median((y[far] - intercept) / x[far]))
        intercept = max(0.0, float(np.median(y - inflation * x)))
    return inflation, intercept


def _weighted_lsq(x: NDArray[np.float64], y: NDArray[np.float64], w: NDArray[np.float64]) -> tuple[float, float]:
    a = np.stack([x, np.ones_like(x)], axis=1) * w[:, None]
    (slope, icpt), *_ = np.linalg.lstsq(a, y * w, rcond=None)
    return float(slope), float(icpt)


def _irls_relative_l1(x: NDArray[np.float64], y: NDArray[np.float64], iters: int = 50) -> tuple[float, float]:
    # Minimise sum |(b*x + c - y) / y| by reweighting: an L1 term |r| equals r^2 / |r|, so each pass
    # is a weighted least squares with weights 1 / (y^2 |r|) (sqrt of that on the rows).
    slope, icpt = _weighted_lsq(x, y, 1.0 / y)  # start from relative least squares
    for _ in range(iters):
        r = np.abs(slope * x + icpt - y) / y
        w = 1.0 / (y * np.sqrt(np.maximum(r, 1e-4)))  # floor: exact fits would get infinite weight
        new = _weighted_lsq(x, y, w)
        if abs(new[0] - slope) < 1e-7 and abs(new[1] - icpt) < 1e-6:
            break
        slope, icpt = new
    if icpt < 0:  # a negative last mile is unphysical: refit the slope alone through the origin,
        # where sum |b x / y - 1| = sum (x / y) |b - y / x| is minimised by a weighted median
        keep = x > 0
        return _weighted_median(y[keep] / x[keep], x[keep] / y[keep]), 0.0
    return slope, icpt


def _weighted_median(values: NDArray[np.float64], weights: NDArray[np.float64]) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, cum[-1] / 2)])
