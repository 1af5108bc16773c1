"""Regenerate land.json, the dashboard's world outline, from Natural Earth's 1:110m countries.

Natural Earth is public domain. Its 110m admin-0 countries ship as `naturalearth_lowres` inside the
geopandas 0.14 wheel (dropped in 1.0), which this reads without installing geopandas:

    pip download geopandas==0.14.4 --no-deps -d /tmp/ne && cd /tmp/ne && unzip -o geopandas-*.whl
    python gateway/api/static/make_land.py /tmp/ne/geopandas/datasets/naturalearth_lowres/naturalearth_lowres.shp

Output: {"source": ..., "rings": [[lon0, lat0, lon1, lat1, ...], ...]} in tenths of a degree
(integers), each ring simplified (Douglas-Peucker, 0.12 degree) and tiny islands dropped.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

TOLERANCE_DEG = 0.12
MIN_POINTS = 4


def read_rings(shp: Path) -> list[list[tuple[float, float]]]:
    """Polygon rings of an ESRI shapefile (shape types 5 and 15), as (lon, lat) lists."""
    data = shp.read_bytes()
    pos, rings = 100, []
    while pos + 8 <= len(data):
        _, length = struct.unpack(">ii", data[pos:pos + 8])
        rec = data[pos + 8:pos + 8 + 2 * length]
        pos += 8 + 2 * length
        (kind,) = struct.unpack("<i", rec[:4])
        if kind not in (5, 15):
            continue
        num_parts, num_points = struct.unpack("<ii", rec[36:44])
        parts = list(struct.unpack(f"<{num_parts}i", rec[44:44 + 4 * num_parts])) + [num_points]
        base = 44 + 4 * num_parts
        pts = [struct.unpack("<dd", rec[base + 16 * i:base + 16 * i + 16]) for i in range(num_points)]
        rings += [pts[a:b] for a, b in zip(parts, parts[1:])]
    return rings


def simplify(pts: list[tuple[float, float]], tol: float) -> list[tuple[float, float]]:
    """Douglas-Peucker, iterative."""
    if len(pts) < 3:
        return pts
    keep = [False] * len(pts)
    keep[0] = keep[-1] = True
    stack = [(0, len(pts) - 1)]
    while stack:
        a, b = stack.pop()
        (x1, y1), (x2, y2) = pts[a], pts[b]
        dx, dy = x2 - x1, y2 - y1
        norm = (dx * dx + dy * dy) ** 0.5
        best, idx = 0.0, -1
        for i in range(a + 1, b):
            x, y = pts[i]
            d = abs(dy * (x - x1) - dx * (y - y1)) / norm if norm else ((x - x1) ** 2 + (y - y1) ** 2) ** 0.5
            if d > best:
                best, idx = d, i
        if best > tol and idx > 0:
            keep[idx] = True
            stack += [(a, idx), (idx, b)]
    return [p for p, k in zip(pts, keep) if k]


def main(shp: str, out: str = str(Path(__file__).with_name("land.json"))) -> None:
    rings = []
    for ring in read_rings(Path(shp)):
        # Split the closed ring in two halves so DP has distinct end points.
        half = len(ring) // 2
        pts = simplify(ring[:half + 1], TOLERANCE_DEG)[:-1] + simplify(ring[half:], TOLERANCE_DEG)
        flat: list[int] = []
        for lon, lat in pts:
            q = [round(lon * 10), round(lat * 10)]
            if flat[-2:] != q:
                flat += q
        if len(flat) >= 2 * MIN_POINTS:
            rings.append(flat)
    doc = {"source": "Natural Earth 1:110m admin-0 countries (public domain), simplified; units 0.1 degree",
           "rings": rings}
    Path(out).write_text(json.dumps(doc, separators=(",", ":")))
    print(f"{out}: {len(rings)} rings, {sum(len(r) for r in rings) // 2} points, {Path(out).stat().st_size} bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
