"""A launched step whose sampled ids have not reached the host yet (asynchronous scheduling).

With asynchronous scheduling the engine launches step n+1 before it reads step n's ids: the host
schedules and prepares n+1 while the device still runs n, and n's ids feed n+1's inputs on the
device (batch_state.py). The ids come to the host through a non-blocking copy into pinned memory
with an event recorded after it, so reading them later waits for that step alone, never for the
step launched since. On CPU the "device" has finished by the time the step returns: the copy is
the ids tensor itself and there is nothing to wait for.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gateway.worker.request import Request


class HostIds:
    """Device ids -> host without waiting. Two pinned buffers, used alternately: at most one step
    is unread while the next one's copy is in flight."""

    def __init__(self, device: torch.device, capacity: int):
        self.cuda = device.type == "cuda"
        self._bufs = [torch.empty(capacity, dtype=torch.int64, pin_memory=True) for _ in range(2)] if self.cuda else []
        self._flip = 0

    def start(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Begin the copy of ids (S,) int64; returns the host tensor and the event to wait on."""
        if not self.cuda:
            return ids, None
        buf = self._bufs[self._flip][: ids.shape[0]]
        self._flip ^= 1
        buf.copy_(ids, non_blocking=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        return buf, event


@dataclass(slots=True)
class PendingStep:
    """A step launched, its ids maybe still on their way."""

    gen: int  # the batch state's generation of the step
    rows: np.ndarray  # the sampling requests' batch rows then
    sampling: list[Request]  # the requests that sampled, in the ids' order
    skipped: list[Request]  # those given no placeholder token (finished while the step ran)
    ended: list[Request]  # those the length ended (their last token is still to come)
    host: torch.Tensor  # (S,) int64 on the host once `event` has fired
    event: torch.cuda.Event | None
    needs_values: bool  # a sampling request's next step needs this step's values on the host

    def values(self) -> tuple[list[int], np.ndarray]:
        """The ids, as Python ints and as an array (waits for this step's copy only)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist(), self.host.numpy()
