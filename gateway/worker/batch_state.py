"""Persistent batch state: each running sequence owns a row of preallocated arrays that live
between steps and change only when the sequence does (vLLM v1's InputBatch shape).

A row holds the sequence's block table, its next input token and its position (the number of
computed tokens). A sequence gets a row when first scheduled, its row's block table grows by the
blocks it was given since the last step, and the row is freed when the sequence finishes, is
aborted or preempted. A step's Batch (DESIGN.md §5) is then gathered from the rows with a few
vectorised numpy operations: a decode costs no per-sequence list conversion and the block table
is never rebuilt from Python lists. Tensors cross to the device in two copies (int64 and int32
groups) from a staging buffer of their own (two alternate, so a non-blocking copy of the last step
is never overwritten while in flight).

Asynchronous scheduling (engine.py): a step's sampled ids stay on the device until the host asks
for them a step later. advance_pending() marks each sampling row's next input as "pending at index
j of the last step's ids"; the next prepare() copies those inputs device to device from that
tensor (the host's next_token is stale for them), and resolve() writes the values into the
host-side rows once they are known.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from gateway.worker.batch import Batch
from gateway.worker.request import Request
from gateway.worker.sampler import GREEDY, RowSettings
from gateway.worker.scheduler import SchedulerOutput


class BatchState:
    def __init__(self, max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device | str = "cpu", max_num_batched_tokens: int = 512):
        self.block_size = block_size
        self.device = torch.device(device)
        max_blocks = -(-max_model_len // block_size)
        self.block_table = np.zeros((max_num_seqs, max_blocks), dtype=np.int32)  # (rows, max_blocks)
        self.num_blocks = np.zeros(max_num_seqs, dtype=np.int64)  # valid entries per row
        self.next_token = np.zeros(max_num_seqs, dtype=np.int64)  # the row's next input token
        self.position = np.zeros(max_num_seqs, dtype=np.int64)  # its computed tokens
        self.length = np.zeros(max_num_seqs, dtype=np.int64)  # its tokens (prompt + output so far)
        # Its sampling settings, set when it gets the row: a step gathers them, reads no params.
        self.num_prompt = np.zeros(max_num_seqs, dtype=np.int64)
        self.temperature = np.zeros(max_num_seqs, dtype=np.float64)
        self.top_k = np.zeros(max_num_seqs, dtype=np.int64)
        self.top_p = np.ones(max_num_seqs, dtype=np.float64)
        self.seed = np.zeros(max_num_seqs, dtype=np.int64)
        self._num_hot = 0  # rows held by requests that sample (not greedy): 0 skips the gathers
        self.seed_of: Callable[[Request], int] = lambda req: 0  # the engine's Sampler.seed_of
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        # A row whose next input is the last launched step's sampled id at this index (-1: none),
        # and the step (generation) that sampled it; _feed holds that step's ids on the device.
        self.pending_src = np.full(max_num_seqs, -1, dtype=np.int64)
        self.pending_gen = np.zeros(max_num_seqs, dtype=np.int64)
        self._feed: torch.Tensor | None = None
        self._gen = 0
        self._rows = np.zeros(0, dtype=np.int64)  # the last prepared batch's rows, in batch order
        self._srows = self._rows  # ...and its sampling rows, in sampling order
        self.owner: list[Request | None] = [None] * max_num_seqs
        # Staging buffers for the host -> device copies (pinned on CUDA, so copies are async);
        # two of each, used alternately: the copy from one may still run while the next is filled.
        cap_tokens = max(max_num_batched_tokens, max_num_seqs)
        cap64 = 3 * cap_tokens + 3 * max_num_seqs  # ids, positions, slots; logits rows, feed dst/src
        cap32 = 2 * max_num_seqs + 1 + max_num_seqs * max_blocks
        pin = self.device.type == "cuda"
        self._stage = [(_buffer(cap64, torch.int64, pin), _buffer(cap32, torch.int32, pin)) for _ in range(2)]
        self._flip = 0

    # -- rows -------------------------------------------------------------------------------
    def _add(self, req: Request) -> int:
        row = self.free_rows.pop()
        self.owner[row] = req
        req.batch_row = row
        n = len(req.block_ids)
        self.block_table[row, :n] = req.block_ids
        self.block_table[row, n:] = 0  # padding, as build_batch pads (never read: seq_lens bound it)
        self.num_blocks[row] = n
        self.position[row] = req.num_computed_tokens
        self.length[row] = req.num_tokens
        self.next_token[row] = _token_at(req, req.num_computed_tokens)
        self.pending_src[row] = -1
        p = req.params
        self.num_prompt[row] = len(req.prompt_token_ids)
        self.temperature[row] = p.temperature
        self._num_hot += p.temperature > 1e-5
        self.top_k[row] = p.top_k
        self.top_p[row] = p.top_p
        self.seed[row] = self.seed_of(req)
        return row

    def remove(self, req: Request) -> None:
        """The sequence left the batch (finished, aborted or preempted): free its row."""
        row = req.batch_row
        if row >= 0 and self.owner[row] is req:
            self.owner[row] = None
            self.free_rows.append(row)
            self.pending_src[row] = -1
            self._num_hot -= req.params.temperature > 1e-5
        req.batch_row = -1

    @property
    def num_rows_used(self) -> int:
        return len(self.owner) - len(self.free_rows)

    # -- one step ---------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput) -> Batch:
        """The step's Batch: decodes (one token) first, then prefill chunks, as build_batch."""
        assert out.requests, "an empty step has no batch"
        if out.total_tokens == len(out.requests):  # decode-only, the steady state
            batch = self._prepare_decodes(out.requests)
            if batch is not None:
                return batch
        dec: list[Request] = []
        dec_no_sample: list[int] = []  # decodes of a prompt's next-to-last token: no sample yet
        pre: list[tuple[Request, int]] = []
        for req, n in zip(out.requests, out.num_tokens):
            if req.batch_row < 0:
                self._add(req)
            if n == 1:
                if req.num_computed_tokens + 1 != req.num_tokens:
                    dec_no_sample.append(len(dec))
                dec.append(req)
            else:
                pre.append((req, n))
        reqs = dec + [r for r, _ in pre]
        self._num_tokens = np.ones(len(reqs), dtype=np.int64)  # per batch row, for advance()
        self._num_tokens[len(dec):] = [n for _, n in pre]
        rows = np.fromiter((r.batch_row for r in reqs), dtype=np.int64, count=len(reqs))
        grown = np.fromiter((len(r.block_ids) for r in reqs), dtype=np.int64, count=len(reqs))
        for i in np.flatnonzero(grown != self.num_blocks[rows]).tolist():
            r, row = reqs[i], int(rows[i])
            k = int(self.num_blocks[row])
            self.block_table[row, k : len(r.block_ids)] = r.block_ids[k:]
            self.num_blocks[row] = len(r.block_ids)
        nd = len(dec)
        t = nd + sum(n for _, n in pre)
        pos = np.empty(t, dtype=np.int64)
        ids = np.empty(t, dtype=np.int64)
        seq_rows = np.empty(t, dtype=np.int64)  # the row of each token
        pos[:nd] = self.position[rows[:nd]]
        ids[:nd] = self.next_token[rows[:nd]]
        seq_rows[:nd] = rows[:nd]
        qsl = np.empty(len(reqs) + 1, dtype=np.int32)
        qsl[: nd + 1] = np.arange(nd + 1)
        at = nd
        if dec_no_sample:
            skip = set(dec_no_sample)
            logits_idx = [i for i in range(nd) if i not in skip]
            sampling = [r for i, r in enumerate(dec) if i not in skip]
        else:
            logits_idx, sampling = list(range(nd)), list(dec)
        for j, (req, n) in enumerate(pre):
            start = req.num_computed_tokens
            pos[at : at + n] = np.arange(start, start + n)
            end = start + n
            num_prompt = req.num_prompt_tokens
            ids[at : at + n] = req.prompt_token_ids[start:end] if end <= num_prompt else req.all_token_ids[start:end]
            seq_rows[at : at + n] = req.batch_row
            at += n
            qsl[nd + j + 1] = at
            if end == req.num_tokens:
                logits_idx.append(at - 1)
                sampling.append(req)
        self.length[rows] = [r.num_tokens for r in reqs]
        self._rows = rows
        self._srows = np.fromiter((r.batch_row for r in sampling), dtype=np.int64, count=len(sampling))
        return self._pack(reqs, rows, seq_rows, ids, pos, qsl, np.asarray(logits_idx, dtype=np.int64), nd, sampling)

    def _prepare_decodes(self, reqs: list[Request]) -> Batch | None:
        """A decode-only step from the rows alone: one pass over the requests for their row
        numbers, the rest vectorised. None when a sequence is new, or decodes a prompt token
        (no sample): the general path then."""
        b = len(reqs)
        rows = np.fromiter((r.batch_row for r in reqs), dtype=np.int64, count=b)
        if rows.min() < 0:
            return None
        pos = self.position[rows]
        if not (pos + 1 == self.length[rows]).all():
            return None
        # Blocks grow only when this step's token starts a block the row does not hold yet.
        for i in np.flatnonzero(pos // self.block_size >= self.num_blocks[rows]).tolist():
            r, row = reqs[i], int(rows[i])
            k = int(self.num_blocks[row])
            self.block_table[row, k : len(r.block_ids)] = r.block_ids[k:]
            self.num_blocks[row] = len(r.block_ids)
        self._num_tokens = np.ones(b, dtype=np.int64)
        self._rows = self._srows = rows
        ar = np.arange(b + 1, dtype=np.int64)
        return self._pack(list(reqs), rows, rows, self.next_token[rows], pos, ar.astype(np.int32), ar[:b], b,
                          list(reqs))

    def _pack(self, reqs: list[Request], rows: np.ndarray, seq_rows: np.ndarray, ids: np.ndarray,
              pos: np.ndarray, qsl: np.ndarray, logits_idx: np.ndarray, nd: int, sampling: list[Request]) -> Batch:
        """The Batch's tensors from the step's per-token arrays (seq_rows: each token's row)."""
        t = ids.shape[0]
        bs = self.block_size
        slots = self.block_table[seq_rows, pos // bs].astype(np.int64) * bs + pos % bs
        seq_lens = (pos[qsl[1:] - 1] + 1).astype(np.int32)
        max_blocks = max(1, int(self.num_blocks[rows].max()))
        table = self.block_table[rows, :max_blocks]
        # Decodes whose input is still on the device (the last step sampled it): copied there.
        if self._feed is None:  # nothing pending (synchronous steps)
            src = dst = _NONE
        else:
            src = self.pending_src[rows[:nd]]
            dst = np.flatnonzero(src >= 0)
        parts64 = (ids, pos, slots, logits_idx) if not dst.size else (ids, pos, slots, logits_idx, dst, src[dst])
        d64, d32 = self._to_device(*parts64, parts32=(qsl, seq_lens, table))
        s, b = len(logits_idx), len(reqs)
        input_ids = d64[:t]
        if dst.size:
            assert self._feed is not None
            at, k = 3 * t + s, dst.size
            input_ids.index_copy_(0, d64[at : at + k], self._feed.index_select(0, d64[at + k : at + 2 * k]))
        return Batch(
            input_ids=input_ids, positions=d64[t : 2 * t], slot_mapping=d64[2 * t : 3 * t],
            logits_indices=d64[3 * t : 3 * t + s],
            query_start_loc=d32[: b + 1], seq_lens=d32[b + 1 : 2 * b + 1],
            block_table=d32[2 * b + 1 :].view(b, max_blocks),
            num_decodes=nd, requests=reqs, sampling=sampling, settings=self._settings(),
        )

    def _settings(self) -> RowSettings:
        if not self._num_hot:
            return GREEDY
        r = self._srows
        return RowSettings(self.temperature[r], self.top_k[r], self.top_p[r], self.seed[r],
                           self.length[r] - self.num_prompt[r])

    def _to_device(self, *parts64: np.ndarray, parts32: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group packed into a staging buffer, then one copy per group to the device (on CPU
        the staging buffers are the batch's tensors: no copy at all)."""
        s64, s32 = self._stage[self._flip]
        self._flip ^= 1
        out = []
        for stage, parts in ((s64, parts64), (s32, parts32)):
            view = stage.numpy()
            at = 0
            for a in parts:
                view[at : at + a.size] = a.ravel()
                at += a.size
            t = stage[:at]
            out.append(t if self.device.type == "cpu" else t.to(self.device, non_blocking=True))
        return out[0], out[1]

    def advance(self, batch: Batch, sampled: list[int]) -> None:
        """After the step, with the sampled ids at hand (host): each row's position moves past its
        computed tokens and its next input is the token just sampled, or the next prompt token of
        an unfinished prefill."""
        _, srows = self.advance_pending(batch, None)
        self.next_token[srows] = sampled

    def advance_pending(self, batch: Batch, sampled: torch.Tensor | None) -> tuple[int, np.ndarray]:
        """After the step, before its ids reach the host: positions move on, and each sampling
        row's next input is its id in `sampled` (S,), on the device, until resolve() gives it.
        Returns the step's generation and the sampling rows (for resolve)."""
        rows = self._rows
        self.position[rows] += self._num_tokens
        self._gen += 1
        self._feed = sampled
        n = len(batch.sampling)
        srows = self._srows
        if not n == batch.num_decodes == len(batch.requests):  # not decode-only: some rows do not sample
            sampled_ids = set(map(id, batch.sampling))
            for r, row in zip(batch.requests, rows.tolist()):
                if id(r) not in sampled_ids:  # a prefill chunk short of the prompt's end
                    self.next_token[row] = _token_at(r, int(self.position[row]))
        self.length[srows] += 1
        if sampled is not None:
            self.pending_src[srows] = np.arange(n)
            self.pending_gen[srows] = self._gen
        return self._gen, srows

    def resolve(self, gen: int, srows: np.ndarray, values: np.ndarray) -> None:
        """The ids step `gen` sampled, now on the host (values[j] for srows[j]): the rows still
        pending on that step take them as their next input. (A row freed since has no pending id,
        and a row taken by another request since starts with none; a later step's own pending id
        is left for its own resolve.)"""
        keep = (self.pending_gen[srows] == gen) & (self.pending_src[srows] >= 0)
        rows = srows[keep]
        self.next_token[rows] = values[keep]
        self.pending_src[rows] = -1
        if gen == self._gen:  # the last step launched: no row is pending any more
            self._feed = None

_NONE = np.zeros(0, dtype=np.int64)


def _buffer(n: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    t = torch.empty(n, dtype=dtype)
    return t.pin_memory() if pin else t


def _token_at(req: Request, i: int) -> int:
    """The request's token at position i (0 when there is none yet: it will be sampled)."""
    n = req.num_prompt_tokens
    if i < n:
        return req.prompt_token_ids[i]
    j = i - n
    return req.output_token_ids[j] if j < len(req.output_token_ids) else 0
