"""The batched sampler against the per-row reference, and the draws' distribution."""
from __future__ import annotations

import random

import numpy as np
import torch

from gateway.worker.request import Request, SamplingParams
from gateway.worker.sampler import RowSettings, Sampler, reference_sample, uniform
from tests.worker.test_engine import random_prompts, run, tokens_of


class ReferenceSampler(Sampler):
    """Row by row through reference_sample: what the engine must reproduce token for token."""

    def sample_ids(self, logits: torch.Tensor, requests: list[Request], settings: object = None) -> torch.Tensor:
        out = [reference_sample(logits[i].clone(), r, self.seed_of(r)) for i, r in enumerate(requests)]
        return torch.tensor(out, dtype=torch.int64)

    def record_logprobs(self, logits: torch.Tensor, requests: list[Request], tokens: torch.Tensor) -> None:
        for i, r in enumerate(requests):
            if r.params.logprobs is not None:
                lp = logits[i].log_softmax(-1)
                top = lp.topk(r.params.logprobs)
                r.output_logprobs.append((float(lp[int(tokens[i])]),
                                          list(zip(top.indices.tolist(), top.values.tolist()))))


def _random_params(rng: random.Random, i: int) -> SamplingParams:
    kind = i % 5
    if kind == 0:
        return SamplingParams(temperature=0.0)
    return SamplingParams(
        temperature=rng.choice([0.3, 0.7, 1.0, 1.5]),
        top_k=rng.choice([0, 1, 5, 50]) if kind in (1, 3) else 0,
        top_p=rng.choice([0.5, 0.9, 0.99]) if kind in (2, 3) else 1.0,
        seed=rng.randrange(1 << 30),
    )


def test_batched_sampler_matches_the_reference_row_by_row() -> None:
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = rng.randrange(1, 24)
        logits = torch.randn(n, 512, generator=g) * rng.choice([0.5, 2.0, 6.0])
        reqs = [Request(f"r{i}", [1], _random_params(rng, i + trial)) for i in range(n)]
        for r in reqs:
            r.output_token_ids.extend([7] * rng.randrange(40))  # different counters
        s = Sampler()
        before = logits.clone()
        got = s.sample(logits, reqs)
        assert torch.equal(logits, before), "the sampler must not change the runner's logits"
        want = [reference_sample(logits[i].clone(), r, r.params.seed or 0) for i, r in enumerate(reqs)]
        assert got == want


def test_row_settings_arrays_sample_as_the_requests_params() -> None:
    """The engine's path (settings gathered from the batch state's per-row arrays) draws what
    reading each request's params draws."""
    rng = random.Random(1)
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        n = rng.randrange(1, 24)
        logits = torch.randn(n, 512, generator=g) * rng.choice([0.5, 2.0, 6.0])
        reqs = [Request(f"r{i}", [1], _random_params(rng, i + trial)) for i in range(n)]
        for r in reqs:
            r.output_token_ids.extend([7] * rng.randrange(40))
        s = Sampler()
        settings = RowSettings(
            np.array([r.params.temperature for r in reqs]), np.array([r.params.top_k for r in reqs]),
            np.array([r.params.top_p for r in reqs]), np.array([s.seed_of(r) for r in reqs]),
            np.array([len(r.output_token_ids) for r in reqs]))
        want = s.sample_ids(logits, reqs).tolist()
        assert s.sample_ids(logits, reqs, settings).tolist() == want


def test_seeded_draws_follow_the_distribution() -> None:
    """5,000 draws (one seed, successive counters) from softmax(logits / 0.8) over 8 tokens."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5]])
    req = Request("d", [1], SamplingParams(temperature=0.8, seed=42))
    s = Sampler()
    counts = torch.zeros(8)
    for _ in range(5000):
        t = s.sample(logits, [req])[0]
        req.output_token_ids.append(t)
        counts[t] += 1
    p = (logits[0] / 0.8).softmax(-1)
    assert (counts / 5000 - p).abs().max() < 0.02, (counts / 5000, p)


def test_top_k_and_top_p_keep_only_their_sets() -> None:
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0, -1.0, -2.0]] * 2)
    k2 = Request("k", [1], SamplingParams(temperature=5.0, top_k=2, seed=1))
    # probabilities at T=1: ~0.35, 0.32, 0.29, ...: the first two hold < 0.7, the first three > 0.9
    p = Request("p", [1], SamplingParams(temperature=1.0, top_p=0.7, seed=2))
    s = Sampler()
    seen: dict[str, set[int]] = {"k": set(), "p": set()}
    for _ in range(300):
        for r, t in zip((k2, p), s.sample(logits, [k2, p])):
            seen[r.request_id].add(t)
            r.output_token_ids.append(t)
    assert seen == {"k": {0, 1}, "p": {0, 1, 2}}


def test_uniforms_differ_by_seed_and_counter() -> None:
    u = uniform(torch.arange(64).repeat_interleave(64), torch.arange(64).repeat(64))  # 4096 pairs
    assert bool(((u > 0) & (u < 1)).all())
    assert len(set(u.tolist())) == 4096
    assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float((u < 0.1).double().mean()) - 0.1) < 0.02


def test_logprobs_are_the_raw_distributions() -> None:
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    reqs = [Request("a", [1], SamplingParams(temperature=0.0, logprobs=3)),
            Request("b", [1], SamplingParams(temperature=1.0, seed=5)),
            Request("c", [1], SamplingParams(temperature=0.7, seed=6, logprobs=0))]
    tokens = Sampler().sample(logits, reqs)
    lp = logits.log_softmax(-1)
    chosen, alts = reqs[0].output_logprobs[0]
    assert abs(chosen - float(lp[0, tokens[0]])) < 1e-6
    assert [t for t, _ in alts] == lp[0].topk(3).indices.tolist()
    assert reqs[1].output_logprobs == []
    assert abs(reqs[2].output_logprobs[0][0] - float(lp[2, tokens[2]])) < 1e-6
    assert reqs[2].output_logprobs[0][1] == []


def test_engine_samples_as_the_reference_across_chunks_prefix_hits_and_preemption(make_engine) -> None:
    prefix = random_prompts([12], seed=21)[0]
    prompts = [prefix + t for t in random_prompts([5, 9, 1, 14], seed=22)] + random_prompts([23, 3, 31, 7], seed=23)
    rng = random.Random(4)
    params = [SamplingParams(max_tokens=10 + i % 6, ignore_eos=True, temperature=p.temperature, top_k=p.top_k,
                             top_p=p.top_p, seed=p.seed if p.seed is not None else i)
              for i, p in enumerate(_random_params(rng, i) for i in range(8))]
    results = []
    for sampler in (Sampler(), ReferenceSampler()):
        # 16 blocks of 4 tokens for ~190 tokens in flight: preemptions; a 16-token budget: chunks.
        engine = make_engine(num_blocks=16, max_num_batched_tokens=16, max_num_seqs=8, max_model_len=64)
        engine.sampler = sampler
        reqs = [Request(f"r{i}", list(p), sp) for i, (p, sp) in enumerate(zip(prompts, params))]
        outs = run(engine, reqs)
        assert sum(r.num_preemptions for r in reqs) > 0, "the test meant to force preemptions"
        assert any(r.num_cached_tokens > 0 for r in reqs), "the test meant to hit the prefix cache"
        results.append({r.request_id: tokens_of(outs[r.request_id]) for r in reqs})
    assert results[0] == results[1]
    assert sum(p.temperature > 0 for p in params) >= 5


def test_every_64_bit_seed_samples_and_repeats() -> None:
    """The API takes negative seeds (held modulo 2**64): seeds past int64 sample, each its own stream."""
    logits = torch.randn(1, 512, generator=torch.Generator().manual_seed(1))
    draws = {}
    for seed in (2**64 - 5, 2**63, 2**63 - 1, 5):
        got = [Sampler().sample(logits, [Request(f"s{seed}", [1], SamplingParams(temperature=1.0, seed=seed))])
               for _ in range(2)]
        assert got[0] == got[1]  # the same seed, the same draw
        draws[seed] = got[0]
    assert len({tuple(d) for d in draws.values()}) > 1
