"""A generation request as the engine sees it, and its sampling parameters."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.core.prefix import PrefixChunks

_arrival_counter = itertools.count()


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to report per sampled token
    # Logit processing (gateway/worker/logits.py)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    grammar: Any = None  # a compiled grammar (structured.py) the output must follow; None: free

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5


class RequestStatus(enum.IntEnum):
    """Ordered: every status after RUNNING is finished."""

    WAITING = 0
    PREEMPTED = 1
    RUNNING = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower runs first (0 = contracted, 1 = on-demand)
    eos_token_id: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full token blocks
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    arrival_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    finish_s: float | None = None
    stop_reason: str | int | None = None
    batch_row: int = -1  # its row in the engine's persistent batch state (-1: none)
    # FCFS order within a priority class; a preempted request keeps its place.
    arrival_seq: int = field(default_factory=lambda: next(_arrival_counter))
    prefix_chunks: PrefixChunks | None = None  # its chunk hashes, for the pool's advertised prefixes

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.arrival_seq)

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        if self.status == RequestStatus.FINISHED_STOPPED:
            return "stop"
        if self.status == RequestStatus.FINISHED_LENGTH:
            return "length"
        if self.status == RequestStatus.FINISHED_ABORTED:
            return "abort"
        return None
