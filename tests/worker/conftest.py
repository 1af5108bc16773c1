"""Shared fixtures for the worker engine tests: the tiny model (built once per session) and a
factory for small engines whose KV cache is checked for leaks after every test."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gateway.config import EngineConfig, ModelConfig, TinyModelConfig
from gateway.worker.engine import Engine, model_folder

# Small enough that a few requests fill the cache and prompts cross block boundaries.
ENGINE_DEFAULTS: dict[str, Any] = dict(
    block_size=4,
    num_blocks=64,
    max_num_seqs=16,
    max_num_batched_tokens=64,
    max_model_len=256,
    # The tiny model's tensors are far too small for intra-op threads to pay off, and on a busy
    # 2-core machine OpenMP workers spinning against other processes make steps ~30x slower.
    num_threads=1,
)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    torch.set_num_threads(1)  # see num_threads above; also for tests that make no engine


@pytest.fixture(scope="session")
def model_cfg(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    """The untrained tiny model (train_steps=0), made once into a session temp dir."""
    cache = tmp_path_factory.mktemp("meshgate-cache")
    cfg = ModelConfig(tiny=TinyModelConfig(train_steps=0), cache_dir=str(cache))
    model_folder(cfg)  # build it now so tests do not pay for it one by one
    return cfg


@pytest.fixture(scope="session")
def model_dir(model_cfg: ModelConfig) -> Path:
    return model_folder(model_cfg)


@pytest.fixture
def make_engine(model_cfg: ModelConfig) -> Iterator[Callable[..., Engine]]:
    """make_engine(runner=None, **EngineConfig overrides) -> Engine.

    At teardown every engine made must hold no leaked block: the block manager's invariants hold,
    and once every request is finished (those still live are aborted first, which must free
    them too) all blocks are free again.
    """
    engines: list[Engine] = []

    def make(runner: Any = None, **overrides: Any) -> Engine:
        cfg = EngineConfig(**{**ENGINE_DEFAULTS, **overrides})
        engine = Engine(model_cfg, cfg, runner=runner)
        engines.append(engine)
        return engine

    yield make

    for engine in engines:
        engine.kv.check_invariants()
        for request_id in list(engine.scheduler.requests):
            assert engine.abort_request(request_id)
        assert not engine.has_work()
        engine.kv.check_invariants()
        assert engine.kv.num_free_blocks == engine.kv.num_blocks, "KV blocks leaked"
