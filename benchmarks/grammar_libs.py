"""Grammar libraries for constrained decoding, side by side on this worker's tokenizer: the time
to compile a JSON schema and to fill a batch's token bitmask per step (how gateway/worker/logits.py
uses them). Libraries not installed are skipped (only xgrammar is a dependency; the others:
`pip install llguidance outlines-core`).

    python -m benchmarks.grammar_libs [--quick] [--json PATH]
"""
from __future__ import annotations

import json
import random
import statistics
import time
from typing import Any

import torch

from benchmarks import common
from gateway.config import ModelConfig
from gateway.worker.engine import model_folder
from gateway.worker.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}, "ok": {"type": "boolean"}},
    "required": ["name", "age", "tags", "ok"], "additionalProperties": False}


def allowed(row: torch.Tensor, vocab: int) -> list[int]:
    return ((row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab].nonzero().flatten().tolist()


def run_xgrammar(tok: Tokenizer, batch: int, steps: int) -> dict[str, Any]:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    v = tok.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tok._tok), vocab_size=v,
                                              stop_token_ids=[tok.eos_token_id])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t0 = time.perf_counter()
    g = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - t0
    ms = [xgr.GrammarMatcher(g) for _ in range(batch)]
    bm = xgr.allocate_token_bitmask(batch, v)
    return {"compile_ms": 1e3 * compile_s, **_drive(ms, bm, v, tok.eos_token_id, steps,
            fill=lambda: [m.fill_next_token_bitmask(bm, i) for i, m in enumerate(ms) if not m.is_terminated()],
            accept=lambda m, t: m.accept_token(t), done=lambda m: m.is_terminated())}


def run_llguidance(tok: Tokenizer, batch: int, steps: int) -> dict[str, Any]:
    import llguidance
    import llguidance.torch as lt

    v = tok.vocab_size
    lltok = llguidance.LLTokenizer(tok._tok.to_str(), n_vocab=v, eos_token=tok.eos_token_id)
    t0 = time.perf_counter()
    g = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    ms = [llguidance.LLMatcher(lltok, g) for _ in range(batch)]
    compile_s = time.perf_counter() - t0
    bm = lt.allocate_token_bitmask(batch, v)
    return {"compile_ms": 1e3 * compile_s, **_drive(ms, bm, v, tok.eos_token_id, steps,
            fill=lambda: [lt.fill_next_token_bitmask(m, bm, i) for i, m in enumerate(ms) if not m.is_stopped()],
            accept=lambda m, t: m.consume_token(t), done=lambda m: m.is_stopped())}


def _drive(ms: list[Any], bm: torch.Tensor, vocab: int, eos: int, steps: int, fill: Any, accept: Any,
           done: Any) -> dict[str, Any]:
    """Random walks through the grammar (seeded), timing each step's bitmask fill for the batch."""
    rng = random.Random(0)
    times = []
    for _ in range(steps):
        if all(done(m) for m in ms):
            break
        t = time.perf_counter()
        fill()
        times.append(time.perf_counter() - t)
        for i, m in enumerate(ms):
            if done(m):
                continue
            ok = allowed(bm[i], vocab)
            pick = rng.choice(ok)
            if len(ok) > 1 and pick == eos:
                pick = rng.choice([x for x in ok if x != eos])
            accept(m, pick)
    step = statistics.median(times)
    return {"fill_us_per_step": 1e6 * step, "fill_us_per_seq": 1e6 * step / len(ms), "steps": len(times)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.arg_parser("grammar_libs", __doc__.split("\n")[0])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tok = Tokenizer(model_folder(ModelConfig()))
    batch, steps = (8, 40) if args.quick else (16, 60)
    rows, res = [], {"benchmark": "grammar_libs", "machine": common.machine_info(), "date": common.now_iso(),
                     "batch": batch, "vocab": tok.vocab_size, "libs": {}}
    for name, fn in (("xgrammar", run_xgrammar), ("llguidance", run_llguidance)):
        try:
            r = fn(tok, batch, steps)
        except ImportError:
            r = {"skipped": "not installed"}
        res["libs"][name] = r
        rows.append([name, r.get("compile_ms", "-"), r.get("fill_us_per_step", "-"), r.get("fill_us_per_seq", "-"),
                     r.get("skipped", "")])
    common.print_table(f"JSON-schema grammar: compile, and one step's bitmask fill for {batch} sequences "
                       f"(vocab {tok.vocab_size}, median)", ["library", "compile ms", "fill us/step", "fill us/seq",
                                                              "note"], rows)
    print(f"\nwrote {common.write_json(args.json, res)}")
    return res


if __name__ == "__main__":
    main()
