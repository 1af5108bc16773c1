"""geo.vivaldi: convergence on a synthetic metric space, robustness to noise and outliers thanks
to the filters, serialisation, and the node and the vectorised system agreeing."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from geo.sites import DistancePrior, haversine_km
from geo.vivaldi import (
    Coord,
    VivaldiConfig,
    VivaldiNode,
    VivaldiSystem,
    estimate_matrix,
    estimate_rtt,
    seed_coord,
    seed_from_prior,
)


def plane_with_heights(n: int, seed: int = 0) -> np.ndarray:
    """True RTTs (N, N) of points in a 200 x 200 ms plane, each with a 1-10 ms access link."""
    rng = np.random.default_rng(seed)
    return estimate_matrix(rng.uniform(0, 200, (n, 2)), rng.uniform(1, 10, n))


def simulate(truth, k=10, rounds=1500, noise=0.0, outliers=0.0, seed=0, **cfg):
    n = truth.shape[0]
    rng = np.random.default_rng(seed)
    nbrs = np.stack([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    system = VivaldiSystem(nbrs, VivaldiConfig(**cfg), rng=np.random.default_rng(seed + 1))
    rows = np.arange(n)
    for r in range(rounds):
        slot = rng.integers(0, k, n)
        rtt = truth[rows, nbrs[rows, slot]] * np.exp(rng.normal(0, noise, n))
        spike = rng.random(n) < outliers
        rtt[spike] *= rng.uniform(2, 5, int(spike.sum()))  # a queue or a retransmit
        system.observe(slot, rtt, float(r))
    iu = np.triu_indices(n, 1)
    rel = np.abs(system.estimate()[iu] - truth[iu]) / truth[iu]
    return float(np.median(rel)), system


def test_converges_on_a_plane_with_heights():
    median, system = simulate(plane_with_heights(60))
    assert median < 0.04
    assert np.median(system.error) < 0.1  # the nodes know they are right


def test_filters_handle_noise_and_outliers():
    truth = plane_with_heights(60)
    noisy = {"noise": 0.05, "outliers": 0.1}
    filtered, _ = simulate(truth, **noisy)
    raw, _ = simulate(truth, **noisy, filter_window=1)  # no latency filter: every spike pulls
    assert filtered < 0.08
    assert filtered < 0.8 * raw


def test_original_vivaldi_also_converges():
    median, _ = simulate(plane_with_heights(40), k=8, neighbour_decay=False, relative_weights=False)
    assert median < 0.05


def test_coord_round_trip_and_estimate():
    c = Coord((12.3456789, -4.5), 3.25, 0.2)
    wire = json.loads(json.dumps(c.to_dict()))
    back = Coord.from_dict(wire)
    assert back.vec == pytest.approx(c.vec, abs=1e-3) and back.height_ms == pytest.approx(3.25)
    assert back.error == pytest.approx(0.2)
    assert len(json.dumps(c.to_dict())) < 60  # small enough to ride along with a registry entry
    other = Coord((15.0, -0.5), 1.0)
    assert estimate_rtt(back, other) == pytest.approx(math.hypot(15 - 12.346, 4.0) + 4.25, abs=1e-3)
    for bad in ({"v": [1, 2]}, {"v": [1, "x"], "h": 1}, {"v": [1, 2], "h": -1}, {"v": [1, float("nan")], "h": 1}):
        with pytest.raises(ValueError):
            Coord.from_dict(bad)
    with pytest.raises(ValueError, match="dimensions"):
        estimate_rtt(Coord((1.0,), 0), Coord((1.0, 2.0), 0))


def test_node_converges_in_a_small_mesh():
    truth = plane_with_heights(12, seed=3)
    nodes = [VivaldiNode(rng_seed=i) for i in range(12)]
    rng = np.random.default_rng(0)
    for t in range(600):
        for i, node in enumerate(nodes):
            j = int(rng.integers(0, 11))
            j += j >= i
            peer = nodes[j].coord
            node.update(f"n{j}", peer, peer.error, float(truth[i, j]), now_s=float(t))
    errs = [abs(estimate_rtt(nodes[i].app_coord, nodes[j].app_coord) - truth[i, j]) / truth[i, j]
            for i in range(12) for j in range(i + 1, 12)]
    assert np.median(errs) < 0.05
    assert nodes[0].filtered_rtt("n1") == pytest.approx(truth[0, 1])


def test_node_and_system_agree():
    """The same samples in the same order move a VivaldiNode and a VivaldiSystem row alike."""
    truth = plane_with_heights(6, seed=5)
    rng = np.random.default_rng(1)
    start = rng.uniform(0, 50, (6, 2))  # distinct: no random tie-breaking involved
    cfg = VivaldiConfig()
    nbrs = np.array([[j for j in range(6) if j != i] for i in range(6)])
    system = VivaldiSystem(nbrs, cfg, pos=start.copy(), height=np.full(6, 1.0))
    nodes = [VivaldiNode(cfg, seed=Coord(tuple(start[i]), 1.0, cfg.error_init)) for i in range(6)]
    for t in range(30):
        slot = rng.integers(0, 5, 6)
        before = [n.coord for n in nodes]  # everyone acts on what peers sent before this round
        for i, node in enumerate(nodes):
            j = int(nbrs[i, slot[i]])
            node.update(str(j), before[j], None, float(truth[i, j]), now_s=float(t))
        system.observe(slot, truth[np.arange(6), nbrs[np.arange(6), slot]], float(t))
    for i, node in enumerate(nodes):
        assert node.coord.vec == pytest.approx(tuple(system.pos[i]), abs=1e-9)
        assert node.coord.height_ms == pytest.approx(system.height[i], abs=1e-9)
        assert node.error == pytest.approx(system.error[i], abs=1e-12)
        assert node.app_coord.vec == pytest.approx(tuple(system.app_pos[i]), abs=1e-9)


def test_node_ignores_lost_probes_and_forgets_stale_neighbours():
    cfg = VivaldiConfig(neighbour_max_age_s=10.0, max_neighbours=3)
    node = VivaldiNode(cfg, rng_seed=0)
    peer = Coord((10.0, 0.0), 1.0, 0.5)
    node.update("a", peer, None, float("nan"), now_s=0.0)
    node.update("a", peer, None, -3.0, now_s=0.0)
    assert node.filtered_rtt("a") is None and node.coord.vec == (0.0, 0.0)
    node.update("a", peer, None, 20.0, now_s=0.0)
    node.update("b", peer, None, 20.0, now_s=20.0)  # a is 20 s old now: forgotten
    assert node.filtered_rtt("a") is None and node.filtered_rtt("b") == 20.0
    for i, p in enumerate("cde"):
        node.update(p, peer, None, 20.0, now_s=21.0 + i)
    assert node.filtered_rtt("b") is None  # the least recently heard goes past max_neighbours
    with pytest.raises(ValueError, match="dim"):
        node.update("x", Coord((1.0, 2.0, 3.0), 1.0), None, 5.0, now_s=30.0)


def test_latency_filter_takes_the_median_of_the_last_samples():
    node = VivaldiNode(VivaldiConfig(filter_window=4), rng_seed=0)
    peer = Coord((10.0, 0.0), 1.0, 0.5)
    for t, rtt in enumerate([20.0, 21.0, 400.0, 19.0]):  # one spike
        node.update("p", peer, None, rtt, now_s=float(t))
    assert node.filtered_rtt("p") == pytest.approx(20.5)
    for t, rtt in enumerate([30.0, 30.0, 30.0]):  # the old samples roll out of the window
        node.update("p", peer, None, rtt, now_s=10.0 + t)
    assert node.filtered_rtt("p") == pytest.approx(30.0)


def test_update_filter_holds_the_published_coordinate_until_it_moves_enough():
    node = VivaldiNode(VivaldiConfig(update_threshold=0.5, update_window=4), seed=Coord((0.0, 0.0), 1.0, 0.01))
    far = Coord((100.0, 0.0), 1.0, 1.0)
    node.update("p", far, None, 102.0, now_s=0.0)  # already right: the spring is slack
    published = node.app_coord
    for t in range(5):
        node.update("p", far, None, 102.5, now_s=1.0 + t)  # tiny tension: small moves
    assert node.coord.vec != published.vec  # the system coordinate moved ...
    assert node.app_coord.vec == published.vec  # ... but by far less than half the nearest RTT


def test_seeding_from_the_prior_reproduces_it_near_the_centre():
    prior = DistancePrior(inflation=2.0, intercept_ms=4.0)
    centre = (50.0, 10.0)
    a, b = seed_coord(50.5, 9.0, prior, centre), seed_coord(48.0, 11.0, prior, centre)
    expected = prior.rtt_ms(haversine_km(50.5, 9.0, 48.0, 11.0))
    assert estimate_rtt(a, b) == pytest.approx(expected, rel=0.02)
    pos, height = seed_from_prior(np.array([50.0, 51.0]), np.array([10.0, 12.0]), prior, centre, dim=3)
    assert pos.shape == (2, 3) and np.all(height == 2.0)
    assert np.all(pos[:, 2] != 0) and pos[0, 2] != pos[1, 2]  # the third axis is not flat
