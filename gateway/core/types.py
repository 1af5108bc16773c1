"""Messages that cross process boundaries."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.core.prefix import PrefixHolder



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
    # Headroom, for gateways to judge how likely a pool is to be full by the time a request gets
    # there (gateway/routing/latency.py); 0: not reported (third-party pools, older workers)
    max_num_seqs: int = 0  # sequence slots of the running batch
    mean_request_s: float = 0.0  # how long a request holds a slot, first token to finish (EWMA)
    # Tokens a KV block holds: with kv_blocks_total, the pool's cache size in tokens (a gateway
    # forgets what it sent there once it has sent more since: gateway/routing/prefix_index.py); 0: unknown
    kv_block_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_header(self) -> str:
        return (
            f"w={self.waiting};r={self.running};q={self.queued_prompt_tokens};"
            f"kv={self.kv_blocks_used}/{self.kv_blocks_total};qw={self.queue_wait_s:.4f};"
            f"s={self.max_num_seqs};d={self.mean_request_s:.3f}"
        )

    def to_stream_line(self) -> str:
        """A line of GET /load/stream: the header's fields plus the advertised prefix hashes (h=,
        hex, comma-separated; bounded by the worker's advertised count)."""
        return self.to_header() + ";h=" + ",".join(f"{h:x}" for h in self.hot_prefix_hashes)

    @classmethod
    def from_header(cls, value: str, rates: LoadReport | None = None) -> LoadReport:
        """Parse LOAD_HEADER; raises ValueError on a malformed value. s= and d= are optional (a
        worker older than them does not send them), and h= (prefix hashes: stream lines only).
        rates: a report whose prefill/decode rates (and hot prefixes, without h=) to keep."""
        parts = dict(p.split("=", 1) for p in value.split(";") if p)
        used, total = parts["kv"].split("/", 1)
        hot = rates.hot_prefix_hashes if rates is not None else ()
        if "h" in parts:
            got = tuple(int(h, 16) for h in parts["h"].split(",") if h)
            hot = hot if got == hot else got  # the same tuple when unchanged: readers cache by identity
        return cls(
            waiting=int(parts["w"]),
            running=int(parts["r"]),
            queued_prompt_tokens=int(parts["q"]),
            kv_blocks_used=int(used),
            kv_blocks_total=int(total),
            prefill_tps=rates.prefill_tps if rates is not None else 0.0,
            decode_tps=rates.decode_tps if rates is not None else 0.0,
            queue_wait_s=float(parts["qw"]),
            hot_prefix_hashes=hot,
            max_num_seqs=int(parts.get("s", 0)),
            mean_request_s=float(parts.get("d", 0.0)),
            kv_block_tokens=rates.kv_block_tokens if rates is not None else 0,
        )


class Endpoint:
    """The gateway's live view of one pool, refreshed by background tasks (probes, responses).

    Routing plug-ins only read it; nothing on the request path copies it.
    """

    __slots__ = ("pool_id", "url", "site", "kind", "models", "healthy", "breaker_open", "in_flight",
                 "load", "load_at", "load_pushed", "rtt_ms", "country", "prior_rtt_ms", "sent_since_report",
                 "prefix", "capabilities", "connection_wait_s", "first_byte_excess_s")

    def __init__(self, pool_id: str, url: str, site: str | None, kind: str, models: frozenset[str],
                 capabilities: frozenset[str] | None = None):
        self.pool_id = pool_id
        # endpoints and features it serves (core/capabilities.py); None: any (older callers, tests)
        self.capabilities = capabilities
        self.url = url
        self.site = site
        self.kind = kind
        self.models = models
        self.healthy = True  # until probes say otherwise
        self.breaker_open = False
        self.in_flight = 0  # requests this gateway has sent and not seen finish
        self.sent_since_report = 0  # requests sent since `load` was reported (in-flight crediting)
        self.load: LoadReport | None = None  # latest report (probe or response header)
        self.load_at = 0.0  # monotonic time of that report (0: unknown; routing takes it as fresh)
        # The pool pushes its reports to us (GET /load/stream is up): it would have said if `load`
        # had changed, so routing takes it as current however long ago it came
        self.load_pushed = False
        self.rtt_ms: float | None = None  # probe round trip, EWMA
        self.country: str | None = None  # ISO-2 of its site, for residency
        self.prior_rtt_ms: float | None = None  # RTT estimated (network coordinates, else distance) until probes measure it
        # What the gateway knows of the pool's prefix cache (gateway/routing/prefix_index.py); None: nothing
        self.prefix: PrefixHolder | None = None
        # Recent waits for a free connection to the pool (EWMA over requests, seconds; 0 while none
        # wait): its connection cap reached is a queue the pool's own report cannot show
        self.connection_wait_s = 0.0
        # How much later than predicted its first bytes have come lately (seconds, >= 0; kept by
        # gateway/routing/lateness.py): a lateness that probes and load reports do not show
        self.first_byte_excess_s = 0.0

    def __repr__(self) -> str:
        return f"Endpoint({self.pool_id}, healthy={self.healthy}, in_flight={self.in_flight})"


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What routing may know of a request."""

    model: str
    prompt_chars: int = 0
    max_tokens: int | None = None
    priority: int = 0
    client_rtt_ms: float = 0.0  # client <-> this gateway (same for every pool; counts toward SLOs)
    countries: frozenset[str] | None = None  # residency: sites it may be served in; None: anywhere
    ttft_slo_s: float | None = None  # x-meshgate-ttft-slo-ms
    prefix_key: str = ""  # start of the prompt, for prefix affinity
    # Prefix-aware routing (gateway/core/prefix.py): the prompt's chunk hashes, the tokens one chunk
    # stands for (learned chars-to-tokens x chunk size, or exact for token-id prompts), and the
    # session's last pool (gateway/routing/prefix_index.py) with the chunks its last turn had
    prefix_hashes: tuple[int, ...] = ()
    tokens_per_chunk: float = 0.0
    session_key: str = ""  # prompt_cache_key, else user, else x-session-id
    session_pool: str = ""
    session_chunks: int = 0
    tokens_per_char: float = 0.25  # the gateway does not tokenize: learned from pools' usage answers
    needs: frozenset[str] = frozenset()  # capabilities the serving pool must have (core/capabilities.py)

    @property
    def prompt_tokens(self) -> int:
        return max(1, int(self.prompt_chars * self.tokens_per_char))
