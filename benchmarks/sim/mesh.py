"""The mesh: metros, ~1,100 sites spread over them, true gateway -> pool RTTs, pool capacities.

Metros are the 246 WonderProxy cities and the AWS CloudFront metros of the 31 countries with the
most of both (a metro weight, 1 + 2 if it has a CDN edge, is the population proxy); ~1,100 sites are
spread over them in proportion to weight, jittered ~20 km around the metro. Each metro has a
gateway (at its first site) that its clients use. True RTT between a gateway and a pool: the
matrix's mean RTT when both map to different matrix cities (plus the fibre time of each site's
offset from its city), 1 ms + fibre time inside a metro, else the distance prior fitted on the
matrix (geo.sites.fit_prior) times a per-pair log-normal factor whose spread matches the fit's
median relative error. Capacity is provisioned in proportion to metro weight (with per-metro and
per-pool noise); pool speeds come from benchmarks/results/engine.json (the tiny model on CPU).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from benchmarks import common
from benchmarks.sim.settings import Settings
from geo.sites import DistancePrior, PriorFit, Site, fit_prior, haversine_km, pairwise_km

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
WONDERPROXY = SHARED / "rtt" / "wonderproxy-2020"
CDN_CSV = SHARED / "sites" / "aws-cloudfront-edge-locations" / "aws-edge-locations.csv"
ENGINE_JSON = common.RESULTS_DIR / "engine.json"
F64 = NDArray[np.float64]
log = logging.getLogger("meshgate.bench.mesh_sim")

METRO_MERGE_KM = 75.0  # a CDN metro this close to a matrix city is that city
SITE_JITTER_KM = 20.0
METRO_BASE_MS = 1.0  # RTT floor between two sites of one metro


@dataclass(frozen=True, slots=True)
class Calibration:
    prefill_tps: float  # prompt tokens/s of one pool
    decode_tps_per_seq: float  # output tokens/s of one sequence in a full batch
    max_num_seqs: int  # the largest pool's slots
    source: str


@dataclass(frozen=True, slots=True)
class Metro:
    name: str
    country: str
    lat: float
    lon: float
    weight: float
    city: int  # index into the RTT matrix, -1: none


@dataclass
class Mesh:
    sites: list[Site]
    metros: list[Metro]
    site_metro: NDArray[np.intp]  # (N,)
    gateways: NDArray[np.intp]  # (G,) site index of each metro's gateway; metro m uses gateway m
    rtt_ms: F64  # (G, N) true gateway -> pool RTT
    prior_ms: F64  # (G, N) the distance prior's estimate
    slots: NDArray[np.intp]  # (N,)
    prefill_tps: F64  # (N,)
    decode_tps: F64  # (N,) per sequence
    prior: DistancePrior
    calib: Calibration
    info: dict[str, Any] = field(default_factory=dict)


# -- inputs ----------------------------------------------------------------------------------
def engine_calibration(path: Path = ENGINE_JSON) -> Calibration:
    """Prefill rate from the cold prefix-cache request (prefix + suffix tokens / its TTFT), decode
    rate per sequence from continuous batching's output tokens/s over max_num_seqs."""
    try:
        d = json.loads(path.read_text())
        pc, seqs = d["prefix_cache"], int(d["engine_config"]["max_num_seqs"])
        prefill = (pc["prefix_tokens"] + pc["suffix_tokens"]) / pc["cold_ttft_s"]
        decode = d["modes"]["continuous"]["output_tok_s"] / seqs
        return Calibration(float(prefill), float(decode), seqs, str(path.relative_to(ROOT)))
    except (OSError, KeyError, ValueError, TypeError, ZeroDivisionError) as e:
        log.warning("no engine calibration (%s): using defaults", e)
        return Calibration(20_000.0, 60.0, 32, "defaults")


def _iso2_names() -> dict[str, str]:
    """Country name -> ISO-2: benchmarks.wonderproxy's table (when it imports), else the CDN list's."""
    names: dict[str, str] = {}
    if CDN_CSV.is_file():
        with CDN_CSV.open(newline="") as f:
            names.update({r["country"]: r["country_code"] for r in csv.DictReader(f)})
    try:
        from benchmarks.wonderproxy import ISO2

        names.update(ISO2)
    except Exception as e:  # noqa: BLE001 - another engineer's module, possibly mid-edit
        log.warning("benchmarks.wonderproxy.ISO2 unavailable (%s): country names from the CDN list only", e)
    return names


def load_matrix(folder: Path = WONDERPROXY) -> tuple[list[tuple[str, str, float, float]], F64]:
    """Cities (name, ISO-2, lat, lon) and their symmetrised mean-RTT matrix (NaN: no data)."""
    names = _iso2_names()
    cities, index = [], {}
    with (folder / "servers-2020-07-19.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            code = names.get(r["country"])
            if code is None or not r["latitude"]:
                continue
            index[r["id"]] = len(cities)
            cities.append((r["title"] or r["name"], code, float(r["latitude"]), float(r["longitude"])))
    m = np.full((len(cities), len(cities)), np.nan)
    with (folder / "pings-2020-07-19-2020-07-20-grouped.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            i, j = index.get(r["source"]), index.get(r["destination"])
            if i is not None and j is not None and i != j:
                m[i, j] = float(r["avg"])
    with np.errstate(invalid="ignore"):
        sym = np.where(np.isnan(m), m.T, np.where(np.isnan(m.T), m, (m + m.T) / 2))
    return cities, sym


def load_cdn(path: Path = CDN_CSV) -> list[tuple[str, str, float, float]]:
    with path.open(newline="") as f:
        return [(r["city"], r["country_code"], float(r["latitude"]), float(r["longitude"])) for r in csv.DictReader(f)]


def real_metros(cities: list[tuple[str, str, float, float]], cdn: list[tuple[str, str, float, float]],
                num_countries: int) -> list[Metro]:
    """The matrix cities and CDN metros of the num_countries countries with the most of both."""
    count: dict[str, int] = {}
    for _, cc, _, _ in cities + cdn:
        count[cc] = count.get(cc, 0) + 1
    keep = set(sorted(count, key=lambda c: (-count[c], c))[:num_countries])
    metros = [Metro(n, cc, lat, lon, 1.0, i) for i, (n, cc, lat, lon) in enumerate(cities) if cc in keep]
    for name, cc, lat, lon in cdn:
        if cc not in keep:
            continue
        near = [(haversine_km(lat, lon, m.lat, m.lon), k) for k, m in enumerate(metros)
                if m.country == cc and m.city >= 0]
        d, k = min(near, default=(math.inf, -1))
        if d <= METRO_MERGE_KM:  # an edge location in a matrix city: a bigger metro
            metros[k] = dataclasses.replace(metros[k], weight=metros[k].weight + 2.0)
        else:
            metros.append(Metro(name, cc, lat, lon, 3.0, -1))
    return metros


def synthetic_metros(num_metros: int = 12, seed: int = 0) -> list[Metro]:
    """Metros in four made-up countries spread over the longitudes (for tests: no ../shared)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num_metros):
        c = i % 4
        lat, lon = rng.uniform(20, 55), -120 + 80 * c + rng.uniform(-10, 10)
        out.append(Metro(f"M{i}", "ABCD"[c] * 2, float(lat), float(lon), float(rng.choice([1.0, 3.0])), -1))
    return out


# -- the mesh --------------------------------------------------------------------------------
def _allocate(total: int, weights: F64) -> NDArray[np.intp]:
    """Integers >= 1 summing to max(total, len(weights)), in proportion to weights (largest remainder)."""
    n = len(weights)
    total = max(total, n)
    raw = (total - n) * weights / weights.sum()
    out = 1 + np.floor(raw).astype(np.intp)
    out[np.argsort(-(raw - np.floor(raw)))[: total - int(out.sum())]] += 1
    return out


def _place_sites(metros: list[Metro], num_sites: int, rng: np.random.Generator
                 ) -> tuple[list[Site], NDArray[np.intp], F64, NDArray[np.intp]]:
    counts = _allocate(num_sites, np.array([m.weight for m in metros]))
    sites, site_metro, offset, gateways = [], [], [], []
    for k, (m, n) in enumerate(zip(metros, counts)):
        gateways.append(len(sites))
        for j in range(int(n)):
            dx, dy = (0.0, 0.0) if j == 0 else np.clip(rng.normal(0, SITE_JITTER_KM, 2), -3 * SITE_JITTER_KM,
                                                        3 * SITE_JITTER_KM)
            lat = float(np.clip(m.lat + dy / 111.2, -89.9, 89.9))
            lon = float((m.lon + dx / (111.2 * max(math.cos(math.radians(lat)), 0.05)) + 180) % 360 - 180)
            sites.append(Site(f"s{len(sites):04d}", f"{m.name} {j + 1}", m.country, lat, lon))
            site_metro.append(k)
            offset.append(math.hypot(dx, dy))
    return sites, np.array(site_metro, dtype=np.intp), np.array(offset), np.array(gateways, dtype=np.intp)


def _true_rtt(metros: list[Metro], site_metro: NDArray[np.intp], offset_km: F64, gateways: NDArray[np.intp],
              dist: F64, matrix: F64 | None, prior: DistancePrior, pair_sigma: float, rng: np.random.Generator) -> F64:
    g_metro = site_metro[gateways]
    rtt = prior.rtt_array(dist) * rng.lognormal(0.0, pair_sigma, dist.shape)  # (G, N) unmapped pairs
    same = g_metro[:, None] == site_metro[None, :]
    # inside a metro: metro fibre (the fitted intercept is the WAN's last miles, ~7 ms, too much here)
    rtt = np.where(same, METRO_BASE_MS + 2.0 * dist / 100.0, rtt)
    if matrix is not None:
        city = np.array([m.city for m in metros])[site_metro]
        gc, pc = city[gateways][:, None], city[None, :]
        mapped = (gc >= 0) & (pc >= 0) & ~same
        measured = matrix[np.maximum(gc, 0), np.maximum(pc, 0)]
        tail = prior.inflation * (offset_km[gateways][:, None] + offset_km[None, :]) / 100.0
        ok = mapped & np.isfinite(measured)
        rtt = np.where(ok, np.nan_to_num(measured) + tail, rtt)
    return np.maximum(rtt, 0.3)


def mean_loguniform(lo: float, hi: float) -> float:
    return (hi - lo) / math.log(hi / lo) if hi > lo else lo


def mean_service_s(s: Settings, c: Calibration) -> float:
    return (mean_loguniform(s.min_prompt_tokens, s.max_prompt_tokens) / c.prefill_tps
            + mean_loguniform(s.min_output_tokens, s.max_output_tokens) / c.decode_tps_per_seq)


def build_mesh(s: Settings, calib: Calibration, metros: list[Metro], matrix: F64 | None,
               fit: PriorFit | None) -> Mesh:
    rng = np.random.default_rng(s.seed)
    prior = fit.prior if fit is not None else DistancePrior()
    # per-pair spread around the prior: |log-normal - 1| has median ~0.674 sigma for small sigma
    pair_sigma = math.log1p(fit.median_rel_err) / 0.674 if fit is not None else 0.2
    sites, site_metro, offset, gateways = _place_sites(metros, s.num_sites, rng)
    lat, lon = np.array([x.lat for x in sites]), np.array([x.lon for x in sites])
    dist = pairwise_km(lat, lon)[gateways]  # (G, N)
    rtt = _true_rtt(metros, site_metro, offset, gateways, dist, matrix, prior, pair_sigma, rng)
    # capacity: in proportion to metro weight (where the demand is), with imperfect provisioning
    weights = np.array([m.weight for m in metros])
    metro_slots = weights * rng.lognormal(0, s.metro_capacity_sigma, len(metros))
    metro_slots *= s.mean_slots * len(sites) / metro_slots.sum()
    share = rng.lognormal(0, s.pool_capacity_sigma, len(sites))
    share /= np.bincount(site_metro, weights=share)[site_metro]
    slots = np.clip(np.rint(metro_slots[site_metro] * share), 4, calib.max_num_seqs).astype(np.intp)
    day_s = s.num_requests * mean_service_s(s, calib) / (s.mean_util * float(slots.sum()))
    speed = rng.uniform(0.8, 1.2, len(sites))  # GPU generations differ
    return Mesh(sites, metros, site_metro, gateways, rtt, prior.rtt_array(dist), slots, calib.prefill_tps * speed,
                calib.decode_tps_per_seq * speed, prior, calib,
                {"num_sites": len(sites), "num_metros": len(metros), "num_gateways": len(gateways),
                 "num_countries": len({x.country for x in sites}), "total_slots": int(slots.sum()),
                 "day_s": day_s, "mean_service_s": mean_service_s(s, calib), "pair_sigma": pair_sigma})


def real_mesh(s: Settings, calib: Calibration, matrix_dir: Path | None = None, cdn_csv: Path | None = None
              ) -> Mesh | None:
    """The mesh from ../shared data; None when the data is absent."""
    matrix_dir, cdn_csv = matrix_dir or WONDERPROXY, cdn_csv or CDN_CSV
    if not (matrix_dir / "servers-2020-07-19.csv").is_file() or not cdn_csv.is_file():
        return None
    cities, matrix = load_matrix(matrix_dir)
    iu = np.triu_indices(len(cities), 1)
    lat, lon = np.array([c[2] for c in cities]), np.array([c[3] for c in cities])
    known = np.isfinite(matrix[iu])
    fit = fit_prior(pairwise_km(lat, lon)[iu][known], matrix[iu][known])
    mesh = build_mesh(s, calib, real_metros(cities, load_cdn(cdn_csv), s.num_countries), matrix, fit)
    mesh.info.update(data="WonderProxy 2020 (mean RTT) + AWS CloudFront metros", prior_fit={
        "inflation": fit.prior.inflation, "intercept_ms": fit.prior.intercept_ms, "num_pairs": fit.num_pairs,
        "median_rel_err": fit.median_rel_err, "p90_rel_err": fit.p90_rel_err})
    return mesh


def synthetic_mesh(s: Settings, calib: Calibration | None = None, num_metros: int = 12) -> Mesh:
    mesh = build_mesh(s, calib or Calibration(20_000.0, 60.0, 32, "synthetic"), synthetic_metros(num_metros, s.seed),
                      None, None)
    mesh.info["data"] = "synthetic"
    return mesh

