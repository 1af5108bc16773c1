"""Host overhead of an engine step, with the `null` runner (fixed logits, no model).

    python -m benchmarks.engine_host [--quick] [--json PATH] [--before REF]

What is left of Engine.step() when the model costs nothing: schedule, batch update, sampling and
output processing (detokenization included). Where the engine runs output processing apart from
the step (Engine.step_tokens, then process_outputs on the event loop), "p50/p99" is the engine's
critical path, step_tokens, and "+out" adds the output processing of the same step. "CPU" is the
engine thread's CPU time (time.thread_time) over the same steps: on a shared machine, wall time
also holds the time other processes had the core. Measured in steady decode with 64 and 256 running
sequences (prompts 32-512 tokens, log-uniform; outputs never end during the measurement), for
greedy and for seeded top-k/top-p sampling, in µs per step (p50/p99 over the measured steps).

--before REF: the same measurement of another commit (a temporary `git worktree` of REF, with this
script copied in, so only the engine differs), run side by side: before and after alternate, each in its own process,
`repeats` times, and the repeat with the median p99 is reported for each.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import common

BLOCK_SIZE = 16
SEQ_COUNTS = (64, 256)
KINDS = ("greedy", "sampled")
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class HostWorkload:
    num_steps: int = 1000
    min_prompt_tokens: int = 32
    max_prompt_tokens: int = 512
    repeats: int = 3
    seed: int = 0
    async_scheduling: str = ""  # EngineConfig.async_scheduling where the tree has it ("": its default)


FULL = HostWorkload()
QUICK = replace(FULL, num_steps=200, repeats=1)


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))


def measure(num_seqs: int, kind: str, w: HostWorkload) -> dict[str, Any]:
    """One engine with the null runner: admit num_seqs requests, run until every one decodes, then
    time w.num_steps calls of Engine.step()."""
    import torch

    from gateway.config import EngineConfig, ModelConfig, TinyModelConfig
    from gateway.worker.engine import Engine
    from gateway.worker.request import Request, SamplingParams

    torch.set_num_threads(1)
    rng = random.Random(w.seed)
    max_len = w.max_prompt_tokens + w.num_steps + 4 * BLOCK_SIZE
    blocks_per_seq = -(-max_len // BLOCK_SIZE)
    extra: dict[str, Any] = {}
    if w.async_scheduling and "async_scheduling" in EngineConfig.__dataclass_fields__:
        extra["async_scheduling"] = w.async_scheduling
    cfg = EngineConfig(
        runner="null", block_size=BLOCK_SIZE, num_blocks=num_seqs * blocks_per_seq + 64,
        max_num_seqs=num_seqs, max_num_batched_tokens=8192, max_model_len=blocks_per_seq * BLOCK_SIZE,
        num_threads=1, **extra,
    )
    engine = Engine(ModelConfig(tiny=TinyModelConfig(train_steps=0)), cfg)
    if hasattr(engine, "finish_stopped"):  # this tree's warm_up is the serving set-up (gc.freeze)
        engine.warm_up(64)
    vocab = engine.tokenizer.vocab_size
    for i in range(num_seqs):
        n = _log_uniform(rng, w.min_prompt_tokens, w.max_prompt_tokens)
        if kind == "greedy":
            params = SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=10**6, temperature=0.8, top_p=0.95, top_k=50, seed=i,
                                    ignore_eos=True)
        engine.add_request(Request(f"h{i}", [rng.randrange(1, vocab) for _ in range(n)], params))
    while engine.scheduler.waiting or any(not r.output_token_ids for r in engine.scheduler.running):
        engine.step()
    for _ in range(20):  # warm: first decode steps pay one-off allocations
        engine.step()
    gc.collect()
    wall_us: list[float] = []
    cpu_us: list[float] = []  # this thread's CPU time: what the step costs, whatever else runs
    out_wall_us: list[float] = []
    out_cpu_us: list[float] = []
    split = hasattr(engine, "step_tokens")  # output processing apart from the step (off its path)
    clock, cpu = time.perf_counter, time.thread_time
    for _ in range(w.num_steps):
        t0, c0 = clock(), cpu()
        if split:
            events = engine.step_tokens()
            t1, c1 = clock(), cpu()
            outs, _ = engine.process_outputs(events)
            out_wall_us.append(1e6 * (clock() - t1))
            out_cpu_us.append(1e6 * (cpu() - c1))
        else:
            outs = engine.step()
            t1, c1 = clock(), cpu()
        wall_us.append(1e6 * (t1 - t0))
        cpu_us.append(1e6 * (c1 - c0))
        # (asynchronous scheduling delivers a step's tokens one call later: still one per sequence)
        assert len(outs) == num_seqs, "a sequence stalled or ended during the measurement"
    pct = common.percentile
    res = {"num_seqs": num_seqs, "kind": kind, "num_steps": len(wall_us), "outputs_off_path": split}
    for name, step, extra in (("", wall_us, out_wall_us), ("cpu_", cpu_us, out_cpu_us)):
        total = [a + b for a, b in zip(step, extra)] if extra else step
        res.update({
            f"{name}p50_us": pct(step, 50), f"{name}p99_us": pct(step, 99),
            # the step with its output processing, wherever that runs (the host's whole cost)
            f"{name}with_outputs_p50_us": pct(total, 50), f"{name}with_outputs_p99_us": pct(total, 99),
        })
    return res


def measure_all(w: HostWorkload) -> list[dict[str, Any]]:
    return [measure(n, k, w) for n in SEQ_COUNTS for k in KINDS]


def _run_child(src: Path, w: HostWorkload) -> list[dict[str, Any]]:
    """measure_all in a fresh process on the tree at src."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "benchmarks.engine_host", "--child", f.name,
               "--steps", str(w.num_steps)]
        if w.async_scheduling:
            cmd += ["--async-scheduling", w.async_scheduling]
        env = {**os.environ, "PYTHONPATH": str(src)}
        subprocess.run(cmd, cwd=src, env=env, check=True, timeout=1800)
        rows: list[dict[str, Any]] = json.loads(Path(f.name).read_text())
        return rows


def side_by_side(w: HostWorkload, before_ref: str | None) -> dict[str, Any]:
    """Rows for 'after' (this tree) and, when before_ref is given, 'before' (that commit), measured
    alternately in fresh processes; per row the repeat with the median p99."""
    trees: dict[str, Path] = {"after": ROOT}
    tmp: tempfile.TemporaryDirectory[str] | None = None
    commit = None
    if before_ref:
        tmp = tempfile.TemporaryDirectory(prefix="meshgate-before-")
        wt = Path(tmp.name) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(wt), before_ref], cwd=ROOT, check=True,
                       capture_output=True)
        # The same harness measures both trees: only the engine under it differs.
        shutil.copy(Path(__file__), wt / "benchmarks" / "engine_host.py")
        commit = subprocess.run(["git", "rev-parse", "--short", before_ref], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout.strip()
        trees = {"before": wt, "after": ROOT}
    try:
        runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in trees}
        for _ in range(w.repeats):
            for name, src in trees.items():
                runs[name].append(_run_child(src, w))
    finally:
        if tmp is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(Path(tmp.name) / "tree")], cwd=ROOT,
                           capture_output=True, check=False)  # best effort: the folder goes anyway
            tmp.cleanup()
    rows = []
    for name, reps in runs.items():
        for i in range(len(reps[0])):
            cands = sorted((rep[i] for rep in reps), key=lambda r: r["p99_us"])
            rows.append({**cands[len(cands) // 2], "tree": name,
                         "p99_us_runs": [r["p99_us"] for r in cands]})
    return {"before_ref": before_ref, "before_commit": commit, "rows": rows}


def goals(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for r in res["rows"]:
        if r["tree"] != "after":
            continue
        limit = 200.0 if r["num_seqs"] == 64 else 1000.0
        out[f"host_step_p99_us_{r['num_seqs']}_{r['kind']}"] = common.goal(
            r["p99_us"], f"<= {limit:.0f}", r["p99_us"] <= limit)
    return out


def print_report(res: dict[str, Any]) -> None:
    rows = [[r["tree"], r["num_seqs"], r["kind"], r["p50_us"], r["p99_us"], r["with_outputs_p50_us"],
             r["with_outputs_p99_us"], r["cpu_p50_us"], r["cpu_p99_us"], r["cpu_with_outputs_p99_us"],
             " / ".join(f"{x:.0f}" for x in r["p99_us_runs"])] for r in res["rows"]]
    before = f" (before = {res['before_commit']})" if res.get("before_commit") else ""
    common.print_table(f"host µs per engine step, null runner, steady decode{before}",
                       ["tree", "seqs", "sampling", "p50 µs", "p99 µs", "+out p50", "+out p99",
                        "CPU p50", "CPU p99", "CPU+out p99", "p99 of runs"], rows)
    if res["goals"]:
        common.print_goals(res["goals"])


def plot(res: dict[str, Any], path: Path) -> None:
    """Bars per (running seqs, sampling): p50 and p99 of wall and CPU time, before and after."""
    plt = common.pyplot()
    if plt is None:
        return
    cases = [(n, k) for n in SEQ_COUNTS for k in KINDS]
    trees = [t for t in ("before", "after") if any(r["tree"] == t for r in res["rows"])]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, prefix, title in ((axes[0], "", "wall time (the machine's other load included)"),
                              (axes[1], "cpu_", "engine thread CPU time")):
        width = 0.8 / (2 * len(trees))
        for j, tree in enumerate(trees):
            rows = {(r["num_seqs"], r["kind"]): r for r in res["rows"] if r["tree"] == tree}
            for q, (stat, alpha) in enumerate((("p50_us", 1.0), ("p99_us", 0.5))):
                xs = [i + (2 * j + q) * width for i in range(len(cases))]
                ax.bar(xs, [rows[c][prefix + stat] / 1e3 for c in cases], width, alpha=alpha,
                       color="tab:gray" if tree == "before" else "tab:blue", label=f"{tree} {stat[:3]}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], [f"{n} {k}" for n, k in cases])
        ax.set_yscale("log")
        ax.set_ylabel("ms per step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"host cost of an engine step, null runner ({res['machine']['cpu']}, {res['date'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.arg_parser("engine_host", __doc__.split("\n")[0])
    p.add_argument("--before", help="a git ref to measure side by side (default: this tree only)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--async-scheduling", choices=("auto", "on", "off"),
                   help="engine.async_scheduling for trees that have it (default: the tree's default)")
    args = p.parse_args(argv)
    w = QUICK if args.quick else FULL
    if args.steps:
        w = replace(w, num_steps=args.steps)
    if args.async_scheduling:
        w = replace(w, async_scheduling=args.async_scheduling)
    if args.child:  # one measurement of the tree this process imports
        Path(args.child).write_text(json.dumps(measure_all(w)))
        return {}
    common.setup_logging()
    machine = common.machine_info()
    res: dict[str, Any] = {"benchmark": "engine_host", "machine": machine, "date": common.now_iso(),
                           "quick": bool(args.quick), "workload": asdict(w), **side_by_side(w, args.before)}
    res["goals"] = goals(res)
    print_report(res)
    out = common.write_json(args.json, res)
    png = common.png_path(out)
    plot(res, png)
    print(f"\nwrote {out} and {png}")
    return res


if __name__ == "__main__":
    main()
