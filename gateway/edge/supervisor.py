"""`meshgate serve` with gateway.workers > 1: forked gateway processes on one port (SO_REUSEPORT).

One asyncio process uses one core; the kernel spreads new connections over the processes that
listen with SO_REUSEPORT. What must hold across them is made here, before forking, and inherited:
the per-key limits and the in-flight counts (SharedState: shared memory), and Prometheus metrics in
multiprocess mode (files in a private folder, merged by whichever process is scraped). Each process
writes its own usage log file. Worker 0 alone runs the gRPC front and registers the gateway in etcd.

The supervisor forwards SIGINT/SIGTERM to the workers (each drains) and waits for them. A worker
killed by a signal it was not sent (the OOM killer, a crash) is replaced under the same index after
its share of in-flight counts is given back; a worker that exits by itself (a port in use, a bad
start) stops the whole gateway with its exit status.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config import Config

if TYPE_CHECKING:
    from gateway.edge.gateway import SharedState

log = logging.getLogger("meshgate")


def serve_workers(cfg: Config, run_worker: Callable[[Config, SharedState, int], int]) -> int:
    """Fork cfg.gateway.workers processes running run_worker(cfg, shared, index); supervise them."""
    from gateway.edge import metrics

    n = cfg.gateway.workers
    prom_dir = Path(tempfile.mkdtemp(prefix="meshgate-metrics-"))
    metrics.enable_multiprocess(prom_dir)  # before anything makes a metric
    from gateway.edge import admission
    from gateway.edge.gateway import SharedState
    from gateway.pools import load

    shared = SharedState.make(cfg, n)
    stopping = False

    def fork(index: int) -> int:
        pid = os.fork()
        if pid == 0:  # the worker: its own event loop, default signal handling until it installs its own
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = 1
            try:
                code = run_worker(cfg, shared, index)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return pid

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(workers):
            _kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    workers = {fork(i): i for i in range(n)}
    log.info("gateway: %d worker processes on port %d (pids %s)", n, cfg.gateway.port, " ".join(map(str, workers)))
    rc = 0
    try:
        while workers:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            index = workers.pop(pid, None)
            if index is None:
                continue
            metrics.process_dead(pid)
            admission.release_worker(shared.limits, index)
            load.release_worker(shared.load, index)
            if os.WIFSIGNALED(status) and not stopping:
                log.error("gateway worker %d (pid %d) died of signal %d; starting it again",
                          index, pid, os.WTERMSIG(status))
                workers[fork(index)] = index
                continue
            code = os.waitstatus_to_exitcode(status)
            if code != 0 and not stopping:
                log.error("gateway worker %d (pid %d) exited with %d; stopping the gateway", index, pid, code)
                stop(signal.SIGTERM, None)
            rc = rc or max(code, 0)
    finally:
        shutil.rmtree(prom_dir, ignore_errors=True)
    return rc


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
