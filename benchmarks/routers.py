"""Processes for router benchmarks: the stub upstream, meshgate and peer routers in front of it, and
the CPU time each spends (/proc, summed over the process tree).

Peers install from PyPI into venvs of their own under /tmp, never into the project's .venv:
`vllm-router` and `smg` (Rust routers with Python launchers) share one, `litellm[proxy]` (which pins
many packages) has another. `install_peers()` makes them; a peer whose executable is missing is
reported as not installed, one that does not come up as failed, each with the reason.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MODEL = "m"
CHAT_PATH = "/v1/chat/completions"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PEERS_VENV = Path("/tmp/mg-peers")  # vllm-router, smg
LITELLM_VENV = Path("/tmp/mg-litellm")  # litellm[proxy]
PEER_PACKAGES = {"vllm-router": (PEERS_VENV, "vllm-router"), "smg": (PEERS_VENV, "smg"),
                 "litellm": (LITELLM_VENV, "litellm[proxy]")}


def set_venvs(peers: Path, litellm: Path) -> None:
    """Where the peers live (install_peers makes them there)."""
    global PEERS_VENV, LITELLM_VENV
    PEERS_VENV, LITELLM_VENV = peers, litellm
    PEER_PACKAGES.update({"vllm-router": (peers, "vllm-router"), "smg": (peers, "smg"),
                          "litellm": (litellm, "litellm[proxy]")})


class StartError(RuntimeError):
    """A target did not come up; the message says why (for the report)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- CPU accounting -------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2:].decode().split()  # fields from 3 (state) on; comm may hold spaces


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                kids += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return kids


def tree_cpu_s(pid: int) -> float:
    """utime + stime of a process and all its descendants, seconds (all threads included)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        st = _stat(p)
        if st is not None:
            total += int(st[11]) + int(st[12])  # utime, stime (fields 14, 15)
        todo += _children(p)
    return total / CLK_TCK


# -- processes ------------------------------------------------------------------------------
@dataclass
class Proc:
    """A server we started: its own session, output in a log file, stopped by its process group."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path = REPO
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Proc:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 -- the child writes to it until stop()
        self.popen = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      cwd=self.cwd, env=self.env, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def cpu_s(self) -> float:
        return tree_cpu_s(self.pid)

    def log_tail(self, max_chars: int = 300) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return " | ".join(lines[-3:])[-max_chars:]

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the process group we made, SIGKILL after grace_s (smg drains for ~8 s)."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # the leader may be gone while its group lives on
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def http(method: str, url: str, body: Any = None, timeout_s: float = 5.0) -> tuple[int, bytes]:
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_serving(proc: Proc, base_url: str, timeout_s: float) -> None:
    """Until a chat completion through `base_url` answers 200 with choices, whole and streamed."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartError(f"exited with status {proc.popen.returncode if proc.popen else '?'}: {proc.log_tail()}")
        try:
            ok = True
            for stream in (False, True):
                body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                        "stream": stream}
                status, out = http("POST", base_url + CHAT_PATH, body, timeout_s=5)
                if status != 200 or (b"[DONE]" not in out if stream else b'"choices"' not in out):
                    ok = False
                    last = f"status {status}: {out[:120]!r}"
                    break
            if ok:
                return
        except (OSError, urllib.error.URLError) as e:
            last = type(e).__name__
        time.sleep(0.25)
    raise StartError(f"not serving after {timeout_s:.0f} s ({last}); log: {proc.log_tail()}")


# -- the targets ----------------------------------------------------------------------------
def start_stub(workdir: Path, tokens: int, write_per_event: bool = False, extra: Sequence[str] = (),
               name: str = "stub") -> tuple[Proc, str]:
    """The stub upstream on a free port; extra: more stub_upstream flags (e.g. --itl-ms for paced streams)."""
    argv = [sys.executable, "-m", "benchmarks.stub_upstream", "--host", HOST, "--port", "0", "--tokens", str(tokens),
            "--model", MODEL, *extra]
    if write_per_event:
        argv.append("--write-per-event")
    proc = Proc(name, argv, workdir / f"{name}.log").start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for line in proc.log_path.read_text(errors="replace").splitlines():
            if line.startswith("listening http="):
                return proc, "http://" + line.split()[1].split("=", 1)[1]
        if not proc.alive():
            break
        time.sleep(0.05)
    proc.stop()
    raise StartError(f"{name} did not start: {proc.log_tail()}")


@dataclass(frozen=True)
class Target:
    name: str
    proc: Proc | None  # None: the stub itself (direct)
    url: str
    version: str
    command: str
    profiler: Proc | None = None  # py-spy attached to proc; writes its file when proc exits

    def stop(self) -> None:
        if self.proc is not None:
            # Under cProfile the stats are written at exit, after the gateway's drain: give it time.
            self.proc.stop(grace_s=40.0 if "cProfile" in self.command else 10.0)
        if self.profiler is not None:
            try:
                assert self.profiler.popen is not None
                self.profiler.popen.wait(30)  # py-spy writes once its target is gone
            except subprocess.TimeoutExpired:
                pass
            self.profiler.stop()


def start_meshgate(workdir: Path, stub_url: str, profile: str | None = None, log_level: str = "WARNING",
                   workers: int = 1, tree: Path | None = None) -> Target:
    """`python -m gateway serve` with the stub as its only pool. profile: None, "cprofile" (stats
    written at exit to workdir/meshgate.prof) or "py-spy" (attached once it serves, collapsed stacks
    in workdir/meshgate.pyspy.txt); workers > 1: that many processes (`--workers`), not profiled."""
    port = free_port()
    cfg = workdir / "meshgate.yaml"
    cfg.write_text(
        "gateway:\n"
        f"  host: {HOST}\n  port: {port}\n  routing: least-load\n"
        "pools:\n"  # an OpenAI-compatible stub, not our worker: it cannot continue from token ids
        f"  - id: stub\n    kind: openai\n    url: {stub_url}\n    models: [{MODEL}]\n"
    )
    # WARNING by default: at INFO the gateway writes an access-log line per request, and the peers
    # run without one (their per-request logging off too), so like is compared with like.
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--log-level", log_level]
    name = "meshgate"
    if workers > 1:
        argv += ["--workers", str(workers)]
        name, profile = "meshgate-workers", None
    if tree is not None:  # another checkout of meshgate (a baseline commit), one process, same config
        name, profile = "meshgate-baseline", None
    if profile == "cprofile":
        argv = [sys.executable, "-m", "cProfile", "-o", str(workdir / "meshgate.prof"), "-m", "gateway", *argv[3:]]
    proc = Proc(name, argv, workdir / f"{name}.log", cwd=tree or REPO).start()  # `-m gateway`: the tree's
    url = f"http://{HOST}:{port}"
    try:
        wait_serving(proc, url, 30)
    except StartError:
        proc.stop()
        raise
    spy = None
    if profile == "py-spy":
        exe = shutil.which("py-spy") or str(PEERS_VENV / "bin" / "py-spy")
        if not Path(exe).exists():
            proc.stop()
            raise StartError("py-spy not found (on PATH or in the peers' venv: --install-peers)")
        # Attached, not wrapping: its own CPU stays out of the gateway's process tree.
        # Blocking (the default): --nonblocking reads the stacks racily and garbles a share of them.
        spy = Proc("py-spy", [exe, "record", "--pid", str(proc.pid), "--rate", "250",
                              "--format", "raw", "--output", str(workdir / "meshgate.pyspy.txt")],
                   workdir / "py-spy.log").start()
    version = _meshgate_version() if tree is None else f"tree {tree}"
    return Target(name, proc, url, version, " ".join(argv) + (f" (in {tree})" if tree else ""), spy)


def _meshgate_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meshgate")
    except PackageNotFoundError:  # not installed as a package: the tree is what runs
        return "working tree"


def peer_executable(name: str) -> Path:
    venv = PEER_PACKAGES[name][0]
    return venv / "bin" / ("litellm" if name == "litellm" else name)


def peer_version(name: str) -> str:
    venv, pkg = PEER_PACKAGES[name]
    dist = pkg.split("[")[0]
    try:
        out = subprocess.run([str(venv / "bin" / "python"), "-c",
                              f"import importlib.metadata as m; print(m.version({dist!r}))"],
                             check=False, capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def start_peer(name: str, workdir: Path, stub_url: str, policy: str = "round_robin") -> Target:
    """A peer router with the stub as its single worker, logging at warning level (as meshgate runs
    without an access log). Raises FileNotFoundError when not installed, StartError when it fails."""
    exe = peer_executable(name)
    if not exe.exists():
        raise FileNotFoundError(f"{exe} missing (python -m benchmarks.gateway_overhead --install-peers)")
    port = free_port()
    env = dict(os.environ)
    timeout_s = 60.0
    if name == "vllm-router":
        argv = [str(exe), "--host", HOST, "--port", str(port), "--worker-urls", stub_url, "--policy", policy,
                "--log-level", "warning", "--prometheus-host", HOST, "--prometheus-port", str(free_port())]
    elif name == "smg":
        argv = [str(exe), "launch", "--host", HOST, "--port", str(port), "--worker-urls", stub_url,
                "--policy", policy, "--log-level", "warn", "--prometheus-host", HOST,
                "--prometheus-port", str(free_port())]
    elif name == "litellm":
        cfg = workdir / "litellm.yaml"
        cfg.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL}\n    litellm_params:\n      model: openai/{MODEL}\n"
            f"      api_base: {stub_url}/v1\n      api_key: sk-stub\n"
            "litellm_settings:\n  telemetry: false\n"
            # auth off, as meshgate runs here; LiteLLM refuses to start without a key unless told
            "general_settings:\n  dangerously_permit_weak_or_unset_master_key: true\n"
        )
        log_cfg = workdir / "litellm-logging.json"  # no per-request access log (meshgate writes none)
        log_cfg.write_text(orjson.dumps({
            "version": 1, "disable_existing_loggers": False,
            "handlers": {"err": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}},
            "loggers": {"uvicorn": {"handlers": ["err"], "level": "WARNING"},
                        "uvicorn.access": {"handlers": ["err"], "level": "WARNING", "propagate": False}},
        }).decode())
        argv = [str(exe), "--config", str(cfg), "--host", HOST, "--port", str(port), "--num_workers", "1",
                "--log_config", str(log_cfg)]
        env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY="False", LITELLM_LOG="ERROR",
                   NO_DOCS="True")
        timeout_s = 120.0
    else:
        raise ValueError(name)
    proc = Proc(name, argv, workdir / f"{name}.log", env=env, cwd=workdir).start()
    url = f"http://{HOST}:{port}"
    try:
        wait_serving(proc, url, timeout_s)
    except StartError:
        proc.stop()
        raise
    return Target(name, proc, url, peer_version(name), " ".join(argv))


def install_peers(log: Any, timeout_s: float = 900.0) -> dict[str, str]:
    """Make the peers' venvs under /tmp (with this Python) and pip-install the peers; name -> outcome."""
    outcome: dict[str, str] = {}
    for venv, pkgs in ((PEERS_VENV, ["vllm-router", "smg", "py-spy"]), (LITELLM_VENV, ["litellm[proxy]"])):
        try:
            if not (venv / "bin" / "python").exists():
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
            log.info("pip install %s into %s", " ".join(pkgs), venv)
            r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *pkgs], check=False,
                               capture_output=True, text=True, timeout=timeout_s)
            msg = "ok" if r.returncode == 0 else f"pip failed: {(r.stderr or r.stdout).strip()[-300:]}"
        except (OSError, subprocess.SubprocessError) as e:
            msg = f"install failed: {e}"
        for p in pkgs:
            outcome[p.split("[")[0]] = msg
    return outcome
