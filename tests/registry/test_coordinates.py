"""Network coordinates through a real etcd: a gateway that probes a pool at a site whose gateway
published a coordinate moves its own, and republishes it for the others."""
from __future__ import annotations

import pytest

from geo.vivaldi import Coord, estimate_rtt
from tests.registry.harness import Gateway, Pool, gateway_config, wait_for

pytestmark = pytest.mark.etcd


async def test_gateway_publishes_the_coordinate_its_probes_moved(etcd, prefix):
    # Frankfurt's gateway probes a pool in "Paris"; Paris's gateway publishes the coordinate that
    # stands for the pool. All of it runs on loopback, a fraction of a millisecond apart, so the
    # seeds (~16 ms apart, by distance) are far off: Frankfurt's coordinate must close the gap.
    fast = {"probe_s": 0.1, "republish_s": 0.1}
    par = await Gateway(gateway_config(etcd.endpoint, prefix, site="par", **fast)).start()
    fra = await Gateway(gateway_config(etcd.endpoint, prefix, site="fra", **fast)).start()
    pool = await Pool("par-1", etcd.endpoint, prefix, site="par").start()
    assert par.server is not None and fra.server is not None and par.view is not None
    fra_id, par_id = fra.cfg.discovery.instance_id, par.cfg.discovery.instance_id
    try:
        def coords() -> tuple[Coord, Coord] | None:
            """Both as the registry carries them (Paris's view), once both are there."""
            gws = par.view.gateways  # type: ignore[union-attr]
            if fra_id not in gws or par_id not in gws or gws[fra_id].coords is None or gws[par_id].coords is None:
                return None
            return Coord.from_dict(gws[fra_id].coords), Coord.from_dict(gws[par_id].coords)

        assert await wait_for(lambda: coords() is not None, 5)
        seed_gap = estimate_rtt(*coords())  # type: ignore[misc]
        assert seed_gap > 10  # the distance prior's guess for Frankfurt-Paris
        assert await wait_for(lambda: "par" in fra.server.geo.site_coords, 5)  # type: ignore[union-attr]
        # a few probe rounds later (and a republish) the registry has the moved coordinate
        assert await wait_for(lambda: estimate_rtt(*coords()) < seed_gap / 3, 8)  # type: ignore[misc]
        # Paris's own pool is at its own site: no neighbour, so its node has not moved
        assert par.server.geo.node.error == 1.0
    finally:
        await pool.drain()
        await fra.stop()
        await par.stop()
