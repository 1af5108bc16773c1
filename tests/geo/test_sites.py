"""geo.sites: great-circle distance, projection, and the distance prior and its fit."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from geo.sites import (
    EARTH_RADIUS_KM,
    DistancePrior,
    Pool,
    Site,
    azimuthal_equidistant_km,
    centroid_latlon,
    fit_prior,
    haversine_km,
    pairwise_km,
)

LONDON = (51.5074, -0.1278)
PARIS = (48.8566, 2.3522)
NEW_YORK = (40.7128, -74.0060)
LOS_ANGELES = (34.0522, -118.2437)
SYDNEY = (-33.8688, 151.2093)
TOKYO = (35.6762, 139.6503)


@pytest.mark.parametrize(
    "a, b, km",
    [
        # reference distances from the same city-centre coordinates (great circle, mean radius)
        (LONDON, PARIS, 343.6),
        (LONDON, NEW_YORK, 5570.2),
        (NEW_YORK, LOS_ANGELES, 3935.7),
        (SYDNEY, TOKYO, 7823.3),
    ],
)
def test_haversine_known_city_pairs(a, b, km):
    assert haversine_km(*a, *b) == pytest.approx(km, rel=2e-3)
    assert haversine_km(*b, *a) == pytest.approx(haversine_km(*a, *b))


def test_haversine_edge_cases():
    assert haversine_km(*PARIS, *PARIS) == 0.0
    assert haversine_km(0, 0, 0, 180) == pytest.approx(math.pi * EARTH_RADIUS_KM)  # antipodes
    assert haversine_km(89.9, 0, 89.9, 180) == pytest.approx(haversine_km(89.9, 0, 90, 0) * 2, rel=1e-6)
    # across the antimeridian: 2 degrees of longitude at the equator, not 358
    assert haversine_km(0, 179, 0, -179) == pytest.approx(2 * math.pi * EARTH_RADIUS_KM / 180, rel=1e-9)


def test_pairwise_matches_scalar():
    pts = [LONDON, PARIS, NEW_YORK, SYDNEY, TOKYO]
    lat, lon = zip(*pts)
    m = pairwise_km(lat, lon)
    for i, a in enumerate(pts):
        for j, b in enumerate(pts):
            assert m[i, j] == pytest.approx(haversine_km(*a, *b), abs=1e-6)


def test_azimuthal_equidistant_keeps_distance_from_centre():
    centre = LONDON
    for p in (PARIS, NEW_YORK, SYDNEY):
        xy = azimuthal_equidistant_km(p[0], p[1], *centre)
        assert float(np.hypot(*xy)) == pytest.approx(haversine_km(*centre, *p), rel=1e-9)
    assert np.allclose(azimuthal_equidistant_km(*centre, *centre), 0.0)
    # east is +x, north is +y
    assert azimuthal_equidistant_km(0, 10, 0, 0)[0] > 0 and azimuthal_equidistant_km(10, 0, 0, 0)[1] > 0


def test_centroid_handles_the_antimeridian():
    lat, lon = centroid_latlon([0, 0], [179, -179])
    assert lat == pytest.approx(0, abs=1e-9) and abs(lon) == pytest.approx(180, abs=1e-9)


def test_site_and_pool_are_frozen_slotted_and_validated():
    s = Site("fra1", "Frankfurt", "DE", 50.11, 8.68)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.lat = 0.0  # type: ignore[misc]
    assert not hasattr(s, "__dict__")
    with pytest.raises(ValueError, match="ISO-2"):
        Site("x", "X", "Germany", 0, 0)
    with pytest.raises(ValueError, match="out of range"):
        Site("x", "X", "DE", 91, 0)
    p = Pool("p1", "fra1", "http://10.0.0.1:8101", ("llama",), 8)
    assert p.site == s.id and not hasattr(p, "__dict__")


def test_prior_formula():
    prior = DistancePrior(inflation=2.0, intercept_ms=3.0)
    assert prior.rtt_ms(1000) == pytest.approx(23.0)  # 1 ms per 100 km, doubled, plus last mile
    a, b = Site("lon", "London", "GB", *LONDON), Site("par", "Paris", "FR", *PARIS)
    assert prior.rtt_between(a, b) == pytest.approx(3.0 + 2.0 * 343.6 / 100, rel=1e-3)
    assert np.allclose(prior.rtt_array([0, 1000]), [3.0, 23.0])


def _planted(inflation: float, intercept: float, n: int = 3000, noise: float = 0.05, outliers: float = 0.05):
    rng = np.random.default_rng(0)
    d = rng.uniform(50, 15000, n)
    rtt = (intercept + inflation * d / 100) * np.exp(rng.normal(0, noise, n))
    bad = rng.random(n) < outliers
    rtt[bad] *= rng.uniform(2, 6, int(bad.sum()))  # detours and congested paths
    return d, rtt


@pytest.mark.parametrize("method", ["relative", "median", "lsq"])
def test_fit_recovers_planted_inflation(method):
    d, rtt = _planted(2.3, 4.0, outliers=0.0)
    fit = fit_prior(d, rtt, method=method)
    assert fit.prior.inflation == pytest.approx(2.3, rel=0.03)
    assert fit.num_pairs == len(d) and fit.method == method
    assert fit.median_rel_err < 0.06


def test_relative_fit_shrugs_off_outliers_and_recovers_the_intercept():
    d, rtt = _planted(1.8, 6.0, outliers=0.08)
    fit = fit_prior(d, rtt)
    assert fit.prior.inflation == pytest.approx(1.8, rel=0.03)
    assert fit.prior.intercept_ms == pytest.approx(6.0, abs=1.5)
    lsq = fit_prior(d, rtt, method="lsq")
    assert abs(lsq.prior.inflation - 1.8) > abs(fit.prior.inflation - 1.8)  # least squares is pulled up


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        fit_prior([100.0, float("nan")], [5.0, 7.0])
    with pytest.raises(ValueError, match="unknown fit method"):
        fit_prior([100.0, 200.0], [5.0, 7.0], method="magic")
    fit = fit_prior([100.0, 200.0, 400.0], [2.0, 4.0, 8.0])  # exact through the origin
    assert fit.prior.inflation == pytest.approx(2.0, rel=1e-3) and fit.prior.intercept_ms >= 0
