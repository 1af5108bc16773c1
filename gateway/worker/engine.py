"""The engine: Engine.step() = schedule -> update the batch state -> run model -> sample -> update
-> process outputs.

Engine is single-threaded; AsyncEngine runs it on its own thread and talks to the event loop
through queues. step_tokens() is the step up to the sampled tokens (the engine's critical path);
process_outputs() turns its TokenEvents into RequestOutputs (detokenization, stop strings) and may
run elsewhere (AsyncEngine runs it on the event loop).

Asynchronous scheduling (EngineConfig.async_scheduling, pipeline.py): step_tokens() launches step
n, then reads step n-1's ids (which the device has produced meanwhile, or soon will) and returns
n-1's events. What needs no token values (computed tokens, blocks, max_tokens) is accounted at
launch: each sampling request gets a placeholder token, so step n+1 is scheduled with the right
counts; EOS and stop tokens are known one step late, and a request they end has its extra step's
token dropped (its blocks are freed at once; the device writes nothing after the step in flight).
A step where a request's next step needs the previous values on the host (penalties, grammars,
logprobs) waits for them first. Token for token the outputs equal the synchronous engine's.
"""
from __future__ import annotations

import gc
import logging
import os
import time
from collections import deque
from pathlib import Path

import torch

from gateway.config import EngineConfig, ModelConfig
from gateway.core.types import LoadReport
from gateway.worker.batch_state import BatchState
from gateway.worker.kv_cache import BlockManager
from gateway.worker.outputs import OutputProcessor, RequestOutput, TokenEvent
from gateway.worker.prefix_summary import PrefixSummary
from gateway.worker.request import Request, RequestStatus, SamplingParams
from gateway.worker.runner import Runner, make_runner
from gateway.worker.logits import LogitsProcessor
from gateway.worker.pipeline import HostIds, PendingStep
from gateway.worker.sampler import Sampler
from gateway.worker.structured import Grammars
from gateway.worker.scheduler import Scheduler, SchedulerConfig
from gateway.worker.tokenizer import Tokenizer

__all__ = ["Engine", "RequestOutput", "TokenEvent", "model_folder"]

log = logging.getLogger("meshgate.worker")

REQUEST_S_ALPHA = 0.05  # EWMA weight of one finished request in mean_request_s


def model_folder(cfg: ModelConfig) -> Path:
    if cfg.path:
        return Path(cfg.path).expanduser()
    from gateway.worker.tiny import tiny_model_folder

    return tiny_model_folder(cfg.tiny, cfg.cache_dir)


class Engine:
    def __init__(self, model_cfg: ModelConfig, cfg: EngineConfig, runner: Runner | None = None):
        cfg.validate("engine")
        if cfg.device == "cpu":
            torch.set_num_threads(cfg.num_threads or max((os.cpu_count() or 2) - 1, 1))
        folder = model_folder(model_cfg)
        self.model_name = model_cfg.name
        self.cfg = cfg
        self.runner = runner or make_runner(folder, cfg)
        mc = getattr(self.runner, "config", None)
        self.tokenizer = Tokenizer(folder, eos_token_id=getattr(mc, "eos_token_id", None))
        self.kv = BlockManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.prefixes = PrefixSummary()  # the chunks the cache backs, advertised in load reports
        self.scheduler = Scheduler(
            SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len), self.kv
        )
        self.sampler = Sampler()
        self.batch_state = BatchState(cfg.max_num_seqs, cfg.max_model_len, cfg.block_size, self.runner.device,
                                      cfg.max_num_batched_tokens)
        self.batch_state.seed_of = lambda req: self.sampler.seed_of(req)  # whichever sampler is set
        self.outputs = OutputProcessor(self.tokenizer)
        self._last_advanced: list[Request] = []  # the requests of the last step_tokens' events
        # the logits' width: the model's vocabulary (may exceed the tokenizer's)
        self.vocab_size = int(getattr(mc, "vocab_size", 0) or self.tokenizer.vocab_size)
        self.logits = LogitsProcessor(self.vocab_size)
        self.grammars = Grammars(self.tokenizer, self.vocab_size)
        self.stats = _StepStats()
        mode = cfg.async_scheduling
        self.async_scheduling = mode == "on" or (mode == "auto" and self.runner.device.type == "cuda")
        self._host_ids = HostIds(self.runner.device, cfg.max_num_seqs)
        self._pending: PendingStep | None = None  # the launched step whose ids are not read yet
        self._special: set[str] = set()  # ids of live requests with logit processing or logprobs
        self.num_aborted = 0
        self.mean_request_s = 0.0  # how long a finished request held its slot (EWMA); 0: none yet

    def warm_up(self, num_tokens: int = 256) -> None:
        """Run one prefill and a few decode steps before serving: the first steps pay one-off costs
        (allocator, kernels), and the load report then carries a measured prefill speed from the
        start. A pool that reported none would look as fast as the gateway's default guess."""
        n = min(num_tokens, self.cfg.max_model_len - 8, self.cfg.max_num_batched_tokens)
        req = Request("warm-up", [i % max(self.tokenizer.vocab_size - 1, 1) + 1 for i in range(n)],
                      SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        self.add_request(req)
        while self.has_work():
            self.step()
        self.kv.reset_prefix_cache()
        self.mean_request_s = 0.0  # the warm-up's 4 tokens say nothing about real requests
        # Everything alive now (model, tokenizer, tables) lives as long as the engine: leave it
        # out of the collector's full passes, which otherwise walk it all in the middle of a step.
        gc.collect()
        gc.freeze()

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a request. Raises ValueError for a prompt that cannot fit the context: since the
        KV cache holds one max_model_len sequence (EngineConfig.validate), every request can run."""
        if not 0 < req.num_prompt_tokens < self.cfg.max_model_len:
            raise ValueError(f"prompt of {req.num_prompt_tokens} tokens; the context is {self.cfg.max_model_len}")
        if req.eos_token_id is None:
            req.eos_token_id = self.tokenizer.eos_token_id
        # a continuation (worker/resume.py) brings its earlier tokens: their text reached the client
        # already; the seeded sampler's draws follow the output index, so they continue by themselves
        self.outputs.add(req.request_id, req.params.stop, primed=req.output_token_ids)
        self.scheduler.add(req)
        if _special(req):
            self._special.add(req.request_id)

    def abort_request(self, request_id: str) -> bool:
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return False
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self._forget(req)
        self.outputs.forget(request_id)
        self.num_aborted += 1
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._pending is not None

    def abort_all(self) -> list[str]:
        """End every request, the running, the waiting and those whose last token is in flight
        (after a failed step). Returns their ids."""
        ids = list(self.scheduler.requests)
        for rid in ids:
            self.abort_request(rid)
        if self._pending is not None:
            ids += [r.request_id for r in self._pending.ended]
            self._pending = None
        return ids

    def _forget(self, req: Request) -> None:
        """Engine-side state of a request that ended (the output side forgets on its own)."""
        self.batch_state.remove(req)
        self.sampler.forget(req.request_id)
        self.logits.forget(req.request_id)
        self._special.discard(req.request_id)

    def finish_stopped(self, stopped: list[tuple[Request | str, str]]) -> None:
        """End requests the output side found a stop string in: (request or its id, the string)."""
        now = time.monotonic()
        for key, stop in stopped:
            req = self.scheduler.requests.get(key) if isinstance(key, str) else key
            if req is None:
                continue
            req.stop_reason = stop
            if not req.finished:
                self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
                self._finished(req, now)
            elif req.status == RequestStatus.FINISHED_LENGTH:  # the stop came with the last token
                req.status = RequestStatus.FINISHED_STOPPED

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step with its outputs processed inline (a stop string ends its request at once)."""
        events = self.step_tokens()
        outputs, stopped = self.process_outputs(events)
        if stopped:  # inline, the request objects are at hand (a finished one has left the scheduler)
            reqs = {r.request_id: r for r in self._last_advanced}
            self.finish_stopped([(reqs[rid], stop) for rid, stop in stopped])
        return outputs

    def process_outputs(self, events: list[TokenEvent]) -> tuple[list[RequestOutput], list[tuple[str, str]]]:
        return self.outputs.process(events)

    def step_tokens(self) -> list[TokenEvent]:
        """Schedule, run and sample one step; a TokenEvent per request that got a token (with
        asynchronous scheduling: in the step before, whose ids are read after this one launched)."""
        t0 = time.perf_counter()
        events: list[TokenEvent] = []
        pend = self._pending
        if pend is not None and pend.needs_values:  # the next step needs its values first
            events = self._resolve(pend)
            pend = self._pending = None
        sched = self.scheduler.schedule()
        state = self.batch_state
        for victim in sched.preempted:
            state.remove(victim)
        if not sched:
            if pend is not None:
                events += self._resolve(pend)
                self._pending = None
            return events
        batch = state.prepare(sched)
        logits = self.runner.execute(batch)
        special = bool(self._special) and any(r.request_id in self._special for r in batch.sampling)
        if special:
            logits = self.logits.process(logits, batch.sampling)  # penalties, bias, grammars
        tokens = self.sampler.sample_ids(logits, batch.sampling, batch.settings)
        if special:
            self.sampler.record_logprobs(logits, batch.sampling, tokens)
        gen, srows = state.advance_pending(batch, tokens)
        host, event = self._host_ids.start(tokens)
        # Step n is on its way: now the values of step n-1 (EOS and stop tokens end requests
        # before step n's counts, as they would have before step n's scheduling).
        if pend is not None:
            events += self._resolve(pend)
        skipped, ended = self.scheduler.update_counts(sched, batch.sampling)
        for r in ended:  # max_tokens or the context: its row goes now, its event with the value
            state.remove(r)
        self._pending = PendingStep(gen, srows, batch.sampling, skipped, ended, host, event, special)
        if not self.async_scheduling:
            events += self._resolve(self._pending)
            self._pending = None
        num_decode = batch.num_decodes
        self.stats.record(t0, time.perf_counter(), batch.num_tokens - num_decode, num_decode, len(events))
        return events

    def _resolve(self, pend: PendingStep) -> list[TokenEvent]:
        """Read a launched step's ids: fill its placeholders, end the requests an EOS or stop token
        ends, and make the step's events. A request that finished (abort, stop string, EOS a step
        before) since the step launched has its token dropped."""
        values, array = pend.values()
        self.batch_state.resolve(pend.gen, pend.rows, array)
        if pend.needs_values:
            self.logits.accept(pend.sampling, values)  # grammars and penalty counts
        advanced = self.scheduler.accept_tokens(pend.sampling, values, pend.skipped, pend.ended)
        now = time.monotonic()
        events = []
        fin, stopped = RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_STOPPED
        event = TokenEvent
        for req in advanced:  # token_event(req), inlined: once per sequence and step
            if req.first_token_s is None:
                req.first_token_s = now
                self.prefixes.served(req, req.prefix_chunks, self.cfg.block_size)
            outs, status = req.output_token_ids, req.status
            token = outs[-1]
            events.append(event(req.request_id, token, status, status == stopped and req.stop_reason == token,
                                req.output_logprobs[-1] if req.params.logprobs is not None else None,
                                len(req.prompt_token_ids), len(outs), req.num_cached_tokens))
            if status >= fin:
                self._finished(req, now)
        self._last_advanced = advanced
        return events

    def _finished(self, req: Request, now: float) -> None:
        req.finish_s = now
        self._record_duration(req, now)
        self._forget(req)

    def _record_duration(self, req: Request, now: float) -> None:
        """Time in the batch: first token to finish, plus the prefill (at the measured speed)."""
        assert req.first_token_s is not None
        tps = self.stats.prefill_tps
        d = now - req.first_token_s + (req.num_prompt_tokens / tps if tps > 0 else 0.0)
        m = self.mean_request_s
        self.mean_request_s = d if m == 0.0 else m + REQUEST_S_ALPHA * (d - m)

    # -- load -------------------------------------------------------------------------------
    def load_report(self) -> LoadReport:
        s = self.scheduler
        queued = s.num_queued_prompt_tokens()
        prefill_tps = self.stats.prefill_tps
        return LoadReport(
            waiting=len(s.waiting),
            running=len(s.running),
            queued_prompt_tokens=queued,
            kv_blocks_used=self.kv.num_used_blocks,
            kv_blocks_total=self.kv.num_blocks,
            kv_block_tokens=self.kv.block_size,
            prefill_tps=prefill_tps,
            decode_tps=self.stats.decode_tps(),
            queue_wait_s=self.queue_wait_s(queued),
            hot_prefix_hashes=self.prefixes.advertise(self.kv),
            max_num_seqs=self.cfg.max_num_seqs,
            mean_request_s=self.mean_request_s,
        )

    def queue_wait_s(self, queued_prompt_tokens: int | None = None) -> float:
        """The wait predicted for a request added now, before its first step: the prefill backlog
        plus the wait for a sequence slot (the load report's queue_wait_s, and what refusal uses)."""
        queued = self.scheduler.num_queued_prompt_tokens() if queued_prompt_tokens is None else queued_prompt_tokens
        prefill_tps = self.stats.prefill_tps
        return (queued / prefill_tps if prefill_tps > 0 else 0.0) + self._slot_wait_s()

    def _slot_wait_s(self) -> float:
        """How long a new request waits for a sequence slot when the batch is full: until enough
        running requests finish to admit it and those queued ahead (at their max_tokens, so an
        upper estimate; EOS only shortens it)."""
        s = self.scheduler
        ahead = len(s.waiting) + 1 - (self.cfg.max_num_seqs - len(s.running))
        if ahead <= 0 or not s.running:
            return 0.0
        left = sorted(r.params.max_tokens - len(r.output_token_ids) for r in s.running)
        return left[min(ahead, len(left)) - 1] * self.stats.decode_step_s


def _special(req: Request) -> bool:
    """It asks for logit processing or logprobs. Its next step then needs this step's token on the
    host (penalties and grammars count it; logprobs are recorded when sampled and read with the
    step's token), so a step it samples in is read before the next one is launched."""
    p = req.params
    return bool(p.grammar is not None or p.frequency_penalty or p.presence_penalty or p.logit_bias
                or p.logprobs is not None)


class _StepStats:
    """Throughput figures for the load report: prefill capacity (EWMA over steps that prefill)
    and output tokens/s over a sliding window."""

    WINDOW_S = 5.0

    def __init__(self) -> None:
        self.prefill_tps = 0.0
        self.recent: deque[tuple[float, int]] = deque()  # (end time, tokens sampled)
        self.num_steps = 0
        self.step_time_s = 0.0
        self.decode_step_s = 0.0  # EWMA duration of steps with no prefill

    def record(self, t0: float, t1: float, num_prefill: int, num_decode: int, num_sampled: int) -> None:
        dt = max(t1 - t0, 1e-6)
        self.num_steps += 1
        self.step_time_s += dt
        if num_prefill > 0:
            tps = (num_prefill + num_decode) / dt
            self.prefill_tps = tps if self.prefill_tps == 0 else 0.8 * self.prefill_tps + 0.2 * tps
        else:
            self.decode_step_s = dt if self.decode_step_s == 0 else 0.8 * self.decode_step_s + 0.2 * dt
        self.recent.append((t1, num_sampled))
        while self.recent and self.recent[0][0] < t1 - self.WINDOW_S:
            self.recent.popleft()

    def decode_tps(self) -> float:
        if not self.recent:
            return 0.0
        now = time.perf_counter()
        while self.recent and self.recent[0][0] < now - self.WINDOW_S:
            self.recent.popleft()
        return sum(n for _, n in self.recent) / self.WINDOW_S
