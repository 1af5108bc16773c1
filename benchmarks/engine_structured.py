"""The structured-output rows of benchmarks.engine: output tok/s with a JSON schema vs without,
the same requests side by side (in-process Engine, tiny model, CPU).

Each request of the engine workload's continuous mode runs three ways, interleaved over repeats on
fresh engines: free (greedy, ignore_eos), and under a JSON schema the output cannot finish within
max_tokens (so every run decodes exactly max_tokens, all of them under the mask) — an array of
integers and an array of strings. The median run of each is reported; the goal compares the
schema rows with the free one (>= 0.8x).

    python -m benchmarks.engine_structured [--quick]    (also run by python -m benchmarks.engine)
"""
from __future__ import annotations

import time
from typing import Any

from benchmarks.common import Progress
from gateway.config import EngineConfig, ModelConfig
from gateway.worker.engine import Engine
from gateway.worker.request import Request, SamplingParams

SCHEMAS: dict[str, dict[str, Any]] = {
    "json-schema-ints": {"type": "object", "properties": {"values": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 4096}},
        "required": ["values"], "additionalProperties": False},
    "json-schema-strings": {"type": "object", "properties": {"notes": {
        "type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 4096}},
        "required": ["notes"], "additionalProperties": False},
}
KINDS = ("free", *SCHEMAS)


def run_kind(engine: Engine, specs: list[tuple[list[int], int]], kind: str, grammar: Any, desc: str) -> dict[str, Any]:
    reqs = [Request(f"{desc}-{i}", list(p), SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                           grammar=grammar))
            for i, (p, n) in enumerate(specs)]
    processing = _time_processing(engine)
    with Progress(sum(n for _, n in specs), desc, unit="tok") as bar:
        t0, c0 = time.monotonic(), time.process_time()
        for r in reqs:
            engine.add_request(r)
        while engine.has_work():
            bar.update(len(engine.step()))
        elapsed, cpu = time.monotonic() - t0, time.process_time() - c0
    assert all(len(r.output_token_ids) == r.params.max_tokens for r in reqs)
    tokens = sum(len(r.output_token_ids) for r in reqs)
    if grammar is not None:  # the outputs really are under the schema: a valid prefix of it
        text = engine.tokenizer.decode(reqs[0].output_token_ids)
        assert text.startswith('{"values":[' if kind.endswith("ints") else '{"notes":['), text[:40]
    return {"output_tok_s": tokens / elapsed, "elapsed_s": elapsed, "tokens": tokens,
            "output_tok_per_cpu_s": tokens / cpu, "cpu_s": cpu, "logit_processing_s": processing[0],
            "logit_processing_share": processing[0] / elapsed, "logit_processing_cpu_s": processing[1],
            "logit_processing_cpu_share": processing[1] / cpu}


def _time_processing(engine: Engine) -> list[float]:
    """Wraps the engine's logit processing (masks, penalties: process + accept) to add up its
    time: [wall s, CPU s]."""
    total = [0.0, 0.0]
    proc, acc = engine.logits.process, engine.logits.accept

    def process(*a: Any) -> Any:
        t, c = time.perf_counter(), time.process_time()
        try:
            return proc(*a)
        finally:
            total[0] += time.perf_counter() - t
            total[1] += time.process_time() - c

    def accept(*a: Any) -> Any:
        t, c = time.perf_counter(), time.process_time()
        try:
            return acc(*a)
        finally:
            total[0] += time.perf_counter() - t
            total[1] += time.process_time() - c

    engine.logits.process, engine.logits.accept = process, accept  # type: ignore[method-assign]
    return total


def workload(specs: list[tuple[list[int], int]], repeats: int, quick: bool) -> tuple[list[tuple[list[int], int]], int]:
    """The requests and repeats of these rows: the engine workload's; --quick: its first 12
    requests, 3 repeats (pairs need more than one)."""
    return (specs[:12], 3) if quick else (specs, max(repeats, 3))


def bench_structured(model_cfg: ModelConfig, cfg: EngineConfig, specs: list[tuple[list[int], int]],
                     repeats: int, make_engine: Any) -> dict[str, Any]:
    """make_engine(): a fresh warmed-up Engine (benchmarks.engine.new_engine)."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for rep in range(repeats):
        for kind in KINDS:
            engine = make_engine()
            grammar = None
            if kind != "free":
                grammar = engine.grammars.for_request({"type": "json_schema", "schema": SCHEMAS[kind]}, (),
                                                      "none", None)
            runs[kind].append(run_kind(engine, specs, kind, grammar, f"{kind} {rep + 1}/{repeats}"))
    out: dict[str, Any] = {}
    for kind in KINDS:
        ordered = sorted(runs[kind], key=lambda r: r["output_tok_s"])
        out[kind] = {**ordered[len(ordered) // 2], "output_tok_s_runs": [r["output_tok_s"] for r in runs[kind]],
                     "output_tok_per_cpu_s_median": _median([r["output_tok_per_cpu_s"] for r in runs[kind]]),
                     "logit_processing_cpu_share_median": _median([r["logit_processing_cpu_share"] for r in runs[kind]])}
    for kind in SCHEMAS:
        # Paired: each repeat's schema run against the free run just before it, then the median
        # ratio (a burst of other work on a shared machine hits one repeat, not the comparison).
        out[kind]["vs_free_runs"] = [r["output_tok_s"] / f["output_tok_s"] for r, f in zip(runs[kind], runs["free"])]
        out[kind]["vs_free"] = _median(out[kind]["vs_free_runs"])
        # Per CPU-second of this process: wall time also counts other work's turns on the cores;
        # CPU time counts only what these requests cost.
        out[kind]["vs_free_cpu"] = _median([r["output_tok_per_cpu_s"] / f["output_tok_per_cpu_s"]
                                            for r, f in zip(runs[kind], runs["free"])])
    return out


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks import common
    from benchmarks import engine as eb

    p = common.arg_parser("engine_structured", __doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=max(common.num_cpus() - 1, 1))
    args = p.parse_args(argv)
    common.setup_logging()
    import torch

    torch.set_num_threads(args.threads)
    w = eb.QUICK if args.quick else eb.FULL
    model_cfg = eb.ModelConfig(tiny=eb.TinyModelConfig(train_steps=0))
    cfg = eb.engine_config(w, args.threads)
    specs, repeats = workload(eb.make_specs(w, eb.TinyModelConfig().vocab_size), w.repeats, args.quick)
    res = {"benchmark": "engine_structured", "machine": common.machine_info(), "date": common.now_iso(),
           "quick": bool(args.quick), "num_requests": len(specs), "repeats": repeats,
           "structured": bench_structured(model_cfg, cfg, specs, repeats, lambda: eb.new_engine(model_cfg, cfg, w))}
    print_rows(res["structured"])
    print(f"\nwrote {common.write_json(args.json, res)}")
    return res


def print_rows(s: dict[str, Any]) -> None:
    from benchmarks import common

    common.print_table("structured outputs: the same requests, free vs under a JSON schema (median run)",
                       ["decoding", "out tok/s", "vs free", "tok/s range", "tok/CPU-s", "vs free (CPU)",
                        "logit proc % CPU"],
                       [[k, s[k]["output_tok_s"], s[k].get("vs_free", 1.0),
                         "-".join(f"{x:.0f}" for x in (min(s[k]["output_tok_s_runs"]), max(s[k]["output_tok_s_runs"]))),
                         s[k]["output_tok_per_cpu_s_median"], s[k].get("vs_free_cpu", 1.0),
                         100 * s[k]["logit_processing_cpu_share_median"]]
                        for k in KINDS])


if __name__ == "__main__":
    main()
