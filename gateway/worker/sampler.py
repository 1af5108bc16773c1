"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, top logprobs."""
from __future__ import annotations

import torch

from gateway.worker.request import Request


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}
        self._skips: dict[str, int] = {}  # request id -> draws to discard before its first sample

    def _generator(self, req: Request, like: torch.Tensor) -> torch.Generator:
        g = self._generators.get(req.request_id)
        if g is None:
            g = torch.Generator()
            if req.params.seed is not None:
                g.manual_seed(req.params.seed)
            else:
                g.seed()
            self._generators[req.request_id] = g
            for _ in range(self._skips.pop(req.request_id, 0)):  # the same draws, one a token, as sample() makes
                torch.empty_like(like).exponential_(generator=g)
        return g

    def skip(self, req: Request, num_tokens: int) -> None:
        """A continuation of a request another pool sampled num_tokens for: a seeded stream goes on
        where that pool's left off (it drew once a token, as here)."""
        if not req.params.greedy and req.params.seed is not None and num_tokens > 0:
            self._skips[req.request_id] = num_tokens

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self._skips.pop(request_id, None)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """logits: (S, V) fp32, one row per request. Returns a token id per request and records
        logprobs on requests that asked for them."""
        logits = logits.cpu()
        tokens = logits.argmax(dim=-1)
        rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if rows:
            idx = torch.tensor(rows)
            sub = logits[idx]  # (R, V)
            temps = torch.tensor([requests[i].params.temperature for i in rows])
            sub = sub / temps[:, None]
            sub = _top_k_top_p(
                sub,
                [requests[i].params.top_k for i in rows],
                [requests[i].params.top_p for i in rows],
            )
            probs = sub.softmax(dim=-1)
            for j, i in enumerate(rows):
                # Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p.
                e = torch.empty_like(probs[j]).exponential_(generator=self._generator(requests[i], probs[j]))
                tokens[i] = (probs[j] / e).argmax()
        out = tokens.tolist()
        for i, r in enumerate(requests):
            if r.params.logprobs is not None:
                lp = logits[i].log_softmax(dim=-1)
                k = r.params.logprobs
                top = lp.topk(k) if k > 0 else None
                alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
                r.output_logprobs.append((float(lp[out[i]]), alts))
        return out


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask to -inf everything outside each row's top-k and top-p nucleus."""
    vocab = logits.shape[-1]
    if all(k <= 0 or k >= vocab for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([kk if 0 < kk < vocab else vocab for kk in top_k])
    ranks = torch.arange(vocab)[None, :]
    mask = ranks >= k[:, None]
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches p (the first token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    mask |= mass_before >= torch.tensor(top_p)[:, None]
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
