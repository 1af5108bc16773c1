"""The RTT estimators (geo.eval) on WonderProxy's 246-city all-pairs ping matrix (July 2020).

    python -m benchmarks.wonderproxy [--out DIR] [--json PATH] [--quick] [--stat avg|min] [--k 4,8,16,32]

Converts ../shared/data/rtt/wonderproxy-2020 (format in its SOURCE.md) into geo.eval's
SITES.csv + RTT.csv, in a temporary folder (or --out DIR, kept), then runs geo.eval on it and writes
benchmarks/results/geo_eval.json and .png. The data is not ours to redistribute: it is read from the
shared folder next to the repository and never copied into it.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from geo import eval as geo_eval

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "rtt" / "wonderproxy-2020"
SERVERS = "servers-2020-07-19.csv"
PINGS = "pings-2020-07-19-2020-07-20-grouped.csv"
RESULTS = ROOT / "benchmarks" / "results" / "geo_eval.json"
log = logging.getLogger("meshgate.bench.wonderproxy")

# The server list names countries in English; Site wants ISO 3166-1 alpha-2 (Kosovo: XK, the code
# the EU and most registries use while ISO has assigned none).
ISO2 = {
    "Albania": "AL", "Algeria": "DZ", "Argentina": "AR", "Australia": "AU", "Austria": "AT", "Bangladesh": "BD",
    "Belgium": "BE", "Brazil": "BR", "Bulgaria": "BG", "Cambodia": "KH", "Canada": "CA", "Chile": "CL",
    "China": "CN", "Colombia": "CO", "Costa Rica": "CR", "Croatia": "HR", "Cyprus": "CY", "Czech Republic": "CZ",
    "Denmark": "DK", "Ecuador": "EC", "Egypt": "EG", "Estonia": "EE", "Finland": "FI", "France": "FR",
    "Georgia": "GE", "Germany": "DE", "Ghana": "GH", "Greece": "GR", "Guatemala": "GT", "Honduras": "HN",
    "Hong Kong": "HK", "Hungary": "HU", "Iceland": "IS", "India": "IN", "Indonesia": "ID", "Ireland": "IE",
    "Isle of Man": "IM", "Israel": "IL", "Italy": "IT", "Japan": "JP", "Kazakhstan": "KZ", "Kenya": "KE",
    "Kosovo": "XK", "Latvia": "LV", "Lebanon": "LB", "Lithuania": "LT", "Luxembourg": "LU", "Malaysia": "MY",
    "Malta": "MT", "Mexico": "MX", "Moldova": "MD", "Morocco": "MA", "Netherlands": "NL", "New Zealand": "NZ",
    "Nigeria": "NG", "Norway": "NO", "Pakistan": "PK", "Panama": "PA", "Peru": "PE", "Philippines": "PH",
    "Poland": "PL", "Portugal": "PT", "Puerto Rico": "PR", "Romania": "RO", "Russia": "RU", "Saudi Arabia": "SA",
    "Serbia": "RS", "Singapore": "SG", "Slovakia": "SK", "Slovenia": "SI", "South Africa": "ZA",
    "South Korea": "KR", "Spain": "ES", "Suriname": "SR", "Sweden": "SE", "Switzerland": "CH", "Taiwan": "TW",
    "Tanzania": "TZ", "Thailand": "TH", "Tunisia": "TN", "Turkey": "TR", "Uganda": "UG", "Ukraine": "UA",
    "United Arab Emirates": "AE", "United Kingdom": "GB", "United States": "US", "Uruguay": "UY",
    "Venezuela": "VE", "Vietnam": "VN",
}


def convert(data: Path, out: Path, stat: str = "avg") -> dict[str, Any]:
    """Write out/SITES.csv and out/RTT.csv; returns counts for the report."""
    out.mkdir(parents=True, exist_ok=True)
    with (data / SERVERS).open(newline="") as f:
        servers = list(csv.DictReader(f))  # the trailing unnamed columns (sm86's) are ignored
    ids, unknown = set(), set()
    with (out / "SITES.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "name", "country", "lat", "lon"])
        for s in servers:
            code = ISO2.get(s["country"])
            if code is None:
                unknown.add(s["country"])
                code = "ZZ"  # ISO's "unknown or unspecified" user-assigned code
            w.writerow([s["id"], s["title"] or s["name"], code, s["latitude"], s["longitude"]])
            ids.add(s["id"])
    if unknown:
        log.warning("countries without an ISO-2 code here (written as ZZ): %s", sorted(unknown))
    kept = dropped = 0
    with (data / PINGS).open(newline="") as f, (out / "RTT.csv").open("w", newline="") as g:
        w = csv.writer(g)
        w.writerow(["source", "destination", "rtt_ms"])
        for r in csv.DictReader(f):
            # ids 292-295 have no server entry (no coordinates); self-pings carry no path
            if r["source"] not in ids or r["destination"] not in ids or r["source"] == r["destination"]:
                dropped += 1
                continue
            w.writerow([r["source"], r["destination"], r[stat]])
            kept += 1
    return {"num_sites": len(ids), "directed_rows": kept, "dropped_rows": dropped, "rtt_stat": stat}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wonderproxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="keep SITES.csv and RTT.csv here (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=RESULTS, help=f"default {RESULTS.relative_to(ROOT)}")
    p.add_argument("--quick", action="store_true", help="fewer Vivaldi rounds (under a minute on 2 cores either way)")
    p.add_argument("--stat", choices=["avg", "min"], default="avg",
                   help="which per-pair statistic is the truth: avg is what requests see, min the path floor")
    p.add_argument("--k", default="4,8,16,32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int)
    p.add_argument("--neighbours", choices=["random", "near+random"], default="random")
    p.add_argument("--data", type=Path, default=DATA, help=argparse.SUPPRESS)  # tests point it elsewhere
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if not (args.data / SERVERS).is_file() or not (args.data / PINGS).is_file():
        print(f"wonderproxy: no data at {args.data} (the shared folder sits next to the repository); skipped",
              file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory(prefix="meshgate-wonderproxy-") as tmp:
        folder = args.out or Path(tmp)
        counts = convert(args.data, folder, args.stat)
        log.info("converted %d sites, %d directed pairs into %s", counts["num_sites"], counts["directed_rows"], folder)
        eval_args = ["--sites", str(folder / "SITES.csv"), "--rtt", str(folder / "RTT.csv"), "--k", args.k,
                     "--seed", str(args.seed), "--json", str(args.json), "--neighbours", args.neighbours]
        eval_args += ["--rounds", str(args.rounds)] if args.rounds else []
        eval_args += ["--quick"] if args.quick else []
        rc = geo_eval.main(eval_args)
    if rc == 0:
        # name the data rather than a temporary path that no longer exists
        out = json.loads(args.json.read_text())
        out["settings"]["sites"] = out["settings"]["rtt"] = f"{DATA.name} (converted)"
        out["data"] = {"source": "WonderProxy 2020-07-19/20 via sm86/geo-latency-data@0ab28d0", **counts}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
