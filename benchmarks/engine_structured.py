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
    with Progress(sum(n for _, n in specs), desc, unit="tok") as bar:
        t0 = time.monotonic()
        for r in reqs:
            engine.add_request(r)
        while engine.has_work():
            bar.update(len(engine.step()))
        elapsed = time.monotonic() - t0
    assert all(len(r.output_token_ids) == r.params.max_tokens for r in reqs)
    tokens = sum(len(r.output_token_ids) for r in reqs)
    if grammar is not None:  # the outputs really are under the schema: a valid prefix of it
        text = engine.tokenizer.decode(reqs[0].output_token_ids)
        assert text.startswith('{"values":[' if kind.endswith("ints") else '{"notes":['), text[:40]
    return {"output_tok_s": tokens / elapsed, "elapsed_s": elapsed, "tokens": tokens}


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
        out[kind] = {**ordered[len(ordered) // 2], "output_tok_s_runs": [r["output_tok_s"] for r in runs[kind]]}
    free = out["free"]["output_tok_s"]
    for kind in SCHEMAS:
        out[kind]["vs_free"] = out[kind]["output_tok_s"] / free
    return out


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
    specs = eb.make_specs(w, eb.TinyModelConfig().vocab_size)
    res = {"benchmark": "engine_structured", "machine": common.machine_info(), "date": common.now_iso(),
           "quick": bool(args.quick), "num_requests": len(specs), "repeats": w.repeats,
           "structured": bench_structured(model_cfg, cfg, specs, w.repeats, lambda: eb.new_engine(model_cfg, cfg, w))}
    print_rows(res["structured"])
    print(f"\nwrote {common.write_json(args.json, res)}")
    return res


def print_rows(s: dict[str, Any]) -> None:
    from benchmarks import common

    common.print_table("structured outputs: the same requests, free vs under a JSON schema (median run)",
                       ["decoding", "out tok/s", "vs free", "tok/s range"],
                       [[k, s[k]["output_tok_s"], s[k].get("vs_free", 1.0),
                         "-".join(f"{x:.0f}" for x in (min(s[k]["output_tok_s_runs"]), max(s[k]["output_tok_s_runs"])))]
                        for k in KINDS])


if __name__ == "__main__":
    main()
