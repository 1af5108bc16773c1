"""`meshgate serve --grpc-port` in front of a real pool worker (processes), driven by a gRPC client
through the committed stubs; and the gRPC side of the CLI contract (DESIGN.md §8)."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.rpc import meshgate_pb2 as pb
from gateway.rpc import meshgate_pb2_grpc as pb_grpc
from tests.servers import Proc, free_port, tiny_pool, wait_until, write_config

MODEL = "meshgate-tiny"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """One worker (p0) and, listed first, a pool that nobody serves: round-robin tries it first for
    every other request, and the gateway must fail over to p0. Probes are slow so it stays listed."""
    tmp = tmp_path_factory.mktemp("grpc-mesh")
    port, http_port, grpc_port = free_port(), free_port(), free_port()
    cfg = write_config(tmp / "mesh.yaml", [{"id": "dead", "url": f"http://127.0.0.1:{free_port()}"},
                                           tiny_pool("p0", port, str(tmp / "cache"))])
    data = yaml.safe_load(cfg.read_text())
    data["gateway"] = {"port": http_port, "routing": "round-robin",
                       "probe": {"period_s": 3600.0, "timeout_s": 0.5, "down_after": 2},
                       "upstream": {"breaker_failures": 100}}
    cfg.write_text(yaml.safe_dump(data))
    worker = Proc(["worker", "--config", str(cfg), "--pool", "p0"])
    gw = Proc(["serve", "--config", str(cfg), "--grpc-port", str(grpc_port)])
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield channel, gw, f"http://127.0.0.1:{http_port}", port, grpc_port
    channel.close()
    assert gw.stop() == 0, gw.log()
    worker.stop()


def chat(**kw) -> pb.GenerateRequest:  # type: ignore[no-untyped-def]
    return pb.GenerateRequest(**{"model": MODEL, "messages": [pb.Message(role="user", content="hi")], **kw})


def test_ready_line_names_both_ports(mesh):
    _, gw, _, _, grpc_port = mesh
    assert f"grpc=127.0.0.1:{grpc_port}" in gw.log()


def test_unary_and_streamed_answers_agree(mesh):
    channel = mesh[0]
    stub = pb_grpc.GenerationStub(channel)
    req = pb.GenerateRequest(model=MODEL, prompt="The keeper", max_tokens=7, temperature=0.0, ignore_eos=True,
                             include_usage=True)
    whole = stub.Generate(req, timeout=30)
    assert whole.usage.completion_tokens == 7 and whole.finish_reason == "length" and whole.pool_id == "p0"
    msgs = list(stub.GenerateStream(req, timeout=30))
    assert "".join(m.text for m in msgs) == whole.text
    assert msgs[-1].usage.completion_tokens == 7 and msgs[-2].finish_reason == "length"
    assert {m.pool_id for m in msgs} == {"p0"}


def test_chat_with_logprobs(mesh):
    stub = pb_grpc.GenerationStub(mesh[0])
    r = stub.Generate(chat(max_tokens=4, ignore_eos=True, logprobs=True, top_logprobs=2), timeout=30)
    assert len(r.logprobs) == 4 and all(len(t.top_logprobs) == 2 for t in r.logprobs)
    # (tokens of a byte-level tokenizer may be pieces of one character, so they need not join to the text)
    assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in r.logprobs)


def test_list_models(mesh):
    r = pb_grpc.GenerationStub(mesh[0]).ListModels(pb.ListModelsRequest(), timeout=10)
    assert [m.id for m in r.models] == [MODEL]


def test_failover_past_a_dead_pool(mesh):
    channel, _, url, _, _ = mesh
    stub = pb_grpc.GenerationStub(channel)
    pools = [stub.Generate(chat(max_tokens=2), timeout=30).pool_id for _ in range(4)]
    pools += [m.pool_id for _ in range(2) for m in stub.GenerateStream(chat(max_tokens=2), timeout=30)]
    assert set(pools) == {"p0"}
    failovers = [line for line in httpx.get(url + "/metrics").text.splitlines()
                 if line.startswith('meshgate_failovers_total{from_pool="dead"}')]
    assert failovers and float(failovers[0].split()[1]) >= 2


@pytest.mark.parametrize(("req", "code"), [
    (pb.GenerateRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND),
    (chat(temperature=2.5), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(model=MODEL, prompt="word " * 600), grpc.StatusCode.INVALID_ARGUMENT),  # the pool's 400
])
def test_errors_map_to_status_codes(mesh, req, code):
    stub = pb_grpc.GenerationStub(mesh[0])
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(req, timeout=30)
    assert err.value.code() == code and err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateStream(req, timeout=30))
    assert err.value.code() == code


def test_health_and_reflection(mesh):
    channel = mesh[0]
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "meshgate.v1.Generation"):
        r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (resp,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    assert "meshgate.v1.Generation" in {s.name for s in resp.list_services_response.service}


def _pool_metric(port: int, name: str) -> float:
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_client_cancel_aborts_at_the_pool(mesh):
    channel, _, _, pool_port, _ = mesh
    before = _pool_metric(pool_port, "meshgate_worker_aborted_requests_total")
    stream = pb_grpc.GenerationStub(channel).GenerateStream(
        pb.GenerateRequest(model=MODEL, prompt="go", max_tokens=400, ignore_eos=True), timeout=60)
    next(stream), next(stream)
    stream.cancel()
    assert wait_until(lambda: _pool_metric(pool_port, "meshgate_worker_aborted_requests_total") == before + 1)
    assert wait_until(lambda: _pool_metric(pool_port, "meshgate_worker_kv_blocks_used") == 0)


def _gateway_config(tmp_path, pool_url: str, http_port: int, grpc_port: int) -> str:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump({"gateway": {"port": http_port, "grpc_port": grpc_port, "drain_timeout_s": 10},
                                   "pools": [{"id": "s", "url": pool_url, "models": ["m"]}]}))
    return str(cfg)


def test_grpc_port_in_use_exits_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        grpc_port = taken.getsockname()[1]
        cfg = _gateway_config(tmp_path, f"http://127.0.0.1:{free_port()}", free_port(), grpc_port)
        r = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", cfg], capture_output=True,
                           text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"meshgate: cannot listen on 127.0.0.1:{grpc_port} (gRPC): "
                                             "Address already in use"]


def test_up_and_serve_take_grpc_port():
    for command in ("up", "serve"):
        r = subprocess.run([sys.executable, "-m", "gateway", command, "--help"], capture_output=True, text=True)
        assert "--grpc-port" in r.stdout and "--port" in r.stdout and "--config" in r.stdout


def test_sigterm_lets_grpc_streams_finish(tmp_path):
    stub_port, http_port, grpc_port = free_port(), free_port(), free_port()
    stub = subprocess.Popen([sys.executable, "-m", "tests.stub_pool", "--port", str(stub_port), "--tokens", "30",
                             "--delay-s", "0.05"], stdout=subprocess.PIPE, text=True)
    try:
        assert "listening" in stub.stdout.readline()
        gw = Proc(["serve", "--config", _gateway_config(tmp_path, f"http://127.0.0.1:{stub_port}", http_port,
                                                        grpc_port)])
        texts: list[str] = []
        started = threading.Event()
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub_ = pb_grpc.GenerationStub(channel)

            def stream() -> None:
                req = pb.GenerateRequest(model="m", messages=[pb.Message(role="user", content="x")])
                for m in stub_.GenerateStream(req, timeout=20):
                    texts.append(m.text)
                    started.set()

            t = threading.Thread(target=stream)
            t.start()
            assert started.wait(10)
            gw.p.send_signal(signal.SIGTERM)
            t.join(20)
        assert gw.wait(20) == 0, gw.log()
        assert texts == [f"t{i} " for i in range(30)]  # the whole stream arrived
    finally:
        stub.terminate()
        stub.wait(5)
