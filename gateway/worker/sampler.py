"""Token sampling on the runner's device: greedy, temperature, top-k, top-p, seeds, top logprobs.

The whole batch is sampled with a few tensor ops on the device that holds the logits; only the
sampled ids (and, for requests that asked, their logprobs) come back to the host, in one copy
each. Randomness is counter-based: the noise for a request's n-th output token is a hash of
(its seed, n, token id), so a seeded request draws the same tokens alone or in any batch, after a
preemption (recompute), on CPU or GPU, and whichever sampler (batched or the per-row reference
below) runs it. A request without a seed gets a random one when first sampled.

Sampling is the Gumbel-max trick: argmax(logits / T + G) with G = -log(-log U) is a draw from
softmax(logits / T), restricted to the rows' top-k / top-p sets by masking the rest to -inf.

The interface other logit transforms hook into: `sample(logits, requests)` with logits (S, V) fp32
on the device, one row per request in `requests` (whose .params carry the per-request settings).
"""
from __future__ import annotations

import random

import torch

from gateway.worker.request import Request

# splitmix64's constants as signed int64 (torch has no uint64 arithmetic); products wrap.
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_COUNTER_MUL = 0xD1B54A32D192ED03 - (1 << 64)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic on signed types)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(S, V) fp32 in (0, 1): splitmix64 of (seed, counter, token id), the top 24 bits.
    seeds, counters: (S,) int64 on the device the noise is wanted on."""
    base = seeds * _GOLDEN + counters * _COUNTER_MUL  # (S,)
    ids = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    z = base[:, None] + ids[None, :] * _GOLDEN  # (S, V)
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    z = z ^ _shr(z, 31)
    return (_shr(z, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def gumbel_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return -torch.log(-torch.log(uniform_noise(seeds, counters, vocab_size)))


def top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(S, V) bool, True outside each row's top-k and top-p nucleus (the most likely token always
    stays). logits are already temperature-scaled; top_k: (S,) int64 (V: no cut); top_p: (S,) fp32."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    cut = ranks >= top_k[:, None]
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches p.
    cut |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    return torch.empty_like(cut).scatter_(-1, order, cut)


def _top_p(p: float) -> float:
    """top_p >= 1 cuts nothing: above any sum of probabilities, fp32 rounding included."""
    return p if p < 1.0 else 2.0


class Sampler:
    def __init__(self) -> None:
        self._seeds: dict[str, int] = {}  # request id -> the seed of an unseeded request
        self._rng = random.Random()

    def seed_of(self, req: Request) -> int:
        if req.params.seed is not None:
            return req.params.seed
        s = self._seeds.get(req.request_id)
        if s is None:
            s = self._seeds[req.request_id] = self._rng.getrandbits(62)
        return s

    def forget(self, request_id: str) -> None:
        self._seeds.pop(request_id, None)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """logits: (S, V) fp32 on the runner's device, one row per request; not modified. Returns
        a token id per request and records logprobs on requests that asked for them."""
        rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if not rows:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample_rows(logits, requests, rows)
        out: list[int] = tokens.tolist()  # the step's one device -> host copy of ids
        lp_rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if lp_rows:
            self._logprobs(logits, requests, lp_rows, tokens)
        return out

    def _sample_rows(self, logits: torch.Tensor, requests: list[Request], rows: list[int]) -> torch.Tensor:
        dev = logits.device
        vocab = logits.shape[-1]
        params = [requests[i].params for i in rows]
        temps = torch.tensor([max(p.temperature, 1e-5) for p in params], device=dev)
        seeds = torch.tensor([self.seed_of(requests[i]) for i in rows], dtype=torch.int64, device=dev)
        counters = torch.tensor([len(requests[i].output_token_ids) for i in rows], dtype=torch.int64, device=dev)
        idx = None if len(rows) == len(requests) else torch.tensor(rows, device=dev)
        sub = (logits if idx is None else logits[idx]) / temps[:, None]  # (R, V), a copy
        if any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params):
            top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
            top_p = torch.tensor([_top_p(p.top_p) for p in params], dtype=torch.float32, device=dev)
            sub.masked_fill_(top_k_top_p_mask(sub, top_k, top_p), float("-inf"))
        drawn = (sub + gumbel_noise(seeds, counters, vocab)).argmax(dim=-1)  # (R,)
        if idx is None:
            return drawn
        tokens = logits.argmax(dim=-1)
        tokens[idx] = drawn
        return tokens

    def _logprobs(self, logits: torch.Tensor, requests: list[Request], rows: list[int], tokens: torch.Tensor) -> None:
        """Logprobs of the raw distribution (before temperature and cuts), as OpenAI reports them:
        the sampled token's and the top-k alternatives', k the largest any row asked for."""
        dev = logits.device
        idx = torch.tensor(rows, device=dev)
        lp = logits[idx].log_softmax(dim=-1)  # (R, V)
        k = max(requests[i].params.logprobs or 0 for i in rows)
        chosen = lp.gather(1, tokens[idx][:, None])[:, 0]  # (R,)
        top = lp.topk(k, dim=-1) if k > 0 else None
        # One copy for the floats and one for the ids, however many rows asked.
        chosen_h = chosen.tolist()
        vals = top.values.tolist() if top is not None else [[] for _ in rows]
        ids = top.indices.tolist() if top is not None else [[] for _ in rows]
        for j, i in enumerate(rows):
            n = requests[i].params.logprobs or 0
            requests[i].output_logprobs.append((chosen_h[j], list(zip(ids[j][:n], vals[j][:n]))))


def reference_sample(logits: torch.Tensor, req: Request, seed: int) -> int:
    """One row, written plainly: the meaning the batched sampler must match token for token.
    logits: (V,) fp32."""
    p = req.params
    if p.greedy:
        return int(logits.argmax())
    x = logits / max(p.temperature, 1e-5)
    vocab = x.shape[0]
    sorted_x, order = x.sort(descending=True, stable=True)
    k = p.top_k if 0 < p.top_k < vocab else vocab
    probs = sorted_x.softmax(dim=0)
    mass_before = probs.cumsum(dim=0) - probs
    for rank in range(vocab):  # the kept set is a prefix of the sorted tokens
        if rank >= k or bool(mass_before[rank] >= _top_p(p.top_p)):
            x[order[rank:]] = float("-inf")
            break
    counter = torch.tensor([len(req.output_token_ids)])
    g = gumbel_noise(torch.tensor([seed]), counter, vocab)[0]
    return int((x + g).argmax())
