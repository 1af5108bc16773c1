"""Where a profiled gateway's time went: a short text summary of a py-spy or cProfile profile.

    python -m benchmarks.profiles FILE [--requests N] [--top K]

FILE: py-spy's raw (collapsed-stack) output (`py-spy record --format raw`), or a cProfile stats
file (`python -m cProfile -o FILE`). With --requests (how many requests the process served while
profiled) cProfile times are also given per request. `python -m benchmarks.gateway_overhead
--profile py-spy|cprofile` writes such a file next to its JSON and prints this summary.

py-spy samples stacks at a fixed rate, so shares are of the time the gateway's thread was busy
(a C call, e.g. a socket send, counts for the Python function that made it). cProfile counts each
resumption of a coroutine as a call and roughly doubles the process's CPU time: use it for call
counts, py-spy for shares.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def _short(path: str) -> str:
    path = re.sub(r".*/site-packages/", "", path)
    path = re.sub(r".*/lib/python3\.\d+/", "stdlib/", path)
    return re.sub(r"^.*?/(gateway|benchmarks)/", r"\1/", path)


def _package(path: str) -> str:
    if path.startswith("stdlib/"):
        part = path.split("/")[1]
        return "asyncio" if part == "asyncio" else f"stdlib {part.removesuffix('.py')}"
    return path.split("/")[0].removesuffix(".py")


def pyspy_summary(path: Path, top: int = 25) -> dict[str, Any]:
    """Self-time shares by package and function, inclusive shares of the gateway's own functions."""
    self_fn: Counter[str] = Counter()
    self_pkg: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, n_str = line.rpartition(" ")
        n = int(n_str)
        total += n
        frames = []
        for f in stack.split(";"):
            m = _FRAME.match(f)
            fn, file = (m.group(1), _short(m.group(2))) if m else (f, "?")
            frames.append((fn, file))
        fn, file = frames[-1]
        self_fn[f"{fn} ({file})"] += n
        self_pkg[_package(file)] += n
        for key in {f"{fn} ({file})" for fn, file in frames if file.startswith("gateway/")}:
            incl[key] += n
    share = (lambda c: [(k, v / total) for k, v in c.most_common(top)]) if total else (lambda c: [])
    return {"samples": total, "self_by_package": share(self_pkg), "self_by_function": share(self_fn),
            "inclusive_gateway": share(incl)}


def cprofile_summary(path: Path, requests: int | None = None, top: int = 25) -> dict[str, Any]:
    import pstats

    st = pstats.Stats(str(path))
    rows = []
    for (file, line, fn), (_, ncalls, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, ct, ncalls, f"{fn} ({_short(file)}:{line})"))
    rows.sort(reverse=True)
    per = requests or 1
    return {"total_s": st.total_tt, "requests": requests,  # type: ignore[attr-defined]
            "by_self_time": [{"function": name, "self_us": 1e6 * tt / per, "cum_us": 1e6 * ct / per,
                              "calls": nc / per} for tt, ct, nc, name in rows[:top]]}


def summarize(path: Path, requests: int | None = None, top: int = 25) -> dict[str, Any]:
    if path.suffix == ".prof":
        return {"kind": "cprofile", **cprofile_summary(path, requests, top)}
    return {"kind": "py-spy", **pyspy_summary(path, top)}


def print_summary(s: dict[str, Any], top: int = 25) -> None:
    if s["kind"] == "py-spy":
        print(f"\npy-spy: {s['samples']} samples (shares of the gateway thread's busy time)")
        for title, key in (("self time by package", "self_by_package"), ("self time by function", "self_by_function"),
                           ("inclusive, gateway functions", "inclusive_gateway")):
            print(f"-- {title}")
            for name, frac in s[key][:top]:
                print(f"{100 * frac:6.1f}%  {name}")
        return
    unit = "per request" if s["requests"] else "total"
    print(f"\ncProfile: {s['total_s']:.2f} s profiled ({unit}; coroutine resumptions count as calls)")
    print(f"{'self us':>9} {'cum us':>9} {'calls':>7}  function")
    for r in s["by_self_time"][:top]:
        print(f"{r['self_us']:9.1f} {r['cum_us']:9.1f} {r['calls']:7.2f}  {r['function']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profiles", description=__doc__.split("\n")[0])
    p.add_argument("file", type=Path)
    p.add_argument("--requests", type=int, help="requests served while profiled (cProfile: per-request figures)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    print_summary(summarize(args.file, args.requests, args.top), args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
