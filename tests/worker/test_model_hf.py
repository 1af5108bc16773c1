"""Our model through the paged path against Hugging Face's LlamaForCausalLM on the same folder."""
from __future__ import annotations

import random
from functools import lru_cache

import pytest
import torch

from gateway.worker.batch import build_batch
from gateway.worker.engine import Engine
from gateway.worker.request import Request, SamplingParams

transformers = pytest.importorskip("transformers")

ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_logits(model_dir):
    """hf_logits(token ids) -> (L, vocab) fp32 logits of a plain causal forward."""
    model, info = transformers.LlamaForCausalLM.from_pretrained(
        str(model_dir), torch_dtype=torch.float32, output_loading_info=True
    )
    # Every tensor of the checkpoint is a Llama weight and no weight is left uninitialised.
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    model.eval()

    @lru_cache(maxsize=None)
    def logits(ids: tuple[int, ...]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float()

    return lambda ids: logits(tuple(ids))


def step_and_check(engine: Engine, hf_logits) -> dict[str, int]:
    """One engine step with logits at every scheduled position, each compared to HF's logits
    for the same prefix. Returns {request_id: number of positions compared}."""
    out = engine.scheduler.schedule()
    batch = build_batch(out, engine.cfg.block_size)
    batch.logits_indices = torch.arange(batch.num_tokens)
    logits = engine.runner.execute(batch)  # (T, vocab)
    qsl = batch.query_start_loc.tolist()
    checked = {}
    for i, r in enumerate(batch.requests):
        start, end = r.num_computed_tokens, r.num_computed_tokens + qsl[i + 1] - qsl[i]
        want = hf_logits(r.all_token_ids[:end])[start:end]
        torch.testing.assert_close(logits[qsl[i] : qsl[i + 1]], want, atol=ATOL, rtol=0)
        checked[r.request_id] = end - start
    # Made-up next tokens: what matters is that K/V of the sequence so far is read back right.
    sampled = {
        r.request_id: 5 + (r.num_tokens * 37) % 500
        for r, n in zip(out.requests, out.num_tokens)
        if r.num_computed_tokens + n == r.num_tokens
    }
    engine.scheduler.update(out, sampled)
    return checked


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 512) for _ in range(n)]


def test_prefill_logits_match_at_every_position(make_engine, hf_logits) -> None:
    engine = make_engine(max_num_batched_tokens=64)
    engine.add_request(Request("a", prompt(23, 1), SamplingParams()))
    assert step_and_check(engine, hf_logits) == {"a": 23}


def test_decode_reads_the_paged_kv_cache_back(make_engine, hf_logits) -> None:
    engine = make_engine(max_num_batched_tokens=64)
    engine.add_request(Request("a", prompt(23, 2), SamplingParams(max_tokens=8)))
    engine.add_request(Request("b", prompt(10, 3), SamplingParams(max_tokens=8)))
    assert step_and_check(engine, hf_logits) == {"a": 23, "b": 10}
    assert step_and_check(engine, hf_logits) == {"a": 1, "b": 1}
    # A new prompt joins: decodes and a prefill in the same batch.
    engine.add_request(Request("c", prompt(13, 4), SamplingParams(max_tokens=8)))
    assert step_and_check(engine, hf_logits) == {"a": 1, "b": 1, "c": 13}
    for _ in range(4):  # a and b cross into new blocks (block_size 4)
        assert step_and_check(engine, hf_logits) == {"a": 1, "b": 1, "c": 1}


def test_chunked_prefill_and_prefix_hit_match(make_engine, hf_logits) -> None:
    engine = make_engine(max_num_batched_tokens=8)
    first = prompt(21, 5)
    engine.add_request(Request("first", first, SamplingParams(max_tokens=2)))
    assert [step_and_check(engine, hf_logits) for _ in range(3)] == [{"first": 8}, {"first": 8}, {"first": 5}]
    # Shares 3 full blocks with `first`: its prefill starts after them, on cached K/V.
    engine.add_request(Request("second", first[:12] + prompt(6, 6), SamplingParams(max_tokens=2)))
    assert step_and_check(engine, hf_logits) == {"first": 1, "second": 6}
    assert engine.scheduler.requests["second"].num_cached_tokens == 12
    assert step_and_check(engine, hf_logits) == {"second": 1}
