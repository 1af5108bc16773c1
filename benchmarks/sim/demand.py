"""Demand: Poisson arrivals per metro, rate proportional to the metro's weight times a diurnal curve
of local solar time (trough 04:00, peak 16:00, peak/mean 1.68). One day is compressed into `day_s`
simulated seconds, so the peak sweeps westward around the globe once. A share of requests is pinned
to its own country (residency). Prompt and output lengths are log-uniform."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from benchmarks.sim.mesh import F64, SITE_JITTER_KM, Mesh
from benchmarks.sim.settings import Settings

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

