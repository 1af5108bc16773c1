"""Helpers every benchmark shares: the CLI shape, machine facts, percentiles, a printed table,
the JSON and PNG outputs, and progress (a tqdm bar on a terminal, plain log lines otherwise).

Benchmarks run as `python -m benchmarks.NAME [--quick] [--json PATH]` (DESIGN.md §8): they print
a table and write JSON holding the figures the table prints, with a PNG next to the JSON.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

log = logging.getLogger("meshgate.bench")


# -- CLI ------------------------------------------------------------------------------------
def arg_parser(name: str, description: str) -> argparse.ArgumentParser:
    """A parser with the flags every benchmark takes: --quick and --json PATH."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    p.add_argument("--quick", action="store_true", help="a scaled-down run (under a minute on 2 cores)")
    p.add_argument(
        "--json",
        type=Path,
        default=RESULTS_DIR / f"{name}.json",
        help=f"where to write the results (default benchmarks/results/{name}.json; a PNG goes next to it)",
    )
    return p


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )


def num_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# -- facts and statistics -------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "num_cpus": num_cpus(),
        # Other work on the machine skews timings; the 1-minute load average says how much.
        "loadavg_1m": loadavg_1m(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # an edge gateway installs without torch
        pass
    return info


def loadavg_1m() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation, as numpy's default; NaN when empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


# -- output ---------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:,.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 3) -> None:
    """A plain-text table on stdout: first column left-aligned, the others right-aligned."""
    cells = [[fmt(v, digits) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))

    print(f"\n{title}")
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print(line(r))
    sys.stdout.flush()


def goal(value: float, target: str, met: bool) -> dict[str, Any]:
    """One entry of a benchmark's "goals" map: the figure, the target as text, whether it is met."""
    return {"value": value, "target": target, "met": bool(met)}


def print_goals(goals: dict[str, dict[str, Any]], title: str = "goals") -> None:
    print_table(title, ["goal", "value", "target", "met"], [[k, g["value"], g["target"], g["met"]] for k, g in goals.items()])


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    return path


def png_path(json_path: Path) -> Path:
    return json_path.with_suffix(".png")


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed); None when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install -e .[dev]): no PNG")
        return None
    return plt


def plot_cdf(ax: Any, values: Sequence[float], label: str, color: str | None = None) -> None:
    """An empirical CDF as a step line on a matplotlib axis."""
    xs = sorted(values)
    ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label, color=color)


# -- progress -------------------------------------------------------------------------------
class Progress:
    """`with Progress(total, "what") as p: p.update(n)` — a tqdm bar when stderr is a terminal,
    otherwise a log line at each 10% (at most one a second) and at least every 10 s."""

    LOG_EVERY_S = 10.0
    MIN_GAP_S = 1.0

    def __init__(self, total: int, desc: str, unit: str = "it"):
        self.total = max(total, 1)
        self.desc = desc
        self.unit = unit
        self.n = 0
        self._bar: Any = None
        self._t0 = time.perf_counter()
        self._last_log = self._t0
        self._next_pct = 10

    def __enter__(self) -> Progress:
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, leave=False)
        else:
            log.info("%s: start (%d %s)", self.desc, self.total, self.unit)
        return self

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        pct = 100 * self.n // self.total
        since = now - self._last_log
        if (pct >= self._next_pct and since >= self.MIN_GAP_S) or since >= self.LOG_EVERY_S:
            if pct < 100:
                log.info("%s: %d%% (%d/%d %s, %.1f s)", self.desc, pct, self.n, self.total, self.unit, now - self._t0)
            self._next_pct = (pct // 10 + 1) * 10
            self._last_log = now

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.close()
        if exc_type is None:
            log.info("%s: done in %.1f s", self.desc, time.perf_counter() - self._t0)
