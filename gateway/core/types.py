"""Messages that cross process boundaries."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

LOAD_HEADER = "x-meshgate-load"


@dataclass(frozen=True, slots=True)
class LoadReport:
    """A pool's load as its worker reports it (GET /load, and compactly in LOAD_HEADER)."""

    waiting: int = 0  # requests queued for admission
    running: int = 0  # requests in the running batch
    queued_prompt_tokens: int = 0  # prompt tokens still to prefill
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefill_tps: float = 0.0  # prefill tokens/s the pool achieves when prefilling (EWMA)
    decode_tps: float = 0.0  # output tokens/s over the recent window
    queue_wait_s: float = 0.0  # estimated wait before a new request's first step
    hot_prefix_hashes: tuple[int, ...] = field(default_factory=tuple)
    handling_s: float = 0.0  # the pool's own time to answer this report

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_header(self) -> str:
        return (
            f"w={self.waiting};r={self.running};q={self.queued_prompt_tokens};"
            f"kv={self.kv_blocks_used}/{self.kv_blocks_total};qw={self.queue_wait_s:.4f}"
        )

    @classmethod
    def from_header(cls, value: str) -> LoadReport:
        """Parse LOAD_HEADER; raises ValueError on a malformed value."""
        parts = dict(p.split("=", 1) for p in value.split(";") if p)
        used, total = parts["kv"].split("/", 1)
        return cls(
            waiting=int(parts["w"]),
            running=int(parts["r"]),
            queued_prompt_tokens=int(parts["q"]),
            kv_blocks_used=int(used),
            kv_blocks_total=int(total),
            queue_wait_s=float(parts["qw"]),
        )
