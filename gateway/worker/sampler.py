"""Token sampling on the runner's device: greedy, temperature, top-k, top-p, seeds, top logprobs.

The whole batch is sampled with a few tensor ops on the device that holds the logits; only the
sampled ids (and, for requests that asked, their logprobs) come back to the host, in one copy
each. Randomness is counter-based: the uniform number behind a request's n-th output token is a
hash of (its seed, n), so a seeded request draws the same tokens alone or in any batch, after a
preemption (recompute), and whichever sampler (batched, or the per-row reference below) runs it.
A request without a seed gets a random one when first sampled.

A draw is the inverse CDF: the first token whose cumulative probability exceeds u, over the
candidates (the top max-k tokens by topk when every sampled row has a top-k, else the whole
vocabulary, sorted only when a top-p asks for it), with the tokens outside a row's top-k and top-p
sets given probability 0. One uniform per row: no (rows, vocab) noise to make.

The interface other logit transforms hook into: `sample(logits, requests)` with logits (S, V) fp32
on the device, one row per request in `requests` (whose .params carry the per-request settings).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
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


def uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """(S,) fp64 in (0, 1): splitmix64 of (seed, counter), its top 52 bits.
    seeds, counters: (S,) int64 on the device the numbers are wanted on."""
    z = seeds * _GOLDEN + (counters + 1) * _COUNTER_MUL
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    z = z ^ _shr(z, 31)
    return (_shr(z, 12).to(torch.float64) + 0.5) * (1.0 / (1 << 52))


def draw(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor, k_max: int,
         cut_p: bool) -> torch.Tensor:
    """Token ids (R,) drawn from softmax(x) restricted to each row's top-k / top-p set.
    x: (R, V) temperature-scaled logits; top_k: (R,) int64 (V: no cut); top_p: (R,) fp32 (> 1: no
    cut); u: (R,) fp64 uniforms; k_max = max(top_k) and cut_p = any(top_p <= 1), given from the
    host so that nothing here waits for the device. The most likely token is always kept. The CDF
    runs over the kept tokens in token-id order (so the reference needs no sort to agree)."""
    vocab = x.shape[-1]
    probs = (x - x.logsumexp(dim=-1, keepdim=True)).exp()  # (R, V) over the whole vocabulary
    idx = None
    if k_max < vocab or cut_p:
        if k_max < vocab:
            idx = x.topk(k_max, dim=-1).indices  # (R, K), most likely first
        else:
            idx = x.sort(dim=-1, descending=True, stable=True).indices
        p_sorted = probs.gather(1, idx)
        ranks = torch.arange(idx.shape[-1], device=x.device)[None, :]
        cut = ranks >= top_k[:, None]
        if cut_p:  # keep the smallest prefix whose mass reaches p
            cut |= (p_sorted.cumsum(dim=-1) - p_sorted) >= top_p[:, None]
        p_sorted = p_sorted.masked_fill(cut, 0.0)
        idx, order = idx.sort(dim=-1)  # candidates in token-id order
        probs = p_sorted.gather(1, order)
    cdf = probs.double().cumsum(dim=-1)  # (R, K)
    target = (u * cdf[:, -1])[:, None]
    j = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)  # (R, 1)
    return (j if idx is None else idx.gather(1, j))[:, 0]


@dataclass(frozen=True, slots=True)
class RowSettings:
    """The sampling rows' settings as arrays, gathered from the per-sequence arrays the batch state
    keeps (set once when a sequence gets its row), so a step reads no request's parameters."""

    temperature: np.ndarray  # (S,) fp64 (as the params hold it: the greedy test is exact)
    top_k: np.ndarray  # (S,) int64, 0: no cut
    top_p: np.ndarray  # (S,) fp64
    seed: np.ndarray  # (S,) int64 (Sampler.seed_of)
    counter: np.ndarray  # (S,) int64: the request's output tokens so far (the draw's index)
    all_greedy: bool = False  # every row is greedy (the arrays are then left empty)


_EMPTY = np.zeros(0, dtype=np.int64)
GREEDY = RowSettings(_EMPTY, _EMPTY, _EMPTY, _EMPTY, _EMPTY, all_greedy=True)


def _top_p(p: float) -> float:
    """top_p >= 1 cuts nothing: above any sum of probabilities, fp32 rounding included."""
    return p if p < 1.0 else 2.0


class Sampler:
    def __init__(self) -> None:
        self._seeds: dict[str, int] = {}  # request id -> the seed of an unseeded request
        self._rng = random.Random()

    def seed_of(self, req: Request) -> int:
        if req.params.seed is not None:
            # int64 arithmetic wraps: a seed of 2**63 or more (a negative seed as the API takes it,
            # modulo 2**64) is the same 64 bits read as signed, so every 64-bit seed is its own stream
            seed = req.params.seed
            return seed - (1 << 64) if seed >= 1 << 63 else seed
        s = self._seeds.get(req.request_id)
        if s is None:
            s = self._seeds[req.request_id] = self._rng.getrandbits(62)
        return s

    def forget(self, request_id: str) -> None:
        self._seeds.pop(request_id, None)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """logits: (S, V) fp32 on the runner's device, one row per request; not modified. Returns
        a token id per request and records logprobs on requests that asked for them."""
        tokens = self.sample_ids(logits, requests)
        out: list[int] = tokens.tolist()  # the step's one device -> host copy of ids
        self.record_logprobs(logits, requests, tokens)
        return out

    def sample_ids(self, logits: torch.Tensor, requests: list[Request], settings: RowSettings | None = None
                   ) -> torch.Tensor:
        """The sampled ids (S,) int64, left on the logits' device (nothing here waits for it).
        settings: the rows' settings as arrays (else read from each request's params)."""
        if settings is not None:
            if settings.all_greedy:
                return logits.argmax(dim=-1)
            hot = np.flatnonzero(settings.temperature > 1e-5)  # not greedy
            if not hot.size:
                return logits.argmax(dim=-1)
            vocab = logits.shape[-1]
            k = settings.top_k[hot]
            ints = np.stack([hot, settings.seed[hot], settings.counter[hot], np.where((k > 0) & (k < vocab), k, vocab)])
            p = settings.top_p[hot]
            floats = np.stack([np.maximum(settings.temperature[hot], 1e-5), np.where(p < 1.0, p, 2.0)])
            return self._draw(logits, torch.from_numpy(ints), torch.from_numpy(floats.astype(np.float32)),
                              int(ints[3].max()), bool(floats[1].min() <= 1.0))
        rows = [i for i, r in enumerate(requests) if r.params.temperature > 1e-5]  # not greedy
        if not rows:
            return logits.argmax(dim=-1)
        return self._sample_rows(logits, requests, rows)

    def record_logprobs(self, logits: torch.Tensor, requests: list[Request], tokens: torch.Tensor) -> None:
        """Logprobs for the requests that asked (appended to their output_logprobs; waits for the
        device when any did)."""
        lp_rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if lp_rows:
            self._logprobs(logits, requests, lp_rows, tokens)

    def _sample_rows(self, logits: torch.Tensor, requests: list[Request], rows: list[int]) -> torch.Tensor:
        vocab = logits.shape[-1]
        params = [requests[i].params for i in rows]
        top_k = [_top_k(p.top_k, vocab) for p in params]
        top_p = [_top_p(p.top_p) for p in params]
        ints = torch.tensor([rows, [self.seed_of(requests[i]) for i in rows],
                             [len(requests[i].output_token_ids) for i in rows], top_k], dtype=torch.int64)
        floats = torch.tensor([[max(p.temperature, 1e-5) for p in params], top_p], dtype=torch.float32)
        return self._draw(logits, ints, floats, max(top_k), min(top_p) <= 1.0)

    def _draw(self, logits: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor, k_max: int, cut_p: bool
              ) -> torch.Tensor:
        """ints (4, R): logits row, seed, counter, top-k; floats (2, R): temperature, top-p (host);
        two host -> device copies for all the per-row settings."""
        dev = logits.device
        num_rows = ints.shape[1]
        ints, floats = _to(dev, ints), _to(dev, floats)
        temps = floats[0]
        idx = None if num_rows == logits.shape[0] else ints[0]
        sub = (logits if idx is None else logits[idx]) / temps[:, None]  # (R, V)
        drawn = draw(sub, ints[3], floats[1], uniform(ints[1], ints[2]), k_max, cut_p)
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
        floats = (chosen[:, None] if top is None else torch.cat([chosen[:, None], top.values], dim=1)).tolist()
        chosen_h = [f[0] for f in floats]
        vals = [f[1:] for f in floats]
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
    probs = (x - x.logsumexp(dim=0)).exp()  # (V,)
    order = x.argsort(descending=True, stable=True)
    sorted_probs = probs[order]
    mass_before = sorted_probs.cumsum(dim=0) - sorted_probs
    top_p = torch.tensor(_top_p(p.top_p), dtype=torch.float32)
    kept: list[int] = []
    for rank in range(_top_k(p.top_k, vocab)):
        if rank > 0 and bool(mass_before[rank] >= top_p):
            break
        kept.append(int(order[rank]))
    u = float(uniform(torch.tensor([seed]), torch.tensor([len(req.output_token_ids)]))[0])
    kept.sort()  # the CDF runs in token-id order
    total = 0.0
    for t in kept:
        total += float(probs[t])
    cdf = 0.0
    for t in kept:
        cdf += float(probs[t])
        if cdf > u * total:
            return t
    return kept[-1]


def _to(dev: torch.device, t: torch.Tensor) -> torch.Tensor:
    """A host tensor on the device without waiting for the device: a blocking copy would wait for
    the step's forward pass queued before it, and the host could not prepare the next step meanwhile
    (asynchronous scheduling). Pinned memory from torch's caching allocator, held until the copy ran."""
    return t if dev.type == "cpu" else t.pin_memory().to(dev, non_blocking=True)


def _top_k(k: int, vocab: int) -> int:
    return k if 0 < k < vocab else vocab
