"""meshgate command line (DESIGN.md §8): up | serve | worker | hash-key | build-engine | certs."""
from __future__ import annotations

import argparse
import dataclasses
import getpass
import logging
import sys

from gateway.cli.run import run, serve, worker
from gateway.cli.up import up
from gateway.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshgate", description="latency-aware inference router and pool worker")
    sub = parser.add_subparsers(dest="command", required=True)
    up_p = sub.add_parser("up", help="the embedded default: the config's local pool workers and a gateway")
    serve_p = sub.add_parser("serve", help="run one edge gateway")
    worker_p = sub.add_parser("worker", help="run one pool worker (OpenAI HTTP API over a batching engine)")
    for p in (up_p, serve_p, worker_p):
        p.add_argument("--config", default="configs/local.yaml", help="YAML config (default: configs/local.yaml)")
        p.add_argument("--port", type=int, help="HTTP port (default: from the config)")
        p.add_argument("--log-level", default="INFO")
    for p in (serve_p, worker_p):
        p.add_argument("--host", help="listen address (default: from the config)")
    for p in (up_p, serve_p):
        p.add_argument("--grpc-port", type=int, help="gRPC port (default: from the config; none: gRPC off)")
    serve_p.add_argument("--workers", type=int, help="gateway processes sharing the port, e.g. one per core "
                                                   "(default: gateway.workers in the config, 1)")
    worker_p.add_argument("--pool", help="pool id in the config (default: the first pool)")
    sub.add_parser("hash-key", help="print the sha256 of an API key read from stdin (for gateway.auth keys)")
    build = sub.add_parser("build-engine", help="export a model's dense segments to ONNX and build TensorRT engines")
    build.add_argument("--model", required=True, help="a Hugging Face Llama folder")
    build.add_argument("--out", help="engine root (default: ~/.cache/meshgate/engines, where tensorrt workers look)")
    build.add_argument("--dtype", choices=sorted(_BUILD_DTYPES), default="fp16")
    build.add_argument("--max-tokens", type=int, help="token budget of a step: the pool's engine.max_num_batched_tokens")
    build.add_argument("--max-seqs", type=int, help="sequences in a step: the pool's engine.max_num_seqs")
    certs = sub.add_parser("certs", help="make a development CA and TLS certificates for the embedded mesh "
                                          "(configs/local-tls.yaml)")
    certs.add_argument("--out", default="certs", help="folder to write them to (default ./certs)")
    certs.add_argument("--name", action="append", default=[],
                       help="a DNS name or IP address the server certificates carry besides localhost and "
                            "127.0.0.1 (repeatable)")
    certs.add_argument("--days", type=int, default=90, help="validity of the leaf certificates (days)")
    args = parser.parse_args(argv)
    if args.command == "certs":
        from gateway.cli.certs import main as certs_main  # cryptography is imported only for this command

        return certs_main(args)
    if args.command == "hash-key":
        return _hash_key()
    if args.command == "build-engine":
        return _build_engine(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        cfg = load_config(args.config)
        if args.command == "worker":
            pool = cfg.pool(args.pool)
            cfg.check_pool_tls(pool)  # this worker's certificates; the gateways' are not here
            return run(worker(cfg, pool, args.host or pool.host, args.port or pool.port))
        cfg.check_gateway_tls()
        gw = cfg.gateway
        cfg = dataclasses.replace(cfg, gateway=dataclasses.replace(gw, host=getattr(args, "host", None) or gw.host,
                                                                   port=args.port or gw.port,
                                                                   grpc_port=_given(args.grpc_port, gw.grpc_port)))
        if args.command == "serve":
            if args.workers is not None:
                if not 1 <= args.workers <= 256:
                    raise ConfigError(f"--workers: expected 1..256, got {args.workers}")
                cfg = dataclasses.replace(cfg, gateway=dataclasses.replace(cfg.gateway, workers=args.workers))
            if cfg.gateway.workers > 1:
                from gateway.edge.supervisor import serve_workers

                return serve_workers(cfg, lambda c, shared, i: run(serve(c, shared, i)))
            return run(serve(cfg))
        # The embedded default runs one gateway process beside its pool workers.
        cfg = dataclasses.replace(cfg, gateway=dataclasses.replace(cfg.gateway, workers=1))
        return run(up(cfg, args.config, args.log_level))
    except ConfigError as e:
        print(f"meshgate: config error: {e}", file=sys.stderr)
        return 2


def _given(value: int | None, default: int | None) -> int | None:
    return default if value is None else value


def _hash_key() -> int:
    """Keys are configured by digest only; this turns a key into the digest to put in config."""
    from gateway.edge.admission import hash_key

    # From a terminal, read without echo; from a pipe, the whole input (one trailing newline is not part of it).
    key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.read()
    key = key.strip()
    if not key:
        print("meshgate: hash-key: no key on stdin", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


_BUILD_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _build_engine(args: argparse.Namespace) -> int:
    """ONNX export on any machine, engines where there is a GPU and TensorRT; the profile is the
    one a worker with these limits asks for, so it finds them (gateway/worker/trt_build.py)."""
    from gateway.config import EngineConfig
    from gateway.worker.trt_build import build_engine_command  # torch lives behind this import

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    d = EngineConfig()
    try:
        return build_engine_command(args.model, args.out, _BUILD_DTYPES[args.dtype],
                                    args.max_tokens or d.max_num_batched_tokens, args.max_seqs or d.max_num_seqs)
    except (OSError, ValueError) as e:  # no such folder, not a Llama checkpoint, ...
        print(f"meshgate: build-engine: {e}", file=sys.stderr)
        return 2
