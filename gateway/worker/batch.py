"""Flattened batch of one engine step (DESIGN.md §5), built with numpy for speed.

Sequences that decode one token come first, so attention can treat them as one batched
decode and the rest as chunked prefills.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gateway.worker.request import Request
from gateway.worker.sampler import RowSettings
from gateway.worker.scheduler import SchedulerOutput


@dataclass(slots=True)
class Batch:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    query_start_loc: torch.Tensor  # (B+1,) int32
    seq_lens: torch.Tensor  # (B,) int32, context length after this step
    slot_mapping: torch.Tensor  # (T,) int64
    block_table: torch.Tensor  # (B, max_blocks) int32
    logits_indices: torch.Tensor  # (S,) int64, one per sampling sequence
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    requests: list[Request]  # (B,) in batch order
    sampling: list[Request]  # (S,) the requests that sample a token this step
    settings: RowSettings | None = None  # the sampling rows' settings as arrays (batch_state.py)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def build_batch(out: SchedulerOutput, block_size: int, device: torch.device | str = "cpu") -> Batch:
    assert out.requests, "an empty step has no batch"
    pairs = sorted(zip(out.requests, out.num_tokens), key=lambda p: p[1] != 1)
    num_decodes = sum(1 for _, n in pairs if n == 1)
    b = len(pairs)
    t = sum(n for _, n in pairs)
    input_ids = np.empty(t, dtype=np.int64)
    positions = np.empty(t, dtype=np.int64)
    slot_mapping = np.empty(t, dtype=np.int64)
    qsl = np.zeros(b + 1, dtype=np.int32)
    seq_lens = np.empty(b, dtype=np.int32)
    max_blocks = max(len(r.block_ids) for r, _ in pairs)
    block_table = np.zeros((b, max_blocks), dtype=np.int32)
    logits_idx: list[int] = []
    sampling: list[Request] = []
    pos = 0
    for i, (req, n) in enumerate(pairs):
        start = req.num_computed_tokens
        end = start + n
        blocks = req.block_ids
        block_table[i, : len(blocks)] = blocks
        num_prompt = req.num_prompt_tokens
        if n == 1:  # decode: plain Python scalars, the common case at large batch
            input_ids[pos] = (
                req.prompt_token_ids[start] if start < num_prompt else req.output_token_ids[start - num_prompt]
            )
            positions[pos] = start
            slot_mapping[pos] = blocks[start // block_size] * block_size + start % block_size
        else:
            if end <= num_prompt:
                input_ids[pos : pos + n] = req.prompt_token_ids[start:end]
            else:
                input_ids[pos : pos + n] = req.all_token_ids[start:end]
            p = np.arange(start, end, dtype=np.int64)
            positions[pos : pos + n] = p
            slot_mapping[pos : pos + n] = np.asarray(blocks, dtype=np.int64)[p // block_size] * block_size + p % block_size
        pos += n
        qsl[i + 1] = pos
        seq_lens[i] = end
        if end == req.num_tokens:
            logits_idx.append(pos - 1)
            sampling.append(req)

    def tt(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device, non_blocking=True)

    return Batch(
        input_ids=tt(input_ids),
        positions=tt(positions),
        query_start_loc=tt(qsl),
        seq_lens=tt(seq_lens),
        slot_mapping=tt(slot_mapping),
        block_table=tt(block_table),
        logits_indices=tt(np.asarray(logits_idx, dtype=np.int64)),
        num_decodes=num_decodes,
        requests=[r for r, _ in pairs],
        sampling=sampling,
    )
