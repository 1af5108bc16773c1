"""How well do the RTT estimators predict pairs nobody measured?

    python -m geo.eval --sites SITES.csv --rtt RTT.csv [--k 4,8,16,32] [--json OUT] [--seed S] [--rounds R]

SITES.csv: `id,name,country,lat,lon`. RTT.csv: `source,destination,rtt_ms` (ids from SITES; both
directions are averaged, a missing direction is filled from the other). For each k, every node
probes only k peers (random by default), one per round, and each answer carries multiplicative
noise and occasional outliers (seeded). Three estimators are then scored on the pairs that neither
end probed: the distance prior (fitted on the probed links only, as a deployment would), Vivaldi
from the origin, and Vivaldi seeded from the prior. Scores: median and p90 of |est - true| / true,
and how often each node's truly nearest site is the estimator's top-1 / in its top-3 (ranked over
all other sites, so it measures the estimator alone, without the probes' own measurements).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .sites import FIT_METHODS, PriorFit, Site, centroid_latlon, fit_prior, pairwise_km
from .vivaldi import VivaldiConfig, VivaldiSystem, seed_from_prior

log = logging.getLogger("meshgate.geo.eval")
F64 = NDArray[np.float64]
METHODS = ("prior", "vivaldi", "vivaldi+prior")
GOAL_K, GOAL_MEDIAN = 16, 0.12  # the Vivaldi paper reports 0.11 on the King matrix


@dataclass(frozen=True, slots=True)
class SimSettings:
    rounds: int = 600  # probe rounds; k = 32 still gets ~19 samples per link
    noise_sigma: float = 0.1  # log-normal multiplicative jitter of each probe
    outlier_prob: float = 0.05  # probes that hit a queue or a retransmit ...
    outlier_scale: tuple[float, float] = (1.5, 5.0)  # ... and come back this many times too slow
    neighbours: str = "random"  # random | near+random (half the k nearest by great-circle distance)
    probe_period_s: float = 1.0  # simulated time per round (neighbour decay ages in seconds)


@dataclass(frozen=True, slots=True)
class Probes:
    neighbours: NDArray[np.intp]  # (N, k) whom each node probes
    slots: NDArray[np.intp]  # (R, N) which neighbour column each node probes in each round
    samples: F64  # (R, N) measured RTT in ms; NaN where the pair has no data (a lost probe)


# -- input -----------------------------------------------------------------------------------
def load_sites(path: Path) -> list[Site]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        _require_columns(path, reader.fieldnames, ("id", "name", "country", "lat", "lon"))
        sites = [Site(r["id"], r["name"], r["country"], float(r["lat"]), float(r["lon"])) for r in reader]
    if len({s.id for s in sites}) != len(sites):
        raise ValueError(f"{path}: duplicate site ids")
    return sites


def _require_columns(path: Path, header: Sequence[str] | None, needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in (header or ())]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (expected {','.join(needed)})")


def load_rtt(path: Path, ids: list[str]) -> F64:
    """Symmetric (N, N) RTT matrix in ms, NaN where unknown and on the diagonal."""
    index = {s: i for i, s in enumerate(ids)}
    n = len(ids)
    total, count = np.zeros((n, n)), np.zeros((n, n))
    skipped = 0
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        _require_columns(path, reader.fieldnames, ("source", "destination", "rtt_ms"))
        for r in reader:
            i, j = index.get(r["source"]), index.get(r["destination"])
            rtt = float(r["rtt_ms"])
            if i is None or j is None or i == j or not rtt > 0:
                skipped += 1
                continue
            total[i, j] += rtt
            count[i, j] += 1
    if skipped:
        log.info("%s: skipped %d rows (unknown ids, self pairs or non-positive RTT)", path, skipped)
    # average each direction's rows, then the two directions: a missing one is filled by the other
    one_way = np.divide(total, count, out=np.zeros((n, n)), where=count > 0)
    seen = (count > 0).astype(float)
    both = seen + seen.T
    return np.divide(one_way + one_way.T, both, out=np.full((n, n), np.nan), where=both > 0)


# -- simulation ------------------------------------------------------------------------------
def choose_neighbours(dist_km: F64, k: int, how: str, rng: np.random.Generator) -> NDArray[np.intp]:
    n = dist_km.shape[0]
    num_near = k // 2 if how == "near+random" else 0
    out = np.empty((n, k), dtype=np.intp)
    for i in range(n):
        others = np.delete(np.arange(n), i)
        near = others[np.argsort(dist_km[i, others], kind="stable")[:num_near]]
        rest = np.setdiff1d(others, near)
        out[i] = np.concatenate([near, rng.choice(rest, k - num_near, replace=False)])
    return out


def simulate_probes(truth: F64, dist_km: F64, k: int, sim: SimSettings, rng: np.random.Generator) -> Probes:
    n = truth.shape[0]
    nbrs = choose_neighbours(dist_km, k, sim.neighbours, rng)
    # Each node walks its neighbours round-robin in its own random order, as a probe loop would.
    order = np.stack([rng.permutation(k) for _ in range(n)])  # (N, k)
    slots = order[:, np.arange(sim.rounds) % k].T  # (R, N)
    true = truth[np.arange(n)[None, :], nbrs[np.arange(n)[None, :], slots]]  # (R, N)
    samples = true * np.exp(rng.normal(0.0, sim.noise_sigma, true.shape))
    spikes = rng.random(true.shape) < sim.outlier_prob
    samples[spikes] *= rng.uniform(*sim.outlier_scale, int(spikes.sum()))
    return Probes(nbrs, slots, samples)


DEFAULT_SIM = SimSettings()


def fit_on_probes(probes: Probes, dist_km: F64) -> PriorFit:
    """The prior a deployment could fit: per probed link, the median of its samples."""
    n, k = probes.neighbours.shape
    per_link = np.full((n, k), np.nan)
    for s in range(k):
        picked = np.where(probes.slots == s, probes.samples, np.nan)  # (R, N)
        seen = np.isfinite(picked).any(axis=0)
        per_link[seen, s] = np.nanmedian(picked[:, seen], axis=0)
    d = dist_km[np.arange(n)[:, None], probes.neighbours]
    return fit_prior(d.ravel(), per_link.ravel())


def run_vivaldi(
    probes: Probes, cfg: VivaldiConfig, sim: SimSettings, rng: np.random.Generator,
    pos: F64 | None = None, height: F64 | None = None, bar: Any = None,
) -> F64:
    system = VivaldiSystem(probes.neighbours, cfg, pos, height, rng)
    for r in range(probes.slots.shape[0]):
        system.observe(probes.slots[r], probes.samples[r], r * sim.probe_period_s)
        if bar is not None:
            bar.update(1)
    return system.estimate(published=True)


# -- scoring ---------------------------------------------------------------------------------
def score(est: F64, truth: F64, probed: NDArray[np.bool_]) -> tuple[dict[str, float], F64]:
    """Scores of one estimator, and the relative errors (on unprobed pairs) behind them."""
    n = truth.shape[0]
    known = np.isfinite(truth) & ~np.eye(n, dtype=bool)
    pairs = np.triu(known & ~probed, 1)
    rel = np.abs(est[pairs] - truth[pairs]) / truth[pairs]
    rows = known.any(axis=1)
    true_nearest = np.argmin(np.where(known, truth, np.inf), axis=1)[rows]
    ranked = np.argsort(np.where(known, est, np.inf), axis=1, kind="stable")[rows, :3]
    out = {
        "median_rel_err": float(np.median(rel)) if rel.size else float("nan"),
        "p90_rel_err": float(np.percentile(rel, 90)) if rel.size else float("nan"),
        "top1": float(np.mean(ranked[:, 0] == true_nearest)),
        "top3": float(np.mean((ranked == true_nearest[:, None]).any(axis=1))),
        "num_pairs": int(rel.size),
    }
    return out, rel


def evaluate_k(
    truth: F64, dist_km: F64, lat: F64, lon: F64, k: int, sim: SimSettings, cfg: VivaldiConfig, seed: int,
    bar: Any = None,
) -> tuple[dict[str, dict[str, float]], PriorFit, dict[str, F64]]:
    n = truth.shape[0]
    probes = simulate_probes(truth, dist_km, k, sim, np.random.default_rng([seed, k]))
    probed = np.zeros((n, n), dtype=bool)
    probed[np.arange(n)[:, None], probes.neighbours] = True
    probed |= probed.T
    fit = fit_on_probes(probes, dist_km)
    pos, height = seed_from_prior(lat, lon, fit.prior, centroid_latlon(list(lat), list(lon)), cfg.dim)
    estimates = {
        "prior": fit.prior.rtt_array(dist_km),
        # the same probes and the same random stream for both runs: the seed is the only difference
        "vivaldi": run_vivaldi(probes, cfg, sim, np.random.default_rng([seed, k, 1]), bar=bar),
        "vivaldi+prior": run_vivaldi(probes, cfg, sim, np.random.default_rng([seed, k, 1]), pos, height, bar),
    }
    results, errors = {}, {}
    for name in METHODS:
        results[name], errors[name] = score(estimates[name], truth, probed)
    return results, fit, errors


# -- output ----------------------------------------------------------------------------------
def fit_dict(fit: PriorFit) -> dict[str, Any]:
    return {
        "inflation": round(fit.prior.inflation, 4), "intercept_ms": round(fit.prior.intercept_ms, 3),
        "method": fit.method, "num_pairs": fit.num_pairs,
        "median_rel_err": round(fit.median_rel_err, 4), "p90_rel_err": round(fit.p90_rel_err, 4),
    }


def print_table(results: dict[str, dict[str, dict[str, float]]]) -> None:
    headers = ["k", "method", "median_rel_err", "p90_rel_err", "top1", "top3", "pairs"]
    rows = [
        [k, m, f"{r['median_rel_err']:.3f}", f"{r['p90_rel_err']:.3f}", f"{r['top1']:.3f}", f"{r['top3']:.3f}",
         str(r["num_pairs"])]
        for k, by_method in results.items() for m, r in by_method.items()
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("\nRTT estimators on pairs not probed (relative error |est - true| / true; nearest-site hit rates)")
    for line in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    sys.stdout.flush()


def write_png(path: Path, errors: dict[str, F64], k: int) -> bool:
    """CDF of relative error per method; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and CI
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no PNG")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rel in errors.items():
        xs = np.sort(rel)
        label = f"{name} (median {np.median(xs):.3f})"
        ax.step(xs, np.arange(1, xs.size + 1) / max(xs.size, 1), where="post", label=label)
    ax.axvline(GOAL_MEDIAN, color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("relative error |est - true| / true (pairs not probed)")
    ax.set_ylabel("fraction of pairs")
    ax.set_title(f"RTT estimate error, each node probing k = {k} peers")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


class _Bar:
    """A tqdm bar over all simulated rounds when stderr is a terminal; nothing otherwise (the
    per-k log lines are the progress then)."""

    def __init__(self, total: int):
        self._bar: Any = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc="vivaldi rounds", unit="round", leave=False)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# -- CLI -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m geo.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=Path, required=True, help="CSV: id,name,country,lat,lon")
    p.add_argument("--rtt", type=Path, required=True, help="CSV: source,destination,rtt_ms")
    p.add_argument("--k", default="4,8,16,32", help="peers each node probes, comma-separated")
    p.add_argument("--json", type=Path, help="write the results here (a PNG goes next to it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, help=f"probe rounds (default {DEFAULT_SIM.rounds}; --quick: 400)")
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--noise", type=float, default=DEFAULT_SIM.noise_sigma, help="log-normal sigma of probe jitter")
    p.add_argument("--outliers", type=float, default=DEFAULT_SIM.outlier_prob, help="fraction of probes 1.5-5x slow")
    p.add_argument("--neighbours", choices=["random", "near+random"], default="random")
    args = p.parse_args(argv)
    try:
        args.k = sorted({int(x) for x in args.k.split(",") if x.strip()})
    except ValueError:
        p.error(f"--k: expected comma-separated integers, got {args.k!r}")
    if not args.k or min(args.k) < 1:
        p.error("--k: need at least one k >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    try:
        sites = load_sites(args.sites)
        truth = load_rtt(args.rtt, [s.id for s in sites])
    except (OSError, ValueError) as e:
        print(f"geo.eval: {e}", file=sys.stderr)
        return 2
    n = len(sites)
    ks = [k for k in args.k if k <= n - 1]
    if n < 3 or not ks:
        print(f"geo.eval: need at least 3 sites and a k below their number; got {n} sites, k={args.k}", file=sys.stderr)
        return 2
    if len(ks) < len(args.k):
        log.warning("dropping k > %d (a node has only %d peers): %s", n - 1, n - 1, [k for k in args.k if k > n - 1])
    sim = SimSettings(rounds=args.rounds or (400 if args.quick else DEFAULT_SIM.rounds), noise_sigma=args.noise,
                      outlier_prob=args.outliers, neighbours=args.neighbours)
    cfg = VivaldiConfig()
    lat, lon = np.array([s.lat for s in sites]), np.array([s.lon for s in sites])
    dist_km = pairwise_km(lat, lon)
    iu = np.triu_indices(n, 1)
    known = np.isfinite(truth[iu])
    all_fits = {m: fit_prior(dist_km[iu][known], truth[iu][known], method=m) for m in FIT_METHODS}
    log.info("%d sites, %d known pairs", n, int(known.sum()))
    results, fits, errors = _run_all(truth, dist_km, lat, lon, ks, sim, cfg, args.seed)
    print_table(results)
    print(f"\nprior fitted on all {int(known.sum())} known pairs: rtt_ms = intercept + inflation x km / 100")
    for m, f in all_fits.items():
        print(f"  {m:9s} inflation {f.prior.inflation:.3f}  intercept {f.prior.intercept_ms:5.2f} ms  "
              f"median rel err {f.median_rel_err:.3f}  p90 {f.p90_rel_err:.3f}")
    out = _report(args, sim, cfg, (n, int(known.sum())), all_fits, fits, results, time.perf_counter() - t0)
    if args.json is not None:
        _write(args.json, out, errors)
    return 0


Results = dict[str, dict[str, dict[str, float]]]


def _run_all(
    truth: F64, dist_km: F64, lat: F64, lon: F64, ks: list[int], sim: SimSettings, cfg: VivaldiConfig, seed: int,
) -> tuple[Results, dict[str, dict[str, Any]], dict[int, dict[str, F64]]]:
    results: Results = {}
    fits: dict[str, dict[str, Any]] = {}
    errors: dict[int, dict[str, F64]] = {}
    bar = _Bar(2 * sim.rounds * len(ks))
    try:
        for k in ks:
            tk = time.perf_counter()
            results[str(k)], fit, errors[k] = evaluate_k(truth, dist_km, lat, lon, k, sim, cfg, seed, bar)
            fits[str(k)] = fit_dict(fit)
            r = results[str(k)]
            log.info("k=%d: median rel err prior %.3f, vivaldi %.3f, vivaldi+prior %.3f (%.1f s)", k,
                     r["prior"]["median_rel_err"], r["vivaldi"]["median_rel_err"],
                     r["vivaldi+prior"]["median_rel_err"], time.perf_counter() - tk)
    finally:
        bar.close()
    return results, fits, errors


def _report(
    args: argparse.Namespace, sim: SimSettings, cfg: VivaldiConfig, size: tuple[int, int],
    all_fits: dict[str, PriorFit], fits: dict[str, dict[str, Any]], results: Results, elapsed_s: float,
) -> dict[str, Any]:
    goal: dict[str, Any] = {"target": f"vivaldi median_rel_err <= {GOAL_MEDIAN} at k = {GOAL_K}"}
    if str(GOAL_K) in results:
        value = results[str(GOAL_K)]["vivaldi"]["median_rel_err"]
        goal.update(value=value, met=bool(value <= GOAL_MEDIAN))
    return {
        "settings": {
            "sites": str(args.sites), "rtt": str(args.rtt), "num_sites": size[0], "num_known_pairs": size[1],
            "seed": args.seed, **asdict(sim), "vivaldi": asdict(cfg),
        },
        # all_pairs: the estimator the eval uses (least relative L1), fitted on the whole matrix;
        # all_pairs_by_method: the other fits for comparison; probed_links_by_k: what each run used
        "prior_fit": {
            "all_pairs": fit_dict(all_fits["relative"]),
            "all_pairs_by_method": {m: fit_dict(f) for m, f in all_fits.items()},
            "probed_links_by_k": fits,
        },
        "goal": goal,
        "elapsed_s": round(elapsed_s, 2),
        "k": results,
    }


def _write(path: Path, out: dict[str, Any], errors: dict[int, dict[str, F64]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    k_plot = min(errors, key=lambda k: abs(k - GOAL_K))  # k = 16, or the nearest one evaluated
    png = path.with_suffix(".png")
    if write_png(png, errors[k_plot], k_plot):
        out["png"] = png.name
    path.write_text(json.dumps(out, indent=2) + "\n")
    log.info("wrote %s%s", path, f" and {png.name}" if "png" in out else "")


if __name__ == "__main__":
    sys.exit(main())
