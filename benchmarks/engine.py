"""Engine benchmark: continuous vs static batching vs one request at a time, on the tiny model.

    python -m benchmarks.engine [--quick] [--json PATH]

Drives gateway.worker.engine.Engine in-process (add_request/step, no HTTP) on CPU with a seeded
offline workload (every request arrives at t=0; random prompt ids; greedy; ignore_eos), in three
modes that share one code path — requests are fed to a fresh engine in groups, and the next group
is added only when the engine has no work left:

  continuous         one group of all requests: the engine batches them as it is built to,
  static             groups of max_num_seqs, as classic static batching runs them (HF generate,
                     FasterTransformer): every member decodes until the batch's longest output is
                     done (only its own tokens count as output) and the batch answers together,
  static-early-exit  the same groups, but a member leaves the batch when its own output is done
                     (a kinder baseline: the batch still waits for its longest member),
  sequential         groups of one.

Continuous and static share max_num_seqs (the static batch size); it is a quarter of the requests
(32 of 128) so static batching runs four batches: with one batch of all of them the two are the same
schedule. Each mode runs `repeats` times, interleaved, on a fresh engine; the run with the median
throughput is reported (the machine may be shared). Torch uses CPUs - 1 threads by default: with
every core busy, a core taken by other work stalls OpenMP's spinning threads (measured 10x slower).

TTFT and TPOT count from t=0 (Request.arrival_s is set to the mode's start) with the engine's own
timestamps (Request.first_token_s, finish_s). Also measured: scheduler + batch-building time per
step at 256 running sequences (Scheduler + BlockManager + BatchState, no model), prefix-cache
TTFT of a cold request against warm ones that share its 512-token prefix, and the host-overhead
table of benchmarks.engine_host (whole engine steps with the null runner; --host-before REF adds
another commit side by side).
"""
from __future__ import annotations

import argparse
import gc
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from benchmarks import common, engine_host
from benchmarks.common import Progress, percentile, ratio
from benchmarks.engine_structured import SCHEMAS, bench_structured
from benchmarks.engine_structured import workload as structured_workload
from benchmarks.engine_structured import print_rows as print_structured
from gateway.config import EngineConfig, ModelConfig, TinyModelConfig
from gateway.worker.batch_state import BatchState
from gateway.worker.engine import Engine
from gateway.worker.kv_cache import BlockManager
from gateway.worker.request import Request, SamplingParams
from gateway.worker.scheduler import Scheduler, SchedulerConfig

MODES = ("continuous", "static", "static-early-exit", "sequential")
BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class Workload:
    num_requests: int = 128
    min_prompt_tokens: int = 32
    max_prompt_tokens: int = 512
    min_output_tokens: int = 8
    max_output_tokens: int = 256
    distribution: str = "log-uniform"
    # Shared by continuous and static (the static batch size). Below num_requests on purpose: with
    # a single batch, static batching and continuous batching are the same schedule.
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512  # EngineConfig's default
    seed: int = 0
    repeats: int = 3  # each mode runs this many times, interleaved; the median run is reported
    # scheduler micro-benchmark and prefix cache
    sched_num_running: int = 256
    sched_num_steps: int = 300
    prefix_tokens: int = 512
    suffix_tokens: int = 32
    prefix_rounds: int = 5
    prefix_warm_per_round: int = 8


FULL = Workload()
QUICK = replace(
    FULL, num_requests=32, max_prompt_tokens=256, max_output_tokens=128, max_num_seqs=8, repeats=1,
    sched_num_steps=100, prefix_rounds=3, prefix_warm_per_round=4,
)


# -- workload -------------------------------------------------------------------------------
def log_uniform_int(rng: random.Random, lo: int, hi: int) -> int:
    return min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))


def make_specs(w: Workload, vocab_size: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) per request, the same in every mode."""
    rng = random.Random(w.seed)
    specs = []
    for _ in range(w.num_requests):
        n_prompt = log_uniform_int(rng, w.min_prompt_tokens, w.max_prompt_tokens)
        n_out = log_uniform_int(rng, w.min_output_tokens, w.max_output_tokens)
        specs.append(([rng.randrange(vocab_size) for _ in range(n_prompt)], n_out))
    return specs


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


# -- engines --------------------------------------------------------------------------------
def engine_config(w: Workload, threads: int) -> EngineConfig:
    max_len = max(w.max_prompt_tokens + w.max_output_tokens, w.prefix_tokens + w.suffix_tokens + 8)
    blocks_per_seq = -(-max_len // BLOCK_SIZE)
    return EngineConfig(
        block_size=BLOCK_SIZE,
        num_blocks=w.max_num_seqs * blocks_per_seq + 4 * blocks_per_seq,  # never preempts
        max_num_seqs=w.max_num_seqs,
        max_num_batched_tokens=w.max_num_batched_tokens,
        max_model_len=blocks_per_seq * BLOCK_SIZE,
        num_threads=threads,
    )


def new_engine(model_cfg: ModelConfig, cfg: EngineConfig, w: Workload, largest: bool = False) -> Engine:
    """A fresh engine (empty prefix cache), warmed up so that first-call costs are not measured.

    largest: warm up with the workload's largest shapes (max_num_seqs sequences of the longest
    context). glibc serves big temporaries (the decode K/V gather is max_num_seqs x max context)
    with mmap until a free raises its dynamic mmap threshold; until then each step page-faults
    (measured: ~2,000 minor faults per step, ~30% more CPU time). Done once per process, before
    any mode is timed, so the first mode does not pay it alone; a long-running worker is past it."""
    gc.collect()
    engine = Engine(model_cfg, cfg)
    rng = random.Random(w.seed + 1)
    vocab = engine.tokenizer.vocab_size
    if largest:
        lengths = [w.max_prompt_tokens + w.max_output_tokens - 4] * w.max_num_seqs
    else:
        lengths = [48, 200, 16, 16]
    for i, n in enumerate(lengths):
        engine.add_request(Request(f"warmup-{i}", [rng.randrange(vocab) for _ in range(n)], greedy(4)))
    if largest:
        with Progress(4 * len(lengths), "warm-up", unit="tok") as bar:
            while engine.has_work():
                bar.update(len(engine.step()))
    while engine.has_work():
        engine.step()
    return engine


# -- the three batching modes ---------------------------------------------------------------
@dataclass(slots=True)
class ModeRun:
    requests: list[Request]
    useful: list[int]  # output tokens each request asked for (static padding computes more)
    t0: float
    t1: float
    num_steps: int


def run_mode(engine: Engine, specs: list[tuple[list[int], int]], group_size: int, desc: str,
             pad_to_longest: bool = False) -> ModeRun:
    """All requests arrive at t0; they enter the engine group_size at a time, each group once the
    engine has drained the last. pad_to_longest: every member of a group generates the group's
    longest output (static batching)."""
    reqs: list[Request] = []
    for g in range(0, len(specs), group_size):
        group = specs[g : g + group_size]
        longest = max(n for _, n in group)
        reqs += [Request(f"{desc}-{g + i}", list(p), greedy(longest if pad_to_longest else n))
                 for i, (p, n) in enumerate(group)]
    num_steps = 0
    with Progress(sum(r.params.max_tokens for r in reqs), desc, unit="tok") as bar:
        t0 = time.monotonic()
        for r in reqs:
            r.arrival_s = t0
        for g in range(0, len(reqs), group_size):
            for r in reqs[g : g + group_size]:
                engine.add_request(r)
            while engine.has_work():
                bar.update(len(engine.step()))
                num_steps += 1
        t1 = time.monotonic()
    assert all(r.finished and len(r.output_token_ids) == r.params.max_tokens for r in reqs)
    return ModeRun(reqs, [n for _, n in specs], t0, t1, num_steps)


def ttfts(run: ModeRun) -> list[float]:
    return [r.first_token_s - r.arrival_s for r in run.requests]  # type: ignore[operator]


def tpots(run: ModeRun) -> list[float]:
    """Per request: (answer time - first token) / (its own output tokens - 1)."""
    return [
        (r.finish_s - r.first_token_s) / (n - 1)  # type: ignore[operator]
        for r, n in zip(run.requests, run.useful)
        if n > 1
    ]


def output_tok_s(run: ModeRun) -> float:
    return sum(run.useful) / (run.t1 - run.t0)


def median_run(runs: list[ModeRun]) -> ModeRun:
    """The repeat with the median throughput: its latencies are reported with it."""
    return sorted(runs, key=output_tok_s)[len(runs) // 2]


def summarize(run: ModeRun) -> dict[str, Any]:
    elapsed = run.t1 - run.t0
    out_tokens = sum(run.useful)
    ttft, tpot = ttfts(run), tpots(run)
    return {
        "output_tok_s": out_tokens / elapsed,
        "req_s": len(run.requests) / elapsed,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p99_s": percentile(tpot, 99),
        "elapsed_s": elapsed,
        "num_output_tokens": out_tokens,
        "num_steps": run.num_steps,
        "num_preemptions": sum(r.num_preemptions for r in run.requests),
    }


# -- scheduler + batch building, no model ---------------------------------------------------
def bench_scheduler(w: Workload) -> dict[str, Any]:
    """Time schedule() + batch preparation (BatchState.prepare, what the engine runs) + the update
    the engine runs (BatchState.advance_pending/resolve, Scheduler.update_counts/accept_tokens) per
    decode step with sched_num_running sequences running (prompts from the workload's
    distribution, fake sampled tokens)."""
    n = w.sched_num_running
    rng = random.Random(w.seed + 2)
    vocab = TinyModelConfig().vocab_size
    lengths = [log_uniform_int(rng, w.min_prompt_tokens, w.max_prompt_tokens) for _ in range(n)]
    max_len = max(lengths) + w.sched_num_steps + 2 * BLOCK_SIZE  # no sequence ends by length
    kv = BlockManager(n * -(-max_len // BLOCK_SIZE) + 64, BLOCK_SIZE, enable_prefix_caching=True)
    # A budget that takes every prompt in the first step: a decode-only step (what is measured)
    # does the same work under any budget >= n, and the set-up takes one step, not hundreds.
    sched = Scheduler(SchedulerConfig(n, sum(lengths) + n, max_len + BLOCK_SIZE), kv)
    state = BatchState(n, max_len + BLOCK_SIZE, BLOCK_SIZE, "cpu", sum(lengths) + n)
    for i, k in enumerate(lengths):
        sched.add(Request(f"s{i}", [rng.randrange(vocab) for _ in range(k)], greedy(10**6)))
    fake = [rng.randrange(vocab) for _ in range(4096)]
    t_sched: list[float] = []
    t_batch: list[float] = []
    t_update: list[float] = []
    step = 0
    gc.collect()
    with Progress(w.sched_num_steps, "scheduler", unit="step") as bar:
        while len(t_sched) < w.sched_num_steps:
            a = time.perf_counter()
            out = sched.schedule()
            b = time.perf_counter()
            assert out and len(sched.requests) == n, "a sequence ended or stalled before the measurement"
            batch = state.prepare(out)  # the engine's batch path (persistent rows)
            c = time.perf_counter()
            tokens = [fake[(step + j) % len(fake)] for j in range(len(batch.sampling))]
            ids = torch.tensor(tokens)  # the sampler's output
            d = time.perf_counter()
            gen, srows = state.advance_pending(batch, ids)
            skipped, ended = sched.update_counts(out, batch.sampling)
            state.resolve(gen, srows, ids.numpy())
            sched.accept_tokens(batch.sampling, tokens, skipped, ended)
            e = time.perf_counter()
            step += 1
            if len(sched.running) == n and batch.num_decodes == n:  # steady decode: measure
                t_sched.append(b - a)
                t_batch.append(c - b)
                t_update.append(e - d)
                bar.update()
    total_ms = [1e3 * (x + y + z) for x, y, z in zip(t_sched, t_batch, t_update)]
    return {
        "p50": percentile(total_ms, 50),
        "p99": percentile(total_ms, 99),
        "num_running": n,
        "num_steps": len(total_ms),
        "schedule_p50": percentile([1e3 * x for x in t_sched], 50),
        "build_batch_p50": percentile([1e3 * x for x in t_batch], 50),
        "update_p50": percentile([1e3 * x for x in t_update], 50),
    }


# -- prefix cache ---------------------------------------------------------------------------
def ttft_alone(engine: Engine, req: Request) -> float:
    """Run one request by itself until its first token; seconds from add_request."""
    req.arrival_s = time.monotonic()
    engine.add_request(req)
    while engine.has_work():
        engine.step()
    assert req.first_token_s is not None
    return req.first_token_s - req.arrival_s


def bench_prefix_cache(engine: Engine, w: Workload) -> dict[str, Any]:
    """Per round: a new random prefix; one cold request (prefix + suffix), then warm requests with
    the same prefix and other suffixes, one at a time."""
    rng = random.Random(w.seed + 3)
    vocab = engine.tokenizer.vocab_size

    def tokens(k: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(k)]

    cold: list[float] = []
    warm: list[float] = []
    cached: list[int] = []
    rounds = w.prefix_rounds
    with Progress(rounds * (1 + w.prefix_warm_per_round), "prefix cache", unit="req") as bar:
        for i in range(rounds):
            prefix = tokens(w.prefix_tokens)
            cold.append(ttft_alone(engine, Request(f"cold-{i}", prefix + tokens(w.suffix_tokens), greedy(1))))
            bar.update()
            for j in range(w.prefix_warm_per_round):
                req = Request(f"warm-{i}-{j}", prefix + tokens(w.suffix_tokens), greedy(1))
                warm.append(ttft_alone(engine, req))
                cached.append(req.num_cached_tokens)
                bar.update()
    cold_s, warm_s = percentile(cold, 50), percentile(warm, 50)
    return {
        "cold_ttft_s": cold_s,
        "warm_ttft_s": warm_s,
        "ratio": ratio(cold_s, warm_s),
        "prefix_tokens": w.prefix_tokens,
        "suffix_tokens": w.suffix_tokens,
        "num_cold": len(cold),
        "num_warm": len(warm),
        "warm_cached_tokens_min": min(cached),
    }


# -- report ---------------------------------------------------------------------------------
def goals(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    r, sched, prefix = res["ratios"], res["scheduler_step_ms"], res["prefix_cache"]
    cs, cq, ttft = (
        r["continuous_vs_static_tok_s"], r["continuous_vs_sequential_tok_s"], r["static_vs_continuous_ttft_p50"]
    )
    return {
        "continuous_vs_static_tok_s": common.goal(cs, ">= 2", cs >= 2),
        "continuous_vs_sequential_tok_s": common.goal(cq, ">= 5", cq >= 5),
        "ttft_p50_static_vs_continuous": common.goal(ttft, "> 1", ttft > 1),
        "scheduler_step_ms_p50": common.goal(sched["p50"], "< 1", sched["p50"] < 1),
        "scheduler_step_ms_p99": common.goal(sched["p99"], "< 1", sched["p99"] < 1),
        "prefix_cache_cold_vs_warm_ttft": common.goal(prefix["ratio"], ">= 3", prefix["ratio"] >= 3),
        "json_schema_vs_free_tok_s": common.goal(
            worst := min(res["structured"][k]["vs_free"] for k in SCHEMAS), ">= 0.8", worst >= 0.8),
        "json_schema_vs_free_tok_per_cpu_s": common.goal(
            worst_cpu := min(res["structured"][k]["vs_free_cpu"] for k in SCHEMAS), ">= 0.8", worst_cpu >= 0.8),
    }


def print_report(res: dict[str, Any]) -> None:
    w = res["workload"]
    title = (
        f"engine: {w['num_requests']} requests, prompt {w['min_prompt_tokens']}-{w['max_prompt_tokens']}, "
        f"output {w['min_output_tokens']}-{w['max_output_tokens']} tokens ({w['distribution']}), "
        f"max_num_seqs={w['max_num_seqs']}, max_num_batched_tokens={w['max_num_batched_tokens']}, "
        f"{res['machine']['torch_threads']} torch threads"
    )
    rows = []
    for name in MODES:
        m = res["modes"][name]
        rows.append([
            name, m["output_tok_s"], m["req_s"], 1e3 * m["ttft_p50_s"], 1e3 * m["ttft_p99_s"],
            1e3 * m["tpot_p50_s"], 1e3 * m["tpot_p99_s"], m["num_steps"], m["elapsed_s"],
            "-".join(f"{x:.0f}" for x in (min(m["output_tok_s_runs"]), max(m["output_tok_s_runs"]))),
        ])
    common.print_table(
        title + f" (median of {w['repeats']} runs)",
        ["mode", "out tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "steps", "time s",
         "tok/s range"],
        rows,
    )
    s, p = res["scheduler_step_ms"], res["prefix_cache"]
    common.print_table(
        "scheduler + batch state + update per step (no model) and prefix cache",
        ["measure", "value"],
        [
            [f"sched step p50 ms ({s['num_running']} running)", s["p50"]],
            [f"sched step p99 ms ({s['num_running']} running)", s["p99"]],
            ["  schedule / prepare batch / update p50 ms",
             f"{s['schedule_p50']:.3f} / {s['build_batch_p50']:.3f} / {s['update_p50']:.3f}"],
            [f"cold TTFT ms ({p['prefix_tokens']}+{p['suffix_tokens']} tokens)", 1e3 * p["cold_ttft_s"]],
            [f"warm TTFT ms ({p['warm_cached_tokens_min']} cached)", 1e3 * p["warm_ttft_s"]],
        ],
    )
    print_structured(res["structured"])
    common.print_goals(res["goals"])


def plot(res: dict[str, Any], runs: dict[str, ModeRun], path: Any) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = dict(zip(MODES, ("tab:blue", "tab:orange", "tab:olive", "tab:gray")))
    tok_s = [res["modes"][m]["output_tok_s"] for m in MODES]
    bars = axes[0].bar(MODES, tok_s, color=[colors[m] for m in MODES])
    axes[0].bar_label(bars, fmt="%.0f")
    axes[0].set_ylim(top=1.15 * max(tok_s))
    axes[0].set_ylabel("output tokens/s")
    axes[0].set_title("throughput (all requests at t=0)")
    for ax, values, label in ((axes[1], ttfts, "TTFT (s, from t=0)"), (axes[2], tpots, "TPOT (ms)")):
        for m in MODES:
            xs = values(runs[m])
            common.plot_cdf(ax, [1e3 * x for x in xs] if label.startswith("TPOT") else xs, m, colors[m])
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].set_xscale("log")
    axes[1].set_title("time to first token")
    axes[2].set_title("time per output token")
    w = res["workload"]
    fig.suptitle(
        f"meshgate engine, tiny model on CPU: {w['num_requests']} requests, "
        f"max_num_seqs={w['max_num_seqs']} ({res['machine']['cpu']}, {res['date'][:10]})", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.arg_parser("engine", __doc__.split("\n")[0])
    p.add_argument(
        "--threads",
        type=int,
        default=max(common.num_cpus() - 1, 1),
        help="torch intra-op threads (default: CPUs - 1, so a busy core cannot stall OpenMP's spinning threads)",
    )
    p.add_argument("--max-num-seqs", type=int, help="override the batch size shared by continuous and static")
    p.add_argument("--max-num-batched-tokens", type=int, help="override the engine's token budget per step")
    p.add_argument("--host-before", help="a git ref whose host overhead is measured side by side (benchmarks.engine_host)")
    args: argparse.Namespace = p.parse_args(argv)
    common.setup_logging()
    w = QUICK if args.quick else FULL
    if args.max_num_seqs:
        w = replace(w, max_num_seqs=args.max_num_seqs)
    if args.max_num_batched_tokens:
        w = replace(w, max_num_batched_tokens=args.max_num_batched_tokens)
    torch.set_num_threads(args.threads)
    machine = common.machine_info()  # before the runs: the load average is other work's
    model_cfg = ModelConfig(tiny=TinyModelConfig(train_steps=0))  # weights don't change speed
    cfg = engine_config(w, args.threads)

    specs = make_specs(w, TinyModelConfig().vocab_size)
    group_sizes = {"continuous": len(specs), "static": w.max_num_seqs, "static-early-exit": w.max_num_seqs,
                   "sequential": 1}
    all_runs: dict[str, list[ModeRun]] = {m: [] for m in MODES}
    new_engine(model_cfg, cfg, w, largest=True)  # for its warm-up only
    for rep in range(w.repeats):  # interleaved, so a burst of other work hits every mode alike
        for mode in MODES:
            desc = f"{mode} {rep + 1}/{w.repeats}"
            all_runs[mode].append(run_mode(new_engine(model_cfg, cfg, w), specs, group_sizes[mode], desc,
                                           pad_to_longest=mode == "static"))
    sched = bench_scheduler(w)
    prefix = bench_prefix_cache(new_engine(model_cfg, cfg, w), w)
    hw = engine_host.QUICK if args.quick else engine_host.FULL
    host = engine_host.side_by_side(hw, args.host_before)
    # continuous mode's requests, free vs under a JSON schema (benchmarks/engine_structured.py)
    structured = bench_structured(model_cfg, cfg, *structured_workload(specs, w.repeats, bool(args.quick)),
                                  lambda: new_engine(model_cfg, cfg, w))

    runs = {m: median_run(all_runs[m]) for m in MODES}
    modes = {m: {**summarize(runs[m]), "output_tok_s_runs": [output_tok_s(r) for r in all_runs[m]]} for m in MODES}
    res: dict[str, Any] = {
        "benchmark": "engine",
        "machine": {**machine, "loadavg_1m_end": common.loadavg_1m()},
        "date": common.now_iso(),
        "quick": bool(args.quick),
        "workload": asdict(w),
        "engine_config": asdict(cfg),
        "modes": modes,
        "ratios": {
            "continuous_vs_static_tok_s": ratio(modes["continuous"]["output_tok_s"], modes["static"]["output_tok_s"]),
            "continuous_vs_sequential_tok_s": ratio(
                modes["continuous"]["output_tok_s"], modes["sequential"]["output_tok_s"]
            ),
            "static_vs_continuous_ttft_p50": ratio(modes["static"]["ttft_p50_s"], modes["continuous"]["ttft_p50_s"]),
            "continuous_vs_static_early_exit_tok_s": ratio(
                modes["continuous"]["output_tok_s"], modes["static-early-exit"]["output_tok_s"]),
        },
        "scheduler_step_ms": sched,
        "prefix_cache": prefix,
        "host_overhead": host,
        "structured": structured,
    }
    res["goals"] = {**goals(res), **engine_host.goals(host)}
    print_report(res)
    engine_host.print_report({**host, "goals": {}})
    out = common.write_json(args.json, res)
    png = common.png_path(out)
    plot(res, runs, png)
    print(f"\nwrote {out} and {png}")
    return res


if __name__ == "__main__":
    main()
