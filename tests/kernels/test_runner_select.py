from __future__ import annotations

import pytest
import torch

from gateway.config import EngineConfig
from gateway.worker.runner import RUNNERS, make_runner


def test_cuda_is_registered() -> None:
    assert RUNNERS["cuda"] == "gateway.worker.cuda_runner:CudaRunner"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_runner_without_cuda_says_so(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*use runner 'torch'"):
        make_runner(tmp_path, EngineConfig(runner="cuda", device="cuda"))


def test_unknown_runner() -> None:
    with pytest.raises(ValueError, match=r"engine.runner: unknown runner 'nope' \(known: torch, cuda"):
        make_runner("/nonexistent", EngineConfig(runner="nope"))


def test_graph_sizes() -> None:
    from gateway.worker.cuda_runner import graph_sizes

    assert graph_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert graph_sizes(5) == [1, 2, 4, 5]
    assert graph_sizes(1) == [1]
