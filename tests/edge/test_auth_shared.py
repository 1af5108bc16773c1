"""Per-key limits across forked gateway processes sharing one limits table (meshgate serve's workers)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway.edge.admission import Admission, hash_key, limit_table, release_worker
from gateway.edge.metrics import GatewayMetrics
from gateway.config import ProbeConfig, UpstreamConfig, config_from_dict
from gateway.core.errors import RateLimited
from gateway.pools.shared import SharedTable
from gateway.pools.upstream import Upstreams
from tests.forking import run_forked

SECRET = "sk-shared-0123456789"
HEADERS = {"Authorization": f"Bearer {SECRET}"}


def gateway_cfg(**limits: int):  # type: ignore[no-untyped-def]
    keys = [{"id": "k", "sha256": hash_key(SECRET), **limits}]
    return config_from_dict({"gateway": {"auth": {"enabled": True, "keys": keys}}}).gateway


def admission(table: SharedTable, worker_index: int, **limits: int) -> Admission:
    cfg = gateway_cfg(**limits)
    metrics = GatewayMetrics(Upstreams((), UpstreamConfig(), ProbeConfig()), lambda: 0)
    # A frozen clock: the buckets do not refill while the test runs, so the counts are exact.
    return Admission(cfg.auth, cfg.limits, metrics, clock=lambda: 1000.0, shared=table, worker_index=worker_index)


def in_workers(num: int, tmp: Path, body: Callable[[int], int]) -> list[int]:
    """body(worker_index) in `num` forked processes at once; the ints they return."""
    run_forked([lambda i=i: (tmp / f"w{i}").write_text(str(body(i))) for i in range(num)])  # type: ignore[misc]
    return [int((tmp / f"w{i}").read_text()) for i in range(num)]


def admitted(adm: Admission, tries: int, settle: int | None = None) -> int:
    """How many of `tries` admissions pass; each settled at once with `settle` tokens, or held."""
    who = adm.authenticate(HEADERS)
    n = 0
    for _ in range(tries):
        try:
            ticket = adm.admit(who, {}, 0, 100)
        except RateLimited:
            continue
        n += 1
        if settle is not None:
            ticket.settle(settle)
    return n


def test_two_processes_share_requests_per_min(tmp_path):
    table = limit_table(gateway_cfg().auth, num_workers=2)
    counts = in_workers(2, tmp_path, lambda i: admitted(admission(table, i, requests_per_min=40), 200, settle=1))
    assert sum(counts) == 40  # not 2 x 40


def test_two_processes_share_max_concurrent_and_a_dead_workers_share_comes_back(tmp_path):
    table = limit_table(gateway_cfg().auth, num_workers=2)
    # Each worker holds what it gets and exits without settling: as if it died mid-request.
    counts = in_workers(2, tmp_path, lambda i: admitted(admission(table, i, max_concurrent=7), 200))
    assert sum(counts) == 7
    here = admission(table, 0, max_concurrent=7)  # worker 0's replacement: gives back worker 0's share
    assert admitted(here, 50) == counts[0]
    release_worker(table, 1)  # what the supervisor does when it reaps worker 1
    assert admitted(here, 50) == counts[1]


def test_settling_across_processes_keeps_the_count_exact(tmp_path):
    table = limit_table(gateway_cfg().auth, num_workers=2)

    def worker(i: int) -> int:
        adm = admission(table, i, max_concurrent=3, tokens_per_min=100_000)
        who = adm.authenticate(HEADERS)
        n = 0
        for _ in range(2000):
            try:
                ticket = adm.admit(who, {}, 0, 100)
            except RateLimited:
                continue
            n += 1
            state = adm._by_id["k"]
            assert state.in_flight <= 3
            ticket.settle(60)  # 40 of the 100 estimate comes back
        return n

    counts = in_workers(2, tmp_path, worker)
    state = admission(table, 0, max_concurrent=3, tokens_per_min=100_000)._by_id["k"]
    assert state.in_flight == 0
    assert state.tokens is not None and state.tokens.level == 100_000 - 60 * sum(counts)
