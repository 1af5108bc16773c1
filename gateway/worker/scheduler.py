"""Iteration-level scheduler: one token budget per step, running requests first.

Each step: every running request gets its next tokens (one for decode, a chunk for an unfinished
prefill) in priority order; when KV blocks run out the lowest-priority, latest running request is
preempted (its blocks freed, recomputed later). Then waiting requests are admitted, in priority
order, while their first chunk fits in the remaining budget, sequence slots and KV blocks.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from gateway.worker.kv_cache import BlockManager
from gateway.worker.request import Request, RequestStatus


_FINISHED = int(RequestStatus.FINISHED_STOPPED)  # status >= this: finished (an int compare, hot loops)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 1024


@dataclass(slots=True)
class SchedulerOutput:
    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens scheduled per request this step
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: BlockManager):
        self.config = config
        self.kv = kv
        self.waiting: list[Request] = []  # sorted by Request.sort_key
        self.running: list[Request] = []  # sorted by Request.sort_key
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- queue operations -------------------------------------------------------------------
    def add(self, request: Request) -> None:
        assert request.request_id not in self.requests, request.request_id
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request (stop, length or abort) and free its blocks at once."""
        assert status.finished
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif not request.finished:
            self.waiting.remove(request)
        self.kv.free_request(request)
        request.status = status
        self.requests.pop(request.request_id, None)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free_request(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # Decodes first, then unfinished prefills, each in priority order: a decode never waits
        # behind a prefill chunk, whatever the classes. (Hot loop: locals, no property calls.)
        left = [(r, len(r.prompt_token_ids) + len(r.output_token_ids) - r.num_computed_tokens) for r in self.running]
        order = [p for p in left if p[1] == 1] + [p for p in left if p[1] > 1]
        running, bs, kv = RequestStatus.RUNNING, self.kv.block_size, self.kv
        for req, remaining in order:
            if budget <= 0:
                break
            if req.status != running:  # preempted earlier in this step
                continue
            n = min(budget, remaining)
            if req.num_computed_tokens + n <= len(req.block_ids) * bs:  # fits the blocks it holds
                out.requests.append(req)
                out.num_tokens.append(n)
                budget -= n
                continue
            while not kv.allocate_slots(req, n):
                victim = self.running[-1]  # lowest priority, latest arrival
                if victim in out.requests:  # scheduled earlier in this step: give its tokens back
                    i = out.requests.index(victim)
                    out.requests.pop(i)
                    budget += out.num_tokens.pop(i)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.requests.append(req)
                out.num_tokens.append(n)
                budget -= n
        # After a preemption the cache is full: admitting more now would only thrash.
        while (
            not out.preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            computed = self.kv.get_computed_blocks(req)
            num_cached = len(computed) * self.kv.block_size
            n = min(req.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(req, n, computed):
                break
            self.waiting.pop(0)
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = num_cached
            req.num_computed_tokens = num_cached
            req.status = RequestStatus.RUNNING
            bisect.insort(self.running, req, key=lambda r: r.sort_key)
            out.requests.append(req)
            out.num_tokens.append(n)
            budget -= n
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Account for the step's computed tokens and append sampled tokens; finish requests that
        hit EOS, a stop token or max_tokens. Returns the requests that got a new token.
        (update_counts then accept_tokens: the engine runs the two apart, a step apart when
        scheduling asynchronously.)"""
        sampling = [r for r in out.requests if r.request_id in sampled]
        skipped, ended = self.update_counts(out, sampling)
        return self.accept_tokens(sampling, [sampled[r.request_id] for r in sampling], skipped, ended)

    def update_counts(self, out: SchedulerOutput, sampling: list[Request]) -> tuple[list[Request], list[Request]]:
        """The part of a step's update that needs no token values: computed tokens move on, full
        blocks are offered to the prefix cache, and each sampling request gets a placeholder token
        (-1, its value comes with accept_tokens); one that reached max_tokens or the context ends
        with "length" (EOS on the same token turns it into "stop" in accept_tokens). Returns the
        sampling requests given no placeholder (finished while the step ran: their token is
        dropped) and those the length ended."""
        fin = _FINISHED
        kv, bs, caching = self.kv, self.kv.block_size, self.kv.enable_prefix_caching
        # Decode-only with every request sampling (the steady state): `sampling` is out.requests in
        # the same order (batch_state), each with one token, and one loop does both parts.
        fused = len(sampling) == len(out.requests) == out.total_tokens
        if not fused:
            for req, n in zip(out.requests, out.num_tokens):
                if req.status >= fin:  # aborted or stopped while the step ran
                    continue
                c = req.num_computed_tokens = req.num_computed_tokens + n
                if caching and c // bs > req.num_registered_blocks:
                    kv.cache_full_blocks(req)  # a block filled up
        skipped: list[Request] = []
        ended: list[Request] = []
        max_len = self.config.max_model_len
        for req in sampling:
            if req.status >= fin:
                skipped.append(req)
                continue
            if fused:
                c = req.num_computed_tokens = req.num_computed_tokens + 1
                if caching and c // bs > req.num_registered_blocks:
                    kv.cache_full_blocks(req)
            outs = req.output_token_ids
            outs.append(-1)
            if len(outs) >= req.params.max_tokens or len(req.prompt_token_ids) + len(outs) >= max_len:
                self.finish(req, RequestStatus.FINISHED_LENGTH)
                ended.append(req)
        return skipped, ended

    def accept_tokens(self, sampling: list[Request], tokens: list[int], skipped: list[Request],
                      ended: list[Request]) -> list[Request]:
        """The values of the placeholders update_counts(…, sampling) gave (tokens[j] for
        sampling[j]): an EOS or stop token ends its request with "stop" (also when the length ended
        it on the same token). A request that finished since (abort, stop string) loses its
        placeholder. Returns the requests that got their token."""
        fin = _FINISHED
        skip = {id(r) for r in skipped} if skipped else None
        end = {id(r) for r in ended} if ended else None
        advanced: list[Request] = []
        for req, token in zip(sampling, tokens):
            outs = req.output_token_ids
            if req.status >= fin:
                if skip is not None and id(req) in skip:
                    continue
                if end is None or id(req) not in end:  # finished since: its token is dropped
                    del outs[-1]
                    if req.params.logprobs is not None and req.output_logprobs:
                        del req.output_logprobs[-1]
                    continue
            outs[-1] = token
            advanced.append(req)
            p = req.params
            if (token == req.eos_token_id and not p.ignore_eos) or (p.stop_token_ids and token in p.stop_token_ids):
                req.stop_reason = token
                if req.status == RequestStatus.FINISHED_LENGTH:  # blocks already freed
                    req.status = RequestStatus.FINISHED_STOPPED
                else:
                    self.finish(req, RequestStatus.FINISHED_STOPPED)
        return advanced

    # -- load figures -----------------------------------------------------------------------
    def num_queued_prompt_tokens(self) -> int:
        """Tokens still to prefill: all of each waiting request, the rest of running prefills."""
        queued = sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)
        queued += sum(
            r.num_tokens - r.num_computed_tokens - 1
            for r in self.running
            if r.num_computed_tokens < r.num_tokens - 1
        )
        return queued
