"""Configuration: frozen dataclasses for every section, and load_config(), the only YAML reader.

Unknown keys, wrong types and values outside a field's closed set (a `Literal` annotation, or a
name list below) are errors that name the key path and what is allowed (e.g.
`pools[0].engine.dtype: expected one of float32, bfloat16, float16, got 'fp8'`). Mappings load as
read-only views, so a frozen config is immutable all the way down. Components receive only their
own section.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import re
import ssl
import types
import typing
from dataclasses import dataclass, field
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml

from gateway.core.tls import ClientFiles, ServerFiles, client_context, server_context
from gateway.core import capabilities


class ConfigError(ValueError):
    pass


def _frozen_map() -> Mapping[Any, Any]:
    return MappingProxyType({})


# Routing plug-ins and built-in profiles by name: gateway/routing/plugins.py builds them (a test
# keeps the two in step), and profiles in YAML may name only these.
ROUTING_FILTERS = ("serves-model", "available", "residency", "slo")
ROUTING_SCORERS = ("latency", "latency-no-cache", "nearest", "least-load", "prefix-affinity", "prefix-cache")
ROUTING_PICKERS = ("max-score", "round-robin", "random", "p2c")
BUILTIN_PROFILES = ("latency", "latency-no-cache", "prefix", "nearest", "least-load", "round-robin", "random", "p2c")
PoolKind = Literal["meshgate", "openai"]  # our worker | any OpenAI-compatible server
POOL_KINDS: tuple[PoolKind, ...] = ("meshgate", "openai")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass(frozen=True, slots=True)
class TinyModelConfig:
    """The embedded default model, made locally from a seed (nothing is downloaded)."""

    seed: int = 0
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    train_steps: int = 0  # > 0: train this many steps on the bundled text at first start (cached)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str = "meshgate-tiny"
    path: str | None = None  # a Hugging Face folder; None: the tiny model below, made locally
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    cache_dir: str = "~/.cache/meshgate"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    # torch | cuda | tensorrt | null (no model: fixed logits, for host-cost benchmarks)
    runner: Literal["torch", "cuda", "tensorrt", "null"] = "torch"
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    block_size: int = 16
    num_blocks: int = 2048
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    max_waiting: int = 512  # queue bound: more waiting requests are refused with 503
    # Refuse when full: a request carrying `x-meshgate-may-refuse: 1` (a gateway that has other
    # pools left to try) gets 429 at once, without being queued, when the wait predicted for it
    # before its first step (prefill backlog + wait for a batch slot, the load report's
    # queue_wait_s) exceeds this. Requests without the header always queue. None: never refuse.
    # 0.5 s: a wait of seconds (a full batch, estimated from max_tokens) is refused, a prefill
    # backlog of a few prompts is not; a refusal costs the request one more round trip (tens of ms).
    refuse_queue_wait_s: float | None = 0.5
    enable_prefix_caching: bool = True
    # torch intra-op threads; 0: CPUs - 1 (at least 1), so a core busy with other work (the
    # server, another worker) cannot stall OpenMP's spinning threads (benchmarks/RESULTS.md)
    num_threads: int = 0
    # Asynchronous scheduling: the host schedules and prepares step n+1 while the device runs
    # step n, whose sampled ids feed n+1 on the device and reach the host a step later. auto: on
    # for a CUDA device (where host and device overlap), off on CPU (where the "device" is the
    # host: nothing overlaps, and each token would be delivered a step later). benchmarks/RESULTS.md
    async_scheduling: Literal["auto", "on", "off"] = "auto"

    def validate(self, path: str) -> None:
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"{path}.device: expected cpu, cuda or cuda:N, got {self.device!r}")
        _positive(self, path, "block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                  "max_waiting")
        if self.refuse_queue_wait_s is not None and not self.refuse_queue_wait_s >= 0:
            raise ConfigError(f"{path}.refuse_queue_wait_s: must be 0 or positive (or null: never refuse)")
        if self.num_blocks * self.block_size < self.max_model_len:
            raise ConfigError(
                f"{path}: num_blocks * block_size ({self.num_blocks * self.block_size}) must hold "
                f"one max_model_len ({self.max_model_len}) sequence"
            )


TLS_VERSIONS = ("1.2", "1.3")


@dataclass(frozen=True, slots=True)
class TlsServerConfig:
    """TLS on a listening side (a gateway's HTTP and gRPC fronts, a pool worker). Files are PEM, relative
    to the config file; they are re-read when they change (gateway/core/tls.py), no restart needed."""

    cert_file: str | None = None  # None (with key_file): cleartext
    key_file: str | None = None
    client_ca_file: str | None = None  # verify client certificates against this CA (mutual TLS)
    require_client_cert: bool = False  # refuse clients without a certificate the CA signed
    # A client certificate must carry one of these names (DNS SAN or common name); empty: any the CA signed
    allowed_client_names: tuple[str, ...] = ()
    handshake_timeout_s: float = 10.0  # a client that has not finished its handshake by then is dropped
    min_version: str = "1.2"  # 1.2 | 1.3 (the gRPC front keeps grpc's own floor, 1.2)

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    def files(self, alpn: tuple[str, ...] = ("http/1.1",)) -> ServerFiles:
        assert self.cert_file is not None and self.key_file is not None
        return ServerFiles(self.cert_file, self.key_file, self.client_ca_file, self.require_client_cert,
                           self.min_version, alpn)

    def validate(self, path: str) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError(f"{path}: cert_file and key_file go together")
        if self.min_version not in TLS_VERSIONS:
            raise ConfigError(f"{path}.min_version: expected 1.2 or 1.3, got {self.min_version!r}")
        _positive(self, path, "handshake_timeout_s")
        if (self.require_client_cert or self.allowed_client_names) and self.client_ca_file is None:
            raise ConfigError(f"{path}: require_client_cert and allowed_client_names need client_ca_file")
        if self.client_ca_file is not None and not self.enabled:
            raise ConfigError(f"{path}.client_ca_file: needs cert_file and key_file (TLS on)")
        if self.allowed_client_names and not self.require_client_cert:
            raise ConfigError(f"{path}.allowed_client_names: needs require_client_cert: true")

    def check_files(self, path: str) -> None:
        """The files exist and load (a certificate and key that match, a CA bundle). Called by the
        process that serves with them, not at load: gateways and workers share a config, and each
        has only its own certificates (configs/k8s mounts each pod's Secrets)."""
        if self.enabled:
            _check_files(self, path, ("cert_file", "key_file", "client_ca_file"))
            _try_load(lambda: server_context(self.files()), path)

    def validate_front(self, path: str) -> None:
        """The gateway's client-facing fronts: client certificates may be required, names are not checked."""
        self.validate(path)
        if self.allowed_client_names:
            raise ConfigError(f"{path}.allowed_client_names: checked by pool workers only (pools[].tls)")


@dataclass(frozen=True, slots=True)
class TlsClientConfig:
    """How the gateway reaches https pools: the CA it trusts and the certificate it presents."""

    ca_file: str | None = None  # None: the system's trust store (a private CA is the normal case)
    cert_file: str | None = None  # client certificate for pools that require one (mutual TLS), with key_file
    key_file: str | None = None
    server_name: str | None = None  # the name pools' certificates must carry; None: each pool URL's host
    min_version: str = "1.2"  # 1.2 | 1.3

    def files(self) -> ClientFiles:
        return ClientFiles(self.ca_file, self.cert_file, self.key_file, self.min_version)

    def validate(self, path: str) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError(f"{path}: cert_file and key_file go together")
        if self.min_version not in TLS_VERSIONS:
            raise ConfigError(f"{path}.min_version: expected 1.2 or 1.3, got {self.min_version!r}")

    def check_files(self, path: str) -> None:
        """As TlsServerConfig.check_files, for the gateway's upstream client."""
        _check_files(self, path, ("ca_file", "cert_file", "key_file"))
        _try_load(lambda: client_context(self.files()), path)


def _try_load(make: Any, path: str) -> None:
    try:
        make()
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{path}: cannot load the certificate, key or CA files: {e}") from None


def _check_files(section: Any, path: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{path}.{name}: no such file {value!r}")
# The closed set a pool's capabilities are drawn from.
POOL_CAPABILITIES = tuple(sorted(capabilities.ALL))


@dataclass(frozen=True, slots=True)
class PoolConfig:
    id: str
    host: str = "127.0.0.1"
    port: int = 8101
    site: str | None = None
    kind: PoolKind = "meshgate"
    url: str | None = None  # how gateways reach it; default http://host:port
    models: tuple[str, ...] = ()  # models it serves; default (model.name,)
    # `meshgate up` only: emulate this round trip between the gateway and the pool with a delaying
    # proxy listening at `url` and forwarding to host:port
    emulate_rtt_ms: float | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout_s: float = 600.0  # a request still running after this is aborted
    drain_timeout_s: float = 30.0  # on SIGTERM: how long in-flight requests may finish
    # GET /load/stream: gateways that route here subscribe, and get the compact load report (as in
    # the x-meshgate-load header) whenever it changes, looked at every load_stream_interval_s, and
    # again after load_stream_heartbeat_s unchanged (so a silent stream is a dead one). More
    # subscribers than max_load_streams are answered 503 (they fall back to probes).
    load_stream_interval_s: float = 0.01
    load_stream_heartbeat_s: float = 0.5
    max_load_streams: int = 1024
    tls: TlsServerConfig = field(default_factory=TlsServerConfig)  # on: gateways reach it at https://host:port
    # What it serves (gateway/core/capabilities.py): endpoints (chat, completions, responses,
    # embeddings) and features (tools, json_object, json_schema, n, penalties, logit_bias,
    # logprobs). Default: a meshgate worker's full set (it also advertises it in /load); for
    # kind openai, chat and completions with every feature (the server judges those).
    capabilities: tuple[str, ...] | None = None

    def validate(self, path: str) -> None:
        self.tls.validate(f"{path}.tls")
        for c in self.capabilities or ():
            if c not in POOL_CAPABILITIES:
                raise ConfigError(f"{path}.capabilities: unknown capability {c!r} (allowed: {', '.join(POOL_CAPABILITIES)})")
        _positive(self, path, "load_stream_interval_s", "load_stream_heartbeat_s", "max_load_streams")
        if self.load_stream_heartbeat_s < self.load_stream_interval_s:
            raise ConfigError(f"{path}.load_stream_heartbeat_s: must be at least load_stream_interval_s")

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls.enabled else "http"
        return (self.url or f"{scheme}://{self.host}:{self.port}").rstrip("/")

    @property
    def served_models(self) -> tuple[str, ...]:
        return self.models or (self.model.name,)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    connect_timeout_s: float = 1.0
    first_byte_timeout_s: float = 60.0  # until the pool's response headers arrive
    idle_timeout_s: float = 60.0  # max gap between streamed chunks
    # Connections per pool, kept alive and reused; one per request in flight (HTTP/1.1), so the cap
    # is how many requests a pool can have from this gateway at once. A pool that advertises its
    # batch slots (s= in its load header) gets max(max_connections, connections_per_slot x slots).
    # A request that would wait for a connection treats the pool as full: routing tries its next
    # candidate, and only the last one waits, for at most connection_wait_s (counted per pool in
    # meshgate_upstream_connection_waits). Was 256 with a silent wait: at 300 streams to one pool,
    # 44 waited for a whole stream (benchmarks/RESULTS.md, issue 15).
    max_connections: int = 2048
    # Pools tried for one request before it fails. A full pool's refusal costs one round trip, so
    # refusals need room (mesh_sim's attempt sweep: benchmarks/RESULTS.md).
    max_attempts: int = 5
    breaker_failures: int = 5  # consecutive failures that open a pool's circuit
    breaker_cooldown_s: float = 5.0  # open -> half-open (one trial request)
    tls: TlsClientConfig = field(default_factory=TlsClientConfig)  # for https pools (probes and load streams too)
    connections_per_slot: float = 16.0  # see max_connections; 0: the cap is max_connections whatever the pool says
    connection_wait_s: float = 1.0  # the most a request waits for a connection to its last candidate

    def validate(self, path: str) -> None:
        if self.max_connections < 1:
            raise ConfigError(f"{path}.max_connections: must be at least 1")
        if self.connections_per_slot < 0:
            raise ConfigError(f"{path}.connections_per_slot: must not be negative")
        _positive(self, path, "connection_wait_s")


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    # Between rounds (a round lasts as long as its slowest probe). 0.25 s: load reports go stale in
    # well under a second on a busy pool (mesh_sim's probe-period rows: benchmarks/RESULTS.md), and a
    # round is at most k_nearest + num_rotating GET /load whatever the mesh.
    period_s: float = 0.25
    timeout_s: float = 1.0
    down_after: int = 2  # consecutive misses that mark a pool down
    up_after: int = 1  # consecutive answers that mark it up again
    # Large meshes: each period probes the k_nearest pools by estimated RTT plus num_rotating others
    # in turn (geo.probing.CandidateSelector), so probe traffic is O(k), not O(pools).
    k_nearest: int = 32
    num_rotating: int = 8


@dataclass(frozen=True, slots=True)
class LoadStreamConfig:
    """Pushed load reports: the gateway keeps a GET /load/stream open to the pools it routes to
    most (its probe.k_nearest nearest and the candidate spill list), so their reports reach it one one-way
    delay after a change instead of up to a probe period later (mesh_sim's stream variants:
    benchmarks/RESULTS.md). Probes go on regardless: they measure RTT and health, and carry
    the load of every pool whose stream is not up."""

    enabled: bool = True
    # per gateway process, the nearest pools first (streams a gateway wants in mesh_sim: benchmarks/RESULTS.md)
    max_streams: int = 256
    connect_timeout_s: float = 1.0  # and the wait for the stream's response head
    # No line for this long (the pool repeats its report every load_stream_heartbeat_s, 0.5 s by
    # default): the stream is taken for dead, closed, and its pool's reports age again
    idle_timeout_s: float = 2.0
    retry_min_s: float = 0.5  # reconnect backoff: doubling from this (with jitter) up to retry_max_s
    retry_max_s: float = 30.0
    # A pool that leaves the wanted set (the spill list changes every probe round) keeps its stream
    # this long, so streams do not flap with it
    linger_s: float = 10.0

    def validate(self, path: str) -> None:
        _positive(self, path, "max_streams", "connect_timeout_s", "idle_timeout_s", "retry_min_s", "retry_max_s")
        if self.retry_max_s < self.retry_min_s:
            raise ConfigError(f"{path}.retry_max_s: must be at least retry_min_s")
        if self.linger_s < 0:
            raise ConfigError(f"{path}.linger_s: must be 0 or positive")


@dataclass(frozen=True, slots=True)
class ResilienceConfig:
    """Streams that outlive their pool (issue 17; gateway/edge/resume.py, hedge.py).

    A stream counts as cut when its pool fails, is marked down (probes missed, breaker open, its
    load stream gone), or stalls: no chunk for stall_factor x the pool's per-stream token interval
    (running / decode tokens/s, from its load report), within [stall_floor_s, stall_cap_s]; while
    the pool's load stream still speaks (its process runs: the gap is load), only stall_cap_s. A cut
    stream is continued on the next pool (same model, residency, key) up to max_resumes times within
    the request's deadline. Before the first byte, an attempt on a streaming request is given up at
    first_byte_factor x its predicted TTFT (within [first_byte_floor_s, first_byte_cap_s]) and at
    half the time the deadline leaves while other pools remain, so the deadline is spent trying pools.
    """

    resume: bool = True
    max_resumes: int = 2
    # Non-stream chat and completion requests to a model only meshgate pools serve are asked of the
    # pool as a stream and continued like one when cut (gateway/edge/whole.py); the client still
    # gets one JSON answer. Off: a failed pool's whole answer is retried from the start elsewhere.
    resume_whole: bool = True
    stall_factor: float = 8.0
    stall_floor_s: float = 1.0
    stall_cap_s: float = 10.0
    first_byte_factor: float = 4.0
    first_byte_floor_s: float = 2.0
    first_byte_cap_s: float = 30.0
    # Hedging: a streaming request with no first byte by hedge_factor x its predicted TTFT (at least
    # hedge_min_s) goes to the runner-up too; the first token wins, the other is cancelled. At most
    # hedge_budget of the requests over the last hedge_window_s are hedged, never to a pool
    # predicted full; x-meshgate-hedge: off (or a key's hedge: false) opts out.
    hedge: bool = True
    hedge_factor: float = 3.0
    hedge_min_s: float = 0.1
    hedge_budget: float = 0.05
    hedge_window_s: float = 60.0

    def validate(self, path: str) -> None:
        _positive(self, path, "stall_factor", "stall_floor_s", "stall_cap_s", "first_byte_factor", "first_byte_floor_s",
                  "first_byte_cap_s", "hedge_factor", "hedge_window_s")
        if self.max_resumes < 0:
            raise ConfigError(f"{path}.max_resumes: must be 0 or positive")
        if self.stall_cap_s < self.stall_floor_s:
            raise ConfigError(f"{path}.stall_cap_s: must be at least stall_floor_s")
        if self.first_byte_cap_s < self.first_byte_floor_s:
            raise ConfigError(f"{path}.first_byte_cap_s: must be at least first_byte_floor_s")
        if not 0 <= self.hedge_budget <= 1:
            raise ConfigError(f"{path}.hedge_budget: must be in [0, 1]")
        if self.hedge_min_s < 0:
            raise ConfigError(f"{path}.hedge_min_s: must be 0 or positive")


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens: int = 8192
    max_prompt_chars: int = 1_000_000
    deadline_s: float = 600.0  # default request deadline; x-meshgate-deadline-ms may shorten it
    max_in_flight: int = 4096  # beyond this the gateway sheds with 503
    # Past this share of max_in_flight, on-demand requests are shed (503) so contracted ones still get in.
    shed_on_demand_at: float = 0.8

    def validate(self, path: str) -> None:
        if not 0 < self.shed_on_demand_at <= 1:
            raise ConfigError(f"{path}.shed_on_demand_at: must be in (0, 1], got {self.shed_on_demand_at}")


_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True, slots=True)
class ApiKeyConfig:
    """One API key, stored as the hex SHA-256 of the key (`meshgate hash-key`), never in clear."""

    id: str  # the name metrics and the usage log show
    sha256: str
    priority: Literal["contracted", "on-demand"] = "on-demand"  # sent to pools in x-meshgate-priority
    models: tuple[str, ...] = ()  # models the key may use; empty: all
    requests_per_min: int = 0  # 0: unlimited
    tokens_per_min: int = 0  # prompt + completion (estimated at admission, settled at the end); 0: unlimited
    max_concurrent: int = 0  # 0: unlimited
    countries: tuple[str, ...] = ()  # residency: ISO-2 countries its requests may be served in; empty: any
    # The operator's views (/dashboard, /v1/meshgate/mesh, .../decisions/stream, .../gateways) and every
    # key's usage: admin keys only. Other keys (tenants) get 403 there and their own /v1/meshgate/usage.
    admin: bool = False
    hedge: bool = True  # false: never race this key's late first tokens on a second pool (gateway.resilience)

    def validate(self, path: str) -> None:
        if not self.id:
            raise ConfigError(f"{path}.id: must not be empty")
        if not _SHA256_HEX.fullmatch(self.sha256):
            raise ConfigError(f"{path}.sha256: expected 64 hex digits (the SHA-256 of the key; see `meshgate hash-key`)")
        for name in ("requests_per_min", "tokens_per_min", "max_concurrent"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name}: must be 0 (unlimited) or positive")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    enabled: bool = False  # off only for the embedded default (loopback); every shared gateway turns it on
    keys: tuple[ApiKeyConfig, ...] = ()  # after loading, also holds the entries of keys_file
    keys_file: str | None = None  # YAML/JSON list of key entries (or {keys: [...]}), relative to the config file
    # Failed key checks (401) allowed per client address a minute; past it that address gets 429 without
    # its key being looked at, until the minute is over. 0: no bound.
    max_failures_per_min: int = 30

    def validate(self, path: str) -> None:
        if self.max_failures_per_min < 0:
            raise ConfigError(f"{path}.max_failures_per_min: must be 0 (no bound) or positive")
        if self.enabled and not self.keys:
            raise ConfigError(f"{path}: enabled, but no keys (set keys or keys_file)")
        for i, k in enumerate(self.keys):
            k.validate(f"{path}.keys[{i}]")
        for what in ("id", "sha256"):
            seen = [getattr(k, what).lower() for k in self.keys]
            dup = sorted({v for v in seen if seen.count(v) > 1})
            if dup:
                raise ConfigError(f"{path}.keys: duplicate {what} {dup[0] if what == 'id' else dup[0][:12] + '...'}")


@dataclass(frozen=True, slots=True)
class UsageLogConfig:
    """The durable usage log: one JSON line per request, appended, fsync'd in batches, rotated by size."""

    path: str | None = None  # None: no log (the Prometheus counters still count)
    flush_every_s: float = 1.0  # a crash loses at most this much
    max_bytes: int = 64 * 1024 * 1024  # rotate to path.1, path.2, ... past this size
    keep: int = 10  # rotated files kept

    def validate(self, path: str) -> None:
        _positive(self, path, "flush_every_s", "max_bytes")
        if self.keep < 0:
            raise ConfigError(f"{path}.keep: must be 0 or positive")


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry tracing; off by default (then OpenTelemetry is not imported at all)."""

    enabled: bool = False
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"  # OTLP over HTTP
    service_name: str = "meshgate-gateway"
    sample_ratio: float = 1.0  # of root spans; a client's sampled flag is followed


@dataclass(frozen=True, slots=True)
class SiteConfig:
    id: str
    name: str = ""
    country: str = ""  # ISO-2
    lat: float = 0.0
    lon: float = 0.0


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    """A routing profile: filters, weighted scorers and a picker, by plug-in name."""

    filters: tuple[str, ...] = ("serves-model", "available", "residency")
    scorers: Mapping[str, float] = field(default_factory=_frozen_map)
    picker: str = "max-score"

    def validate(self, path: str) -> None:
        for i, f in enumerate(self.filters):
            _one_of(f"{path}.filters[{i}]", f, ROUTING_FILTERS)
        for name in self.scorers:
            _one_of(f"{path}.scorers.{name}", name, ROUTING_SCORERS)
        _one_of(f"{path}.picker", self.picker, ROUTING_PICKERS)


@dataclass(frozen=True, slots=True)
class RoutingOptions:
    """What the routing plug-ins need besides the profile's name."""

    profiles: Mapping[str, ProfileConfig] = field(default_factory=_frozen_map)  # extra profiles, by name
    slo_policy: Literal["spill", "shed"] = "spill"  # no pool predicted to meet x-meshgate-ttft-slo-ms: spill to the best, or shed (429)
    # Distance prior: rtt_ms = intercept + inflation * km / 100, as fitted on the 246-city WonderProxy
    # matrix (python -m benchmarks.wonderproxy; its error is in benchmarks/RESULTS.md).
    rtt_inflation: float = 1.705
    rtt_intercept_ms: float = 7.44
    default_prefill_tps: float = 2000.0  # a pool's prefill speed until it reports one
    # The candidate set each decision scores: the nearest usable pools, plus a spill list of
    # farther ones ranked by RTT + expected wait (gateway/routing/candidates.py)
    candidates_near: int = 16
    candidates_spill: int = 8
    client_prefixes: Mapping[str, str] = field(default_factory=_frozen_map)  # CIDR -> site id (client location)
    # Prefix- and session-aware routing (gateway/routing/prefix_index.py). The latency model charges
    # prefill only for the part of a prompt a pool is estimated to hold; False: the whole prompt.
    prefix_routing: bool = True
    # Bound on the gateway's memory of what it sent where: (chunk, pool) pairs over all pools, each
    # ~150 bytes (so 200,000 ~ 30 MB; measured in tests/routing/test_prefix_routing.py and by
    # benchmarks/routing_scale.py), plus at most 17 (time, tokens) marks a pool for ageing by the
    # pool's cache size; and how long one is remembered at most (a pool reporting its cache size
    # forgets sooner: once it has been sent more tokens than its cache holds).
    prefix_index_max_entries: int = 200_000
    prefix_memory_s: float = 600.0
    max_sessions: int = 100_000  # session keys -> the pool that last served them (least recent forgotten)
    # A session's last pool: its predicted TTFT is multiplied by this (a prior, never a pin)
    session_preference: float = 0.9
    # First bytes later than the latency model predicted (gateway/routing/lateness.py): per pool, an
    # EWMA of the excess (alpha: one streamed attempt's weight) added to its predicted TTFT, decaying
    # back to 0 with this half-life when not fed (so a pool late once is tried again). False: not learned.
    first_byte_feedback: bool = True
    first_byte_alpha: float = 0.3
    first_byte_half_life_s: float = 5.0
    # Counted only past this much over the least late pool measured: first-byte jitter (tens of ms
    # on a busy pool) must not outweigh a few ms of network, only a pool really late should move.
    first_byte_slack_s: float = 0.05

    def validate(self, path: str) -> None:
        if not self.first_byte_slack_s >= 0:
            raise ConfigError(f"{path}.first_byte_slack_s: must be 0 or positive, got {self.first_byte_slack_s}")
        if not 0 < self.first_byte_alpha <= 1:
            raise ConfigError(f"{path}.first_byte_alpha: must be in (0, 1], got {self.first_byte_alpha}")
        _positive(self, path, "first_byte_half_life_s", "prefix_index_max_entries", "max_sessions", "prefix_memory_s")
        if not 0 < self.session_preference <= 1:
            raise ConfigError(f"{path}.session_preference: must be in (0, 1], got {self.session_preference}")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    site: str = "local"
    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int | None = None
    routing: str = "latency"  # the routing profile: built in (gateway/routing/plugins.py) or in routing_options
    routing_options: RoutingOptions = field(default_factory=RoutingOptions)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    load_stream: LoadStreamConfig = field(default_factory=LoadStreamConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    usage_log: UsageLogConfig = field(default_factory=UsageLogConfig)
    drain_timeout_s: float = 30.0
    # Processes accepting on the port (SO_REUSEPORT), one per core is the rule; per-key limits, load
    # tracking and metrics are shared between them, and the usage log is a file per process.
    workers: int = 1
    tracing: TracingConfig = field(default_factory=TracingConfig)
    access_log: bool = True  # one JSON line per request on the meshgate.access logger
    tls: TlsServerConfig = field(default_factory=TlsServerConfig)  # client-facing TLS: the HTTP and gRPC fronts
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)




@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Which sites, pools and gateways exist (DESIGN.md §1). Top level, not under `gateway`: pool
    workers read it too (they register themselves). static: the YAML's pools (the embedded default).
    etcd: pools and gateways register under `{prefix}pools/{id}` and `{prefix}gateways/{id}` with a
    lease; gateways list and watch the prefix. Load never goes through etcd."""

    kind: Literal["static", "etcd"] = "static"
    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)  # host:port of etcd members, tried in turn
    prefix: str = "/meshgate/"
    lease_ttl_s: int = 10  # a registrant that stops refreshing vanishes this long after (etcd: whole seconds)
    timeout_s: float = 2.0  # every etcd call
    confirm_s: float = 1.0  # how often a gateway confirms its view is current (a cheap read)
    republish_s: float = 30.0  # registrants rewrite their entry (fresh coordinates) this often
    backoff_max_s: float = 5.0  # reconnect backoff cap (doubling from 0.1 s, with jitter)
    deregister_wait_s: float = 1.0  # on drain: after deleting its key, a pool waits this long for watches
    instance_id: str | None = None  # a gateway's key; default {site}-{hostname}-{port}
    advertise_url: str | None = None  # how others reach this gateway; default http(s)://host:port (https with gateway.tls)
    ca_file: str | None = None  # TLS: a CA bundle turns TLS on
    cert_file: str | None = None  # client certificate (mutual TLS), with key_file
    key_file: str | None = None
    username: str | None = None  # etcd auth, with password
    password: str | None = None

    def validate(self, path: str) -> None:
        if self.kind == "etcd" and not self.endpoints:
            raise ConfigError(f"{path}.endpoints: etcd discovery needs at least one host:port")
        for i, ep in enumerate(self.endpoints):
            host, _, port = ep.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"{path}.endpoints[{i}]: expected host:port, got {ep!r}")
        if not (self.prefix.startswith("/") and self.prefix.endswith("/")):
            raise ConfigError(f"{path}.prefix: must start and end with '/', got {self.prefix!r}")
        if self.lease_ttl_s < 2:  # etcd's minimum lease TTL
            raise ConfigError(f"{path}.lease_ttl_s: must be at least 2")
        _positive(self, path, "timeout_s", "confirm_s", "republish_s", "backoff_max_s")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError(f"{path}: cert_file and key_file go together")
        if (self.username is None) != (self.password is None):
            raise ConfigError(f"{path}: username and password go together")


@dataclass(frozen=True, slots=True)
class Config:
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    sites: tuple[SiteConfig, ...] = ()
    pools: tuple[PoolConfig, ...] = ()
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)

    def check_gateway_tls(self) -> None:
        """A gateway's TLS files (its fronts', its upstream client's) exist and load: ConfigError if not."""
        self.gateway.tls.check_files("gateway.tls")
        self.gateway.upstream.tls.check_files("gateway.upstream.tls")

    def check_pool_tls(self, pool: PoolConfig) -> None:
        i = self.pools.index(pool)
        pool.tls.check_files(f"pools[{i}].tls")

    def pool(self, pool_id: str | None) -> PoolConfig:
        if not self.pools:
            raise ConfigError("pools: the config defines no pool")
        if pool_id is None:
            return self.pools[0]
        for p in self.pools:
            if p.id == pool_id:
                return p
        raise ConfigError(f"pools: no pool with id {pool_id!r} (have {[p.id for p in self.pools]})")


def load_config(path: str | Path) -> Config:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    return config_from_dict(data, Path(path).parent)


def config_from_dict(data: Any, base_dir: Path | None = None) -> Config:
    """base_dir: where relative file paths in the config (gateway.auth.keys_file) start; default the cwd."""
    cfg = _build(Config, data, "")
    cfg = _with_key_file(cfg, base_dir or Path.cwd())
    cfg = _with_tls_paths(cfg, base_dir or Path.cwd())
    cfg.gateway.tls.validate_front("gateway.tls")
    cfg.gateway.upstream.tls.validate("gateway.upstream.tls")
    if not 1 <= cfg.gateway.workers <= 256:
        raise ConfigError(f"gateway.workers: expected 1..256, got {cfg.gateway.workers}")
    cfg.gateway.limits.validate("gateway.limits")
    cfg.gateway.auth.validate("gateway.auth")
    cfg.gateway.usage_log.validate("gateway.usage_log")
    cfg.discovery.validate("discovery")
    cfg.gateway.load_stream.validate("gateway.load_stream")
    cfg.gateway.upstream.validate("gateway.upstream")
    options = cfg.gateway.routing_options
    options.validate("gateway.routing_options")
    for name, profile in options.profiles.items():
        profile.validate(f"gateway.routing_options.profiles.{name}")
    _one_of("gateway.routing", cfg.gateway.routing, (*BUILTIN_PROFILES, *options.profiles))
    cfg.gateway.resilience.validate("gateway.resilience")
    for i, p in enumerate(cfg.pools):
        p.validate(f"pools[{i}]")
        p.engine.validate(f"pools[{i}].engine")
    for i, p in enumerate(cfg.pools):
        if p.emulate_rtt_ms is not None and not p.url:
            raise ConfigError(f"pools[{i}]: emulate_rtt_ms needs url (where the delaying proxy listens)")
        if p.kind == "openai" and not (p.url and p.models):
            raise ConfigError(f"pools[{i}]: a kind: openai pool needs url and models")
    ids = [p.id for p in cfg.pools]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"pools: duplicate ids in {ids}")
    return cfg


def _with_tls_paths(cfg: Config, base_dir: Path) -> Config:
    """TLS file paths relative to the config file's folder, as keys_file is."""
    def fix(section: Any) -> Any:
        changes = {name: str(base_dir / Path(v).expanduser()) for name in ("cert_file", "key_file", "ca_file", "client_ca_file")
                   if isinstance(v := getattr(section, name, None), str)}
        return dataclasses.replace(section, **changes) if changes else section

    gw = cfg.gateway
    gw = dataclasses.replace(gw, tls=fix(gw.tls), upstream=dataclasses.replace(gw.upstream, tls=fix(gw.upstream.tls)))
    pools = tuple(dataclasses.replace(p, tls=fix(p.tls)) for p in cfg.pools)
    return dataclasses.replace(cfg, gateway=gw, pools=pools)


def _with_key_file(cfg: Config, base_dir: Path) -> Config:
    """Read gateway.auth.keys_file here (this module is the only file reader) and merge its entries."""
    auth = cfg.gateway.auth
    if auth.keys_file is None:
        return cfg
    file = base_dir / Path(auth.keys_file).expanduser()
    try:
        data = yaml.safe_load(file.read_text())  # JSON is YAML too
    except OSError as e:
        raise ConfigError(f"gateway.auth.keys_file: cannot read {file}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"gateway.auth.keys_file: {file}: invalid YAML/JSON: {e}") from None
    if isinstance(data, dict) and set(data) == {"keys"}:
        data = data["keys"]
    if not isinstance(data, list):
        raise ConfigError(f"gateway.auth.keys_file: {file}: expected a list of key entries (or {{keys: [...]}})")
    extra = tuple(_build(ApiKeyConfig, entry, f"gateway.auth.keys_file[{i}]") for i, entry in enumerate(data))
    for i, k in enumerate(extra):
        k.validate(f"gateway.auth.keys_file[{i}]")  # here, so errors name the file's index, not the merged one
    auth = dataclasses.replace(auth, keys=auth.keys + extra)
    return dataclasses.replace(cfg, gateway=dataclasses.replace(cfg.gateway, auth=auth))


def _positive(section: object, path: str, *names: str) -> None:
    """Each named field of section is > 0 (NaN is not)."""
    for name in names:
        value = getattr(section, name)
        if not value > 0:
            raise ConfigError(f"{path}.{name}: must be positive, got {value!r}")


def _one_of(path: str, value: object, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}: expected one of {', '.join(map(str, allowed))}, got {value!r}")


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{sub}: unknown key (known: {', '.join(fields)})")
        kwargs[key] = _convert(hints[key], value, sub)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{path or 'config'}: missing required key {missing[0]!r}")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        (inner, _) = typing.get_args(tp)
        return tuple(_convert(inner, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        _one_of(path, value, typing.get_args(tp))
        return value
    if origin in (dict, Mapping, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        _, inner = typing.get_args(tp)
        return MappingProxyType({str(k): _convert(inner, v, f"{path}.{k}") for k, v in value.items()})
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value
