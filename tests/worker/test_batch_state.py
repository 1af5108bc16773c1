"""The persistent batch state gives, step after step, the batch build_batch makes from scratch:
through chunked prefill, prefix-cache hits, preemption, finishing and aborts."""
from __future__ import annotations

import random

import torch

from gateway.worker.batch import build_batch
from gateway.worker.batch_state import BatchState
from gateway.worker.kv_cache import BlockManager
from gateway.worker.request import Request, RequestStatus, SamplingParams
from gateway.worker.scheduler import Scheduler, SchedulerConfig

FIELDS = ("input_ids", "positions", "query_start_loc", "seq_lens", "slot_mapping", "block_table", "logits_indices")


def test_incremental_batches_equal_rebuilt_ones() -> None:
    rng = random.Random(0)
    bs = 4
    kv = BlockManager(40, bs, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=24, max_model_len=96), kv)
    state = BatchState(8, 96, bs, "cpu", 24)
    shared = [rng.randrange(1, 500) for _ in range(10)]
    n_req = 0
    seen = {"preempted": 0, "cached": 0, "mixed": 0, "aborted": 0}
    for step in range(400):
        if n_req < 40 and rng.random() < 0.3:
            prompt = (shared if rng.random() < 0.5 else []) + [rng.randrange(1, 500) for _ in range(rng.randrange(1, 30))]
            sched.add(Request(f"r{n_req}", prompt, SamplingParams(max_tokens=rng.randrange(1, 30), ignore_eos=True)))
            n_req += 1
        if sched.running and rng.random() < 0.03:  # an abort between steps
            victim = rng.choice(sched.running)
            sched.finish(victim, RequestStatus.FINISHED_ABORTED)
            state.remove(victim)
            seen["aborted"] += 1
        out = sched.schedule()
        for v in out.preempted:
            state.remove(v)
            seen["preempted"] += 1
        if not out:
            continue
        want = build_batch(out, bs)
        got = state.prepare(out)
        for f in FIELDS:
            assert torch.equal(getattr(got, f), getattr(want, f)), (step, f)
        assert got.requests == want.requests and got.sampling == want.sampling
        assert got.num_decodes == want.num_decodes
        seen["mixed"] += 0 < got.num_decodes < len(got.requests)
        tokens = [rng.randrange(1, 500) for _ in got.sampling]
        state.advance(got, tokens)
        sched.update(out, {r.request_id: t for r, t in zip(got.sampling, tokens)})
        for r in got.requests:
            if r.finished:
                state.remove(r)
            else:  # the row tracks the request
                assert state.position[r.batch_row] == r.num_computed_tokens
        seen["cached"] = max(seen["cached"], max((r.num_cached_tokens for r in got.requests), default=0))
        if not sched.has_work() and n_req >= 40:
            break
    assert all(v > 0 for v in seen.values()), seen
    assert state.num_rows_used == 0
