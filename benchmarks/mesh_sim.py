"""Mesh simulator: the real routing plug-ins over ~1,100 GPU pools in 31 countries, on a simulated clock.

    python -m benchmarks.mesh_sim [--quick] [--json PATH] [--workers N] [--no-variants]

A discrete-event simulation. Every routing decision is `build_profile(name).route(RouteRequest,
endpoints)` on real `Endpoint` objects, whose fields the simulator keeps as a gateway's background
tasks would: `load` from periodic probes (every probe period, the pool's state when the probe reached
it, delivered one RTT after sending) and from the load header of each answer (`LoadReport.from_header`,
as `gateway/pools/upstream.py` does), `rtt_ms` an EWMA (alpha 0.3) of noisy probe samples, and
`in_flight` credited on send and released when the gateway sees the answer end.

The mesh (benchmarks/mesh_sim.py:build_mesh): metros are the 246 WonderProxy cities and the AWS
CloudFront metros of the 31 countries with the most of both (a metro weight, 1 + 2 if it has a CDN
edge, is the population proxy); ~1,100 sites are spread over them in proportion to weight, jittered
~20 km around the metro. Each metro has a gateway (at its first site) that its clients use. True RTT
between a gateway and a pool: the matrix's mean RTT when both map to different matrix cities (plus
the fibre time of each site's offset from its city), 1 ms + fibre time inside a metro, else the
distance prior fitted on the matrix (geo.sites.fit_prior) times a per-pair log-normal factor whose
spread matches the fit's median relative error. Gateways' RTT estimates: EWMA of probe samples with
10 % log-normal jitter and 5 % outliers at 1.5-5x (geo.eval's probe model).

Demand: Poisson arrivals per metro, rate proportional to weight times a diurnal curve of local solar
time (trough 04:00, peak 16:00, peak/mean 1.68); one day is compressed into `day_s` simulated seconds,
so the peak sweeps westward around the globe once. A share of requests is pinned to its own country
(residency). Pools: continuous-batching servers with `slots` concurrent sequences (FIFO admission,
queueing when full), prefill serialised at the pool's prefill rate, decode at a per-sequence rate;
rates from benchmarks/results/engine.json (the tiny model on CPU). Capacity is provisioned in
proportion to metro weight (with per-metro and per-pool noise) so the day's mean utilisation is
`mean_util` and a metro's local peak is ~1.7x that.

Every profile routes over a candidate set, not the whole mesh (see benchmarks/routing_scale.py): the
gateway's `k_near` pools with the lowest measured RTT, plus `k_spill` taken from a list of the pools
with the lowest RTT + last reported queue wait, refreshed once per probe period. The oracle is not a
profile but a central, clairvoyant, greedy scheduler: over every pool of the mesh (residency
permitting) it takes the argmin of the true TTFT = client RTT + true RTT + wait for a slot and for
the prefill queue + prefill, knowing when each slot frees (so the output lengths of the requests
already there) and reserving the slot as it decides (so it sees its own requests in transit).

Variants (extra rows, the latency profile only; see VARIANTS) measure changes outside the benchmark:
the gateway keeping a probe's rates when a response header updates the load, pools estimating the
wait for a batch slot from the mean request duration rather than max_tokens, FixedTtftModel's
in-flight crediting, pools refusing (429) when the batch is full while the gateway has attempts
left, faster probes, no spill candidates, and perfectly fresh load reports (an information bound,
not a proposal).
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import heapq
import json
import logging
import math
import multiprocessing
import random
import sys
import time
from bisect import bisect_right, insort
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from benchmarks import common
from gateway.config import RoutingOptions
from gateway.core.types import Endpoint, LoadReport, RouteRequest
from gateway.routing.framework import Profile
from gateway.routing.latency import TtftModel
from gateway.routing.plugins import build_profile
from geo.sites import DistancePrior, PriorFit, Site, fit_prior, haversine_km, pairwise_km

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WONDERPROXY = SHARED / "rtt" / "wonderproxy-2020"
CDN_CSV = SHARED / "sites" / "aws-cloudfront-edge-locations" / "aws-edge-locations.csv"
ENGINE_JSON = common.RESULTS_DIR / "engine.json"
MODEL = "meshgate-tiny"
MODELS = frozenset({MODEL})
POLICIES = ("latency", "oracle", "nearest", "least-load", "round-robin", "p2c", "random")
LOAD_BLIND = frozenset({"nearest", "round-robin", "random"})  # profiles whose choice never reads Endpoint.load
F64 = NDArray[np.float64]
log = logging.getLogger("meshgate.bench.mesh_sim")

# Probe noise as geo.eval simulates it: log-normal jitter, and a few probes that hit a queue.
PROBE_SIGMA, PROBE_OUTLIER_P, PROBE_OUTLIER = 0.1, 0.05, (1.5, 5.0)
RTT_ALPHA = 0.3  # gateway/pools/upstream.py
EWMA_N = [1 - (1 - RTT_ALPHA) ** n for n in range(6)]  # the weight n samples of one value get
METRO_MERGE_KM = 75.0  # a CDN metro this close to a matrix city is that city
SITE_JITTER_KM = 20.0
METRO_BASE_MS = 1.0  # RTT floor between two sites of one metro


@dataclass(frozen=True, slots=True)
class Settings:
    num_sites: int = 1100
    num_countries: int = 31
    num_requests: int = 150_000  # expected arrivals over the measured day
    mean_slots: float = 12.0  # concurrent sequences per pool, on average (clipped to 4..max_num_seqs)
    warmup_s: float = 10.0  # routed, not measured (queues start empty)
    mean_util: float = 0.55  # the day's mean demand / capacity; a metro's local peak is ~1.7x this
    # One day of demand is compressed into day_s = num_requests x mean service / (mean_util x slots):
    # the request budget, not the clock, sets it (~100 s for the full run).
    metro_capacity_sigma: float = 0.3  # log-normal spread of capacity per metro (provisioning is imperfect)
    pool_capacity_sigma: float = 0.5  # and of the shares of the pools within a metro
    probe_period_s: float = 1.0  # gateway.config ProbeConfig.period_s
    k_near: int = 16
    k_spill: int = 8
    candidates: str = "near+spill"  # near+spill | near
    slo_s: float = 1.0  # goodput: share of requests with TTFT <= this
    residency_share: float = 0.2  # requests that must be served in their own country
    min_prompt_tokens: int = 32  # log-uniform, as benchmarks/engine.py
    max_prompt_tokens: int = 512
    min_output_tokens: int = 32  # log-uniform; longer than engine.py's 8..256: chat answers
    max_output_tokens: int = 1024
    fresh_reports: bool = False  # True: every decision sees the pools' state now (no probe staleness)
    client_max_tokens: int | None = 1024  # what clients send as max_tokens (None: each answer's length)
    report: str = "engine"  # the pools' queue_wait_s: engine = gateway/worker/engine.py's (prefill backlog
    #                         + slot wait from running requests' max_tokens) | mean = prefill backlog +
    #                         requests ahead beyond the free slots x mean request duration / slots
    model: str = "gateway"  # gateway: TtftModel as shipped | fixed: FixedTtftModel (below)
    max_waiting: int | None = None  # a pool with a full batch and this many waiting refuses (429) a
    #                                 request that still has attempts left; None: pools queue everything
    max_attempts: int = 3  # gateway.config UpstreamConfig.max_attempts
    header: str = "replace"  # replace: a response header's report replaces the load (prefill_tps lost,
    #                          as upstream.py does) | merge: it keeps the last probe's rates
    seed: int = 0


FULL = Settings()
QUICK = Settings(num_sites=300, num_requests=20_000, warmup_s=5.0)
_MERGE = {"header": "merge"}
VARIANTS: dict[str, dict[str, Any]] = {
    "latency+header-merge": _MERGE,  # gateway: a response header keeps the probe's rates
    "latency+mean-wait": {"report": "mean"},  # worker: slot wait from the mean duration, not max_tokens
    "latency+merge+credit": {**_MERGE, "model": "fixed"},  # gateway: FixedTtftModel
    "latency+merge+failover": {**_MERGE, "max_waiting": 0},  # a full pool refuses while attempts remain
    "latency+merge+failover5": {**_MERGE, "max_waiting": 0, "max_attempts": 5},
    "latency+merge+failover5/probe0.25": {**_MERGE, "max_waiting": 0, "max_attempts": 5, "probe_period_s": 0.25},
    "latency+merge+failover5/near-only": {**_MERGE, "max_waiting": 0, "max_attempts": 5, "candidates": "near"},
    "latency+merge/fresh": {**_MERGE, "fresh_reports": True},  # what perfectly fresh reports would buy
}
PLOTTED_VARIANTS = ("latency+header-merge", "latency+merge+failover5", "latency+merge/fresh")


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


def _mean_loguniform(lo: float, hi: float) -> float:
    return (hi - lo) / math.log(hi / lo) if hi > lo else lo


def mean_service_s(s: Settings, c: Calibration) -> float:
    return (_mean_loguniform(s.min_prompt_tokens, s.max_prompt_tokens) / c.prefill_tps
            + _mean_loguniform(s.min_output_tokens, s.max_output_tokens) / c.decode_tps_per_seq)


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


def real_mesh(s: Settings, calib: Calibration) -> Mesh | None:
    """The mesh from ../shared data; None when the data is absent."""
    if not (WONDERPROXY / "servers-2020-07-19.csv").is_file() or not CDN_CSV.is_file():
        return None
    cities, matrix = load_matrix()
    iu = np.triu_indices(len(cities), 1)
    lat, lon = np.array([c[2] for c in cities]), np.array([c[3] for c in cities])
    known = np.isfinite(matrix[iu])
    fit = fit_prior(pairwise_km(lat, lon)[iu][known], matrix[iu][known])
    mesh = build_mesh(s, calib, real_metros(cities, load_cdn(), s.num_countries), matrix, fit)
    mesh.info.update(data="WonderProxy 2020 (mean RTT) + AWS CloudFront metros", prior_fit={
        "inflation": fit.prior.inflation, "intercept_ms": fit.prior.intercept_ms, "num_pairs": fit.num_pairs,
        "median_rel_err": fit.median_rel_err, "p90_rel_err": fit.p90_rel_err})
    return mesh


def synthetic_mesh(s: Settings, calib: Calibration | None = None, num_metros: int = 12) -> Mesh:
    mesh = build_mesh(s, calib or Calibration(20_000.0, 60.0, 32, "synthetic"), synthetic_metros(num_metros, s.seed),
                      None, None)
    mesh.info["data"] = "synthetic"
    return mesh


# -- demand ----------------------------------------------------------------------------------
DIURNAL_MEAN = 0.35 + 0.65 * 0.375  # mean of diurnal() over a day


def diurnal(hour: F64) -> F64:
    """Relative demand at local solar time: trough 0.35 at 04:00, peak 1 at 16:00."""
    return 0.35 + 0.65 * ((1 - np.cos(2 * np.pi * (hour - 4.0) / 24.0)) / 2) ** 2


@dataclass
class Arrivals:
    t: F64  # gateway arrival time (s), sorted
    metro: NDArray[np.intp]
    prompt: NDArray[np.intp]
    output: NDArray[np.intp]
    resident: NDArray[np.bool_]
    client_ms: F64
    measured: NDArray[np.bool_]  # after the warm-up


def make_arrivals(mesh: Mesh, s: Settings) -> Arrivals:
    rng = np.random.default_rng(s.seed + 1)
    w = np.array([m.weight for m in mesh.metros])
    lon = np.array([m.lon for m in mesh.metros])
    day_s = mesh.info["day_s"]
    lam = s.num_requests / day_s * w / w.sum() / DIURNAL_MEAN  # per metro at diurnal() == 1
    dt, ts, ms = 0.25, [], []
    for k in range(int(math.ceil((s.warmup_s + day_s) / dt))):
        t0 = k * dt
        hour = (24.0 * (t0 + dt / 2 - s.warmup_s) / day_s + lon / 15.0) % 24.0
        n = rng.poisson(lam * diurnal(hour) * dt)
        ms.append(np.repeat(np.arange(len(w)), n))
        ts.append(t0 + rng.uniform(0, dt, int(n.sum())))
    t, metro = np.concatenate(ts), np.concatenate(ms)
    order = np.argsort(t, kind="stable")
    t, metro = t[order], metro[order]
    n = len(t)

    def loguniform(lo: int, hi: int) -> NDArray[np.intp]:
        return np.exp(rng.uniform(math.log(lo), math.log(hi), n)).astype(np.intp)

    client_km = np.abs(rng.normal(0, SITE_JITTER_KM, n))  # client -> its metro's gateway
    client_ms = mesh.prior.rtt_array(client_km) + rng.uniform(2.0, 10.0, n)  # plus the access network
    return Arrivals(t, metro, loguniform(s.min_prompt_tokens, s.max_prompt_tokens),
                    loguniform(s.min_output_tokens, s.max_output_tokens), rng.random(n) < s.residency_share,
                    client_ms, t >= s.warmup_s)


# -- pools -----------------------------------------------------------------------------------
class PoolSim:
    """A continuous-batching pool as a FIFO multi-server queue. Service is known at admission
    (prefill, then decode), so the Kiefer-Wolfowitz recursion gives start, first-token and end times
    at once: start = max(arrival, earliest free slot); prefill runs one prompt at a time. Starts and
    first tokens are then non-decreasing, so the state at any past time is a few bisections."""

    __slots__ = ("slots", "heap", "prefill_free", "ptps", "dtps", "mean_service_s", "arr", "start", "first", "cum",
                 "ends", "end_i", "cap_i")

    def __init__(self, slots: int, ptps: float, dtps: float, mean_service_s: float):
        self.slots = slots
        self.heap = [0.0] * slots  # when each slot is next free
        self.prefill_free = 0.0
        self.ptps, self.dtps, self.mean_service_s = ptps, dtps, mean_service_s
        self.arr: list[float] = []
        self.start: list[float] = []
        self.first: list[float] = []
        self.cum = [0]  # prompt tokens arrived, cumulative
        self.ends: list[float] = []  # sorted
        self.end_i: list[float] = []  # by arrival
        self.cap_i: list[int] = []  # max_tokens, by arrival

    def admit(self, a: float, prompt: int, output: int, max_tokens: int) -> tuple[float, float]:
        """The request arrives now (a >= every earlier arrival, except for the oracle's reservations,
        whose runs never ask for a report): its first-token and end times."""
        s = max(a, self.heap[0])
        first = max(s, self.prefill_free) + prompt / self.ptps
        self.prefill_free = first
        end = first + output / self.dtps
        heapq.heapreplace(self.heap, end)
        self.arr.append(a)
        self.start.append(s)
        self.first.append(first)
        self.cum.append(self.cum[-1] + prompt)
        insort(self.ends, end)
        self.end_i.append(end)
        self.cap_i.append(max_tokens)
        return first, end

    def waiting(self, tau: float) -> int:
        return bisect_right(self.arr, tau) - bisect_right(self.start, tau)

    def report(self, tau: float, mean_wait: bool = False) -> LoadReport:
        """What the worker's load report said at time tau (engine.py's load_report)."""
        na, ns = bisect_right(self.arr, tau), bisect_right(self.start, tau)
        nf, ne = bisect_right(self.first, tau), bisect_right(self.ends, tau)
        waiting, running, queued = na - ns, ns - ne, self.cum[na] - self.cum[nf]
        qw = queued / self.ptps
        ahead = waiting + 1 - (self.slots - running)  # requests to finish before a new one gets a slot
        if ahead > 0 and running > 0:
            qw += ahead * self.mean_service_s / self.slots if mean_wait else self._slot_wait_s(tau, ns, running, ahead)
        return LoadReport(waiting=waiting, running=running, queued_prompt_tokens=queued, prefill_tps=self.ptps,
                          decode_tps=running * self.dtps, queue_wait_s=qw)

    def _slot_wait_s(self, tau: float, ns: int, running: int, ahead: int) -> float:
        """engine.py's _slot_wait_s: the ahead-th smallest (max_tokens - tokens so far) of the running
        requests, times the decode step."""
        left, i = [], ns - 1
        while len(left) < running and i >= 0:
            if self.end_i[i] > tau:
                left.append(self.cap_i[i] - max(0.0, tau - self.first[i]) * self.dtps)
            i -= 1
        left.sort()
        return max(0.0, left[min(ahead, len(left)) - 1]) / self.dtps


# -- gateways --------------------------------------------------------------------------------
class SimEndpoint(Endpoint):
    """An Endpoint plus what FixedTtftModel reads: the pool's batch slots (the registry's
    Pool.capacity), its mean request duration, and the requests sent since the last load report."""

    __slots__ = ("slots", "mean_service_s", "sent_since_load")

    def __init__(self, pool_id: str, site: str, slots: int, mean_service_s: float):
        super().__init__(pool_id, "", site, "meshgate", MODELS)
        self.slots, self.mean_service_s, self.sent_since_load = slots, mean_service_s, 0


class FixedTtftModel(TtftModel):
    """The proposed gateway/routing/latency.py TtftModel.queue_s (the rest unchanged): the unseen
    requests are the ones this gateway sent since the report, not in_flight minus the pool's total
    (which other gateways' load drives to zero in a mesh), and each of them that finds no free slot
    adds a slot's worth of waiting (mean request duration / slots), not only its prefill."""

    def queue_s(self, req: RouteRequest, e: Endpoint) -> float:
        assert isinstance(e, SimEndpoint)
        tps = self.prefill_tps(e)
        unseen = e.sent_since_load
        load = e.load
        if load is None:
            return unseen * req.prompt_tokens / tps
        free = max(0, e.slots - load.running - load.waiting)
        return (load.queue_wait_s + unseen * req.prompt_tokens / tps
                + max(0, unseen - free) * e.mean_service_s / e.slots)


def make_profile(policy: str, s: Settings, prior: DistancePrior) -> Profile:
    opts = RoutingOptions(rtt_inflation=prior.inflation, rtt_intercept_ms=prior.intercept_ms)
    profile = build_profile(policy, opts, rng=random.Random(s.seed + 5))
    if s.model == "fixed":
        model = FixedTtftModel(opts.default_prefill_tps)
        profile.predictor = model
        for plugin in [*profile.filters, *(sc for sc, _ in profile.scorers)]:
            if isinstance(getattr(plugin, "model", None), TtftModel):
                plugin.model = model  # type: ignore[attr-defined]
    return profile


class GatewaySim:
    """One gateway's mesh view: an Endpoint per pool (made when first needed) and the candidate order."""

    __slots__ = ("eps", "last_round", "phase", "rtt_s", "prior_ms", "near", "near_cc", "spill")

    def __init__(self, n: int, phase: float, rtt_ms: F64, est_ms: F64, prior_ms: F64):
        self.eps: list[SimEndpoint | None] = [None] * n
        self.last_round = [-(10**9)] * n
        self.phase = phase
        self.rtt_s = (rtt_ms / 1000.0).tolist()
        self.prior_ms = prior_ms.tolist()
        # by measured RTT: a static 3 % EWMA error stands in for the periodic re-sort (RTTs do not drift here)
        self.near: list[int] = np.argsort(est_ms, kind="stable").tolist()
        self.near_cc: dict[str, list[int]] = {}
        self.spill: list[int] = []


ARRIVE, HEADER, FINISH, REFUSED = range(4)  # event kinds


class Simulation:
    """One policy over the whole day. `run()` returns per-request outcomes for the measured window."""

    def __init__(self, mesh: Mesh, arr: Arrivals, s: Settings, policy: str):
        self.mesh, self.arr, self.s, self.policy = mesh, arr, s, policy
        n = len(mesh.sites)
        msvc = mean_service_s(s, mesh.calib)
        self.pools = [PoolSim(int(mesh.slots[p]), float(mesh.prefill_tps[p]), float(mesh.decode_tps[p]), msvc)
                      for p in range(n)]
        self.country = [x.country for x in mesh.sites]
        self.pool_ids = [f"p{p:04d}" for p in range(n)]
        self.index = {pid: p for p, pid in enumerate(self.pool_ids)}
        est = mesh.rtt_ms * np.random.default_rng(s.seed + 3).lognormal(0, 0.03, mesh.rtt_ms.shape)  # EWMA error
        self.est_ms = est
        phases = np.random.default_rng(s.seed + 4).uniform(0, s.probe_period_s, len(mesh.gateways))
        self.gws = [GatewaySim(n, float(phases[g]), mesh.rtt_ms[g], est[g], mesh.prior_ms[g])
                    for g in range(len(mesh.gateways))]
        self.msvc = msvc
        self.period, self.fresh = s.probe_period_s, s.fresh_reports
        self.track_load = policy not in LOAD_BLIND  # skipping their reports saves time, changes no choice
        nrng = np.random.default_rng(s.seed + 6)
        noise = nrng.lognormal(0.0, PROBE_SIGMA, 1 << 16)  # probe samples / true RTT, used in turn
        noise *= np.where(nrng.random(noise.size) < PROBE_OUTLIER_P, nrng.uniform(*PROBE_OUTLIER, noise.size), 1.0)
        self.noise, self.noise_i = noise.tolist(), 0
        self.profile = None if policy == "oracle" else make_profile(policy, s, mesh.prior)
        self.mean_wait = s.report == "mean"
        self.reqs = {cc: frozenset({cc}) for cc in set(self.country)}
        # the oracle's view: every pool's earliest free slot and prefill queue, as arrays
        self.slot_free = np.zeros(n)
        self.prefill_free = np.zeros(n)
        self.ptps = mesh.prefill_tps.copy()
        self.masks = {cc: np.array([c == cc for c in self.country]) for cc in set(self.country)}
        self.t_gw, self.metro, self.prompt = arr.t.tolist(), arr.metro.tolist(), arr.prompt.tolist()
        self.output, self.resident, self.client_ms = arr.output.tolist(), arr.resident.tolist(), arr.client_ms.tolist()
        self.metro_cc = [m.country for m in mesh.metros]
        cap = s.client_max_tokens
        self.max_tokens = [max(cap, o) for o in self.output] if cap is not None else self.output

    # -- the gateway's view, refreshed as its background tasks would have by now
    def endpoint(self, gw: GatewaySim, p: int, now: float) -> Endpoint:
        e = gw.eps[p]
        if e is None:
            e = gw.eps[p] = SimEndpoint(self.pool_ids[p], self.mesh.sites[p].id, self.pools[p].slots, self.msvc)
            e.country = self.country[p]
            e.prior_rtt_ms = gw.prior_ms[p]
        r = gw.rtt_s[p]
        if self.fresh:  # what the pool would say if asked now (and the answer took no time)
            e.load, e.load_at, e.sent_since_load = self.pools[p].report(now, self.mean_wait), now, 0
        k = int((now - gw.phase - r) // self.period)  # the last probe round whose answer is back
        last = gw.last_round[p]
        if k > last:
            # n rounds since the last look: one sample stands in for them, weighted as their EWMA would be
            x = r * 1000.0 * self.noise[self.noise_i % len(self.noise)]
            self.noise_i += 1
            e.rtt_ms = x if e.rtt_ms is None else e.rtt_ms + EWMA_N[min(k - last, 5)] * (x - e.rtt_ms)
            back = gw.phase + k * self.period + r
            if back > e.load_at and self.track_load and not self.fresh:
                e.load = self.pools[p].report(back - r / 2, self.mean_wait)
                e.load_at, e.sent_since_load = back, 0
            gw.last_round[p] = k
        return e

    def candidates(self, gw: GatewaySim, cc: str | None) -> list[int]:
        """k_near by measured RTT, then k_spill from the spill list (lowest RTT + reported wait)."""
        s = self.s
        if cc is None:
            near = gw.near[: s.k_near]
        else:
            lst = gw.near_cc.get(cc)
            if lst is None:
                lst = gw.near_cc[cc] = [p for p in gw.near if self.country[p] == cc]
            near = lst[: s.k_near]
        if s.candidates == "near" or not s.k_spill:
            return near
        out, taken, country = list(near), set(near), self.country
        for p in gw.spill:
            if p not in taken and (cc is None or country[p] == cc):
                out.append(p)
                if len(out) >= s.k_near + s.k_spill:
                    break
        return out

    def refresh_spill(self, now: float) -> None:
        """Once per probe period: every gateway re-ranks the mesh by RTT + reported wait (the reports it
        holds are between one RTT and a period plus an RTT old: taken as half a period)."""
        tau = now - self.period / 2
        qw_ms = 1000.0 * np.array([p.report(tau, self.mean_wait).queue_wait_s for p in self.pools])
        m = min(len(qw_ms), 2 * (self.s.k_near + self.s.k_spill))
        est = self.est_ms + qw_ms[None, :]
        top = np.argpartition(est, m - 1, axis=1)[:, :m]
        order = np.take_along_axis(top, np.argsort(np.take_along_axis(est, top, axis=1), axis=1), axis=1)
        for gw, row in zip(self.gws, order.tolist()):
            gw.spill = row

    def oracle_pick(self, g: int, t: float, prompt: int, cc: str | None) -> int:
        r = self.mesh.rtt_ms[g] / 1000.0
        a = t + r / 2
        first = np.maximum(np.maximum(a, self.slot_free), self.prefill_free) + prompt / self.ptps
        ttft = r + first - a
        if cc is not None:
            ttft = np.where(self.masks[cc], ttft, np.inf)
        return int(np.argmin(ttft))

    def run(self, progress: common.Progress | None = None) -> dict[str, Any]:
        s, arr = self.s, self.arr
        n = len(arr.t)
        self.ttft = np.full(n, np.nan)
        self.served = np.full(n, -1, dtype=np.intp)
        self.refused = np.zeros(n, dtype=np.intp)
        self.ranked: dict[int, list[Endpoint]] = {}  # failover order of requests that may be refused
        self.events: list[tuple[float, int, int, int, int]] = []  # (time, kind, gateway, pool, request)
        events = self.events
        spill = s.candidates != "near" and s.k_spill > 0 and self.profile is not None
        next_tick = 0.0
        t_list = arr.t.tolist()
        i = 0
        while i < n or events:
            t_next = t_list[i] if i < n else math.inf
            if spill and next_tick <= min(t_next, events[0][0] if events else math.inf):
                self.refresh_spill(next_tick)
                next_tick += s.probe_period_s
            elif events and events[0][0] <= t_next:
                now, kind, g, p, j = heapq.heappop(events)
                if kind == ARRIVE:
                    self.on_arrive(now, g, p, j)
                elif kind == HEADER:
                    if self.track_load:
                        self.on_header(self.gws[g], p, now)
                elif kind == FINISH:
                    e = self.gws[g].eps[p]
                    assert e is not None
                    e.in_flight -= 1
                else:
                    self.on_refused(now, g, p, j)
            else:
                self.route(i, t_next)
                i += 1
                if progress is not None and i % 2000 == 0:
                    progress.update(2000)
        return self.outcomes()

    def route(self, i: int, now: float) -> None:
        """Request i reaches its metro's gateway: pick a pool and send it there."""
        g = self.metro[i]  # metro m's clients use gateway m
        gw = self.gws[g]
        cc = self.metro_cc[g] if self.resident[i] else None
        if self.profile is None:
            # the oracle reserves its slot as it decides, so it also sees its own requests in transit
            p = self.served[i] = self.oracle_pick(g, now, self.prompt[i], cc)
            self.admit(now + gw.rtt_s[p] / 2, g, p, i)
            return
        eps = [self.endpoint(gw, q, now) for q in self.candidates(gw, cc)]
        req = RouteRequest(MODEL, prompt_chars=4 * self.prompt[i], max_tokens=self.max_tokens[i],
                           client_rtt_ms=self.client_ms[i], countries=self.reqs[cc] if cc else None)
        ranked = self.profile.route(req, eps).ranked
        if self.s.max_waiting is not None:
            self.ranked[i] = ranked[1:self.s.max_attempts]
        p = self.served[i] = self.send(gw, ranked[0])
        heapq.heappush(self.events, (now + gw.rtt_s[p] / 2, ARRIVE, g, p, i))

    def send(self, gw: GatewaySim, e: Endpoint) -> int:
        e.in_flight += 1  # as gateway/api/forward.py credits it
        e.sent_since_load += 1  # type: ignore[attr-defined]
        return self.index[e.pool_id]

    def on_arrive(self, now: float, g: int, p: int, j: int) -> None:
        pool, gw = self.pools[p], self.gws[g]
        r = gw.rtt_s[p]
        rest = self.ranked.get(j)
        if rest and pool.heap[0] > now and pool.waiting(now) >= self.s.max_waiting:  # type: ignore[operator]
            heapq.heappush(self.events, (now + r / 2, REFUSED, g, p, j))  # a 429 with the load header
            return
        self.ranked.pop(j, None)
        self.admit(now, g, p, j)

    def admit(self, now: float, g: int, p: int, j: int) -> None:
        pool = self.pools[p]
        r = self.gws[g].rtt_s[p]
        first, end = pool.admit(now, self.prompt[j], self.output[j], self.max_tokens[j])
        self.ttft[j] = self.client_ms[j] / 1000.0 + first + r / 2 - self.t_gw[j]
        if self.profile is None:
            self.slot_free[p], self.prefill_free[p] = pool.heap[0], pool.prefill_free
        else:
            heapq.heappush(self.events, (now + r / 2, HEADER, g, p, j))  # a stream's headers go out at once
            heapq.heappush(self.events, (end + r / 2, FINISH, g, p, j))

    def on_refused(self, now: float, g: int, p: int, j: int) -> None:
        """The gateway fails over to the next pool of the request's ranking (forward.py's _open)."""
        gw = self.gws[g]
        e = gw.eps[p]
        assert e is not None
        e.in_flight -= 1
        self.on_header(gw, p, now)
        self.refused[j] += 1
        nxt = self.ranked[j].pop(0)
        q = self.send(gw, nxt)
        self.served[j] = q
        heapq.heappush(self.events, (now + gw.rtt_s[q] / 2, ARRIVE, g, q, j))

    def on_header(self, gw: GatewaySim, p: int, now: float) -> None:
        """A response's load header arrives: Pool.load_from_header (LoadReport.from_header)."""
        e = gw.eps[p]
        assert e is not None
        rep = self.pools[p].report(now - gw.rtt_s[p] / 2 - 1e-9, self.mean_wait)
        # LoadReport.from_header(rep.to_header()) without the string round trip: the header carries
        # waiting, running, queued tokens, KV blocks and queue wait (4 decimals); the rates read 0
        old = e.load if self.s.header == "merge" else None
        e.load = LoadReport(rep.waiting, rep.running, rep.queued_prompt_tokens, rep.kv_blocks_used, rep.kv_blocks_total,
                            old.prefill_tps if old else 0.0, old.decode_tps if old else 0.0, round(rep.queue_wait_s, 4))
        e.load_at, e.sent_since_load = now, 0

    def outcomes(self) -> dict[str, Any]:
        m = self.arr.measured
        served = self.served[m]
        pool_cc = np.array(self.country)[served]
        client_cc = np.array(self.metro_cc)[self.arr.metro[m]]
        rtt = self.mesh.rtt_ms[self.arr.metro[m], served]
        return {"ttft_s": self.ttft[m], "cross_border": pool_cc != client_cc, "rtt_ms": rtt,
                "refused": self.refused[m] > 0}


# -- running ---------------------------------------------------------------------------------
def summarize(out: dict[str, Any], slo_s: float) -> dict[str, float]:
    t = out["ttft_s"]
    if not len(t):
        return {k: math.nan for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "goodput", "cross_border")}
    q = np.percentile(t, [50, 90, 99])
    return {"ttft_p50_s": float(q[0]), "ttft_p90_s": float(q[1]), "ttft_p99_s": float(q[2]),
            "goodput": float(np.mean(t <= slo_s)), "cross_border": float(np.mean(out["cross_border"])),
            "ttft_mean_s": float(np.mean(t)), "rtt_p50_ms": float(np.median(out["rtt_ms"])),
            "refused": float(np.mean(out["refused"])), "num_requests": int(len(t))}


Job = tuple[str, str, dict[str, Any]]  # (row name, profile, Settings overrides)
_SHARED: dict[str, Any] = {}  # the mesh and arrivals, set before worker processes fork


def _run_job(job: Job, show_progress: bool = True) -> tuple[str, dict[str, float], NDArray[np.float32], float]:
    name, policy, overrides = job
    mesh, arr, base = _SHARED["mesh"], _SHARED["arrivals"], _SHARED["settings"]
    s = dataclasses.replace(base, **overrides)
    t0 = time.perf_counter()
    sim = Simulation(mesh, arr, s, policy)
    if show_progress:
        with common.Progress(len(arr.t), f"mesh_sim {name}", unit="req") as bar:
            out = sim.run(bar)
    else:
        out = sim.run()
    return name, summarize(out, s.slo_s), out["ttft_s"].astype(np.float32), time.perf_counter() - t0


def jobs_for(policies: tuple[str, ...] = POLICIES, variants: bool = True) -> list[Job]:
    jobs: list[Job] = [(p, p, {}) for p in policies]
    return jobs + ([(v, "latency", o) for v, o in VARIANTS.items()] if variants else [])


def simulate(mesh: Mesh, s: Settings, jobs: list[Job], workers: int = 1, show_progress: bool = True
             ) -> dict[str, tuple[dict[str, float], NDArray[np.float32], float]]:
    """Run each job (a profile, or a variant of the latency profile) over the same arrivals."""
    _SHARED.update(mesh=mesh, arrivals=make_arrivals(mesh, s), settings=s)
    arr = _SHARED["arrivals"]
    log.info("mesh: %d sites, %d gateways, %d countries, %d slots; %d requests (%d measured) over a %.0f s day",
             len(mesh.sites), len(mesh.gateways), mesh.info["num_countries"], int(mesh.slots.sum()), len(arr.t),
             int(arr.measured.sum()), mesh.info["day_s"])
    results: dict[str, tuple[dict[str, float], NDArray[np.float32], float]] = {}
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            name, summary, ttft, el = _run_job(job, show_progress)
            results[name] = (summary, ttft, el)
        return results
    # fork: the children inherit the mesh and arrivals instead of unpickling them
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as ex:
        futures = [ex.submit(_run_job, job, show_progress) for job in jobs]
        for f in cf.as_completed(futures):
            name, summary, ttft, el = f.result()
            results[name] = (summary, ttft, el)
    return {j[0]: results[j[0]] for j in jobs}


# -- reporting -------------------------------------------------------------------------------
def goals(policies: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    lat, out = policies.get("latency"), {}
    if lat is None:
        return out
    if "oracle" in policies:
        v = common.ratio(lat["ttft_p99_s"], policies["oracle"]["ttft_p99_s"])
        out["latency_p99_over_oracle"] = common.goal(v, "<= 1.15", v <= 1.15)
    if "nearest" in policies:
        v = 1 - common.ratio(lat["ttft_p99_s"], policies["nearest"]["ttft_p99_s"])
        out["latency_p99_reduction_vs_nearest"] = common.goal(v, ">= 0.30", v >= 0.30)
    for base in ("least-load", "round-robin"):
        if base in policies:
            v = common.ratio(policies[base]["ttft_p50_s"], lat["ttft_p50_s"])
            out[f"{base}_p50_over_latency"] = common.goal(v, ">= 2", v >= 2)
    return out


COLUMNS = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "goodput", "cross_border", "rtt_p50_ms", "refused")


def print_results(res: dict[str, Any]) -> None:
    head = ["policy", "p50 s", "p90 s", "p99 s", f"goodput@{res['settings']['slo_s']:g}s", "cross-border",
            "rtt p50 ms", "refused"]
    common.print_table(f"TTFT over the mesh ({res['mesh']['num_sites']} sites, {res['num_requests_measured']} "
                       "requests measured)", head, [[n, *(v[c] for c in COLUMNS)] for n, v in res["policies"].items()])
    if res.get("variants"):
        common.print_table("latency profile variants (changes outside the benchmark: see VARIANTS)", head,
                           [[n, *(v[c] for c in COLUMNS)] for n, v in res["variants"].items()])
    common.print_goals(res["goals"])


def write_png(path: Path, ttfts: dict[str, NDArray[np.float32]], slo_s: float) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    q = np.linspace(0, 1, 2001)
    for name, t in ttfts.items():
        if len(t) and (name in POLICIES or name in PLOTTED_VARIANTS):
            ax.plot(np.quantile(t, q), q, "-" if name in POLICIES else "--", label=name, lw=1.2)
    ax.axvline(slo_s, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s, log)")
    ax.set_ylabel("share of requests")
    ax.set_title("mesh_sim: TTFT per routing policy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def result_dict(mesh: Mesh, s: Settings, results: dict[str, tuple[dict[str, float], Any, float]]) -> dict[str, Any]:
    pol = {n: r[0] for n, r in results.items() if n in POLICIES}
    var = {n: r[0] for n, r in results.items() if n not in POLICIES}
    measured = next(iter(results.values()))[0].get("num_requests", 0) if results else 0
    arr = _SHARED["arrivals"]
    # the parts of every TTFT that no policy changes: the client's RTT and the prefill itself
    uniform = mesh.rtt_ms[arr.metro, np.random.default_rng(s.seed).integers(0, len(mesh.sites), len(arr.t))]
    common_ms = {"client_rtt_p50_ms": float(np.median(arr.client_ms)),
                 "prefill_p50_ms": float(np.median(arr.prompt) / np.median(mesh.prefill_tps) * 1000),
                 # RTT to a pool drawn from the whole mesh: what round-robin or random would pay without
                 # the candidate step
                 "uniform_pool_rtt_p50_ms": float(np.median(uniform))}
    return {"benchmark": "mesh_sim", "settings": dataclasses.asdict(s), "calibration": dataclasses.asdict(mesh.calib),
            "mesh": {**mesh.info, **common_ms}, "num_requests_measured": measured, "policies": pol, "variants": var,
            "variant_settings": {n: VARIANTS[n] for n in var if n in VARIANTS}, "goals": goals(pol),
            "run_s": {n: round(r[2], 2) for n, r in results.items()}}


def main(argv: list[str] | None = None) -> int:
    p = common.arg_parser("mesh_sim", __doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=min(2, common.num_cpus()),
                   help="processes running policies side by side (default: min(2, CPUs))")
    p.add_argument("--no-variants", action="store_true", help="only the profiles and the oracle")
    p.add_argument("--synthetic", action="store_true", help="a made-up mesh (no ../shared data needed)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    common.setup_logging()
    s = dataclasses.replace(QUICK if args.quick else FULL, seed=args.seed)
    t0 = time.perf_counter()
    calib = engine_calibration()
    mesh = synthetic_mesh(s, calib) if args.synthetic else real_mesh(s, calib)
    if mesh is None:
        reason = f"no data at {WONDERPROXY} or {CDN_CSV} (the shared folder sits next to the repository)"
        print(f"mesh_sim: {reason}; skipped")
        common.write_json(args.json, {"benchmark": "mesh_sim", "skipped": reason, "date": common.now_iso()})
        return 0
    machine = common.machine_info()
    results = simulate(mesh, s, jobs_for(variants=not args.no_variants), workers=max(1, args.workers))
    res = {**result_dict(mesh, s, results), "quick": args.quick, "date": common.now_iso(),
           "machine": {**machine, "loadavg_1m_end": common.loadavg_1m()}, "workers": args.workers,
           "elapsed_s": time.perf_counter() - t0}
    print_results(res)
    common.write_json(args.json, res)
    png = common.png_path(args.json)
    if write_png(png, {n: r[1] for n, r in results.items()}, s.slo_s):
        log.info("wrote %s and %s", args.json, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
