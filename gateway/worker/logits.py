"""Logit processing before sampling: frequency/presence penalties, logit_bias and grammar masks
(structured outputs, forced tool calls), as batched ops on the step's (num_seqs, vocab) logits.

The sampler is untouched: the engine calls `process` on the logits before sampling and `accept`
with the sampled tokens after. A batch where no sequence asks for any of this costs one pass over
the requests' parameters, and its logits come back as they were (same tensor), so outputs without
these features are unchanged token for token.

Grammar masks: each constrained sequence's matcher fills its row of one int32 bitmask on the host
(32 tokens a word: xgrammar's format, ~2.5 us a row); the bitmask goes to the logits' device in
one copy and is unpacked there with shifts, so there is no per-sequence device round trip.
"""
from __future__ import annotations

from typing import Any

import torch

from gateway.worker.request import Request
from gateway.worker.structured import new_matcher


class LogitsProcessor:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.matchers: dict[str, Any] = {}  # request id -> its grammar matcher
        self.counts: dict[str, torch.Tensor] = {}  # request id -> (vocab,) output token counts (penalties)
        self._bits = torch.arange(32, dtype=torch.int32)
        self._bitmask: torch.Tensor | None = None  # (rows, words) int32, reused across steps

    def forget(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)
        self.counts.pop(request_id, None)

    def process(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """logits: (S, V) fp32, one row per request (the sampler's input). Returns the processed
        logits (the same tensor when nothing applies)."""
        pen = [i for i, r in enumerate(requests) if r.params.frequency_penalty or r.params.presence_penalty]
        bias = [i for i, r in enumerate(requests) if r.params.logit_bias]
        gram = [i for i, r in enumerate(requests) if r.params.grammar is not None]
        if not (pen or bias or gram):
            return logits
        logits = logits.clone()
        if pen:
            self._penalize(logits, requests, pen)
        if bias:
            rows = [i for i in bias for _ in requests[i].params.logit_bias]
            cols = [t for i in bias for t, _ in requests[i].params.logit_bias]
            vals = [b for i in bias for _, b in requests[i].params.logit_bias]
            logits.index_put_((torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)),
                              torch.tensor(vals, dtype=logits.dtype, device=logits.device), accumulate=True)
        if gram:
            self._mask(logits, requests, gram)
        return logits

    def accept(self, requests: list[Request], tokens: list[int]) -> None:
        """After sampling: advance each constrained sequence's grammar, count tokens for penalties."""
        for r, t in zip(requests, tokens):
            p = r.params
            if p.grammar is not None:
                m = self.matchers.get(r.request_id)
                if m is not None and not m.is_terminated():
                    m.accept_token(t)
            if p.frequency_penalty or p.presence_penalty:
                c = self.counts.get(r.request_id)
                if c is not None:
                    c[t] += 1

    def _penalize(self, logits: torch.Tensor, requests: list[Request], rows: list[int]) -> None:
        counts = []
        for i in rows:
            r = requests[i]
            c = self.counts.get(r.request_id)
            if c is None:  # first step (or after a restart): count what was generated so far
                c = torch.zeros(logits.shape[1])
                if r.output_token_ids:
                    c.index_add_(0, torch.tensor(r.output_token_ids), torch.ones(len(r.output_token_ids)))
                self.counts[r.request_id] = c
            counts.append(c)
        cnt = torch.stack(counts).to(logits.device)  # (R, V)
        freq = torch.tensor([requests[i].params.frequency_penalty for i in rows], device=logits.device)
        pres = torch.tensor([requests[i].params.presence_penalty for i in rows], device=logits.device)
        idx = torch.tensor(rows, device=logits.device)
        logits[idx] -= freq[:, None] * cnt + pres[:, None] * (cnt > 0).to(logits.dtype)

    def _mask(self, logits: torch.Tensor, requests: list[Request], rows: list[int]) -> None:
        words = (logits.shape[1] + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < len(rows) or self._bitmask.shape[1] != words:
            self._bitmask = torch.empty((max(len(rows), 8), words), dtype=torch.int32)
        bitmask = self._bitmask[:len(rows)]
        bitmask.fill_(-1)  # all allowed: a finished grammar's row stays open (its request is ending)
        for j, i in enumerate(rows):
            r = requests[i]
            m = self.matchers.get(r.request_id)
            if m is None:
                m = self.matchers[r.request_id] = new_matcher(r.params.grammar)
                for t in r.output_token_ids:  # a request resumed mid-way (e.g. preempted, then forgotten)
                    m.accept_token(t)
            if not m.is_terminated():
                m.fill_next_token_bitmask(self._bitmask, j)
        dev = logits.device
        bits = (bitmask.to(dev)[:, :, None] >> self._bits.to(dev)) & 1  # (R, words, 32)
        allowed = bits.reshape(len(rows), -1)[:, :logits.shape[1]].bool()  # (R, V)
        banned = torch.stack([requests[i].params.grammar.banned for i in rows]).to(dev)
        allowed &= ~banned
        idx = torch.tensor(rows, device=dev)
        logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
