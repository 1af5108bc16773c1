"""The tensorrt runner against the torch runner on the same steps (prefill chunks, mixed steps,
graph decode): engines built from the tiny model's ONNX export on this GPU. Skipped without CUDA
or TensorRT (and the exporter's packages)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

for _dep in ("yaml", "tokenizers", "safetensors", "onnx", "onnxscript", "tensorrt"):
    pytest.importorskip(_dep)

from gateway.config import EngineConfig, ModelConfig, TinyModelConfig
from gateway.worker.batch import Batch
from gateway.worker.engine import Engine, model_folder
from gateway.worker.request import Request, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# head_dim 64, GQA 2:1, two layers: six small engines per dtype
TINY = TinyModelConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


class Both:
    """Runs both runners on every batch, checks their logits agree, returns the torch ones (so
    both see the same sampled tokens)."""

    def __init__(self, torch_runner, trt_runner, tol: float):  # type: ignore[no-untyped-def]
        self.a, self.b, self.tol = torch_runner, trt_runner, tol
        self.device, self.config = torch_runner.device, torch_runner.config
        self.num_checked = 0

    def execute(self, batch: Batch) -> torch.Tensor:
        expected = self.a.execute(batch)
        got = self.b.execute(batch)
        torch.testing.assert_close(got, expected, rtol=self.tol, atol=self.tol)
        self.num_checked += 1
        return expected


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_folder(ModelConfig(tiny=TINY, cache_dir=str(tmp_path_factory.mktemp("model"))))


@pytest.fixture(scope="module")
def engine_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.mark.parametrize(("dtype", "graphs", "tol"), [
    ("float32", True, 1e-3), ("float32", False, 1e-3), ("float16", True, 2e-2),
], ids=["fp32-graphs", "fp32-eager", "fp16-graphs"])
def test_trt_runner_matches_torch_runner(folder: Path, engine_root: Path, dtype: str, graphs: bool, tol: float) -> None:
    from gateway.worker.runner import TorchRunner
    from gateway.worker.trt_runner import TrtRunner

    cfg = EngineConfig(runner="tensorrt", device="cuda", dtype=dtype, block_size=16, num_blocks=256,
                       max_num_seqs=16, max_num_batched_tokens=128, max_model_len=1024)
    runner = TrtRunner(folder, cfg, use_cuda_graphs=graphs, engine_root=engine_root)
    plans = sorted(engine_root.rglob("*.plan"))
    assert len([p for p in plans if p.parent.parent.name.endswith(f"-{dtype}")]) == 6  # built once, reused after
    both = Both(TorchRunner(folder, cfg), runner, tol)
    engine = Engine(ModelConfig(path=str(folder)), cfg, runner=both)
    rng = random.Random(0)
    for i in range(12):
        prompt = [rng.randrange(TINY.vocab_size) for _ in range(rng.randrange(1, 300))]
        engine.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)))
    while engine.has_work():
        engine.step()
    assert both.num_checked > 24
    if graphs:
        assert runner.graphs is not None and runner.graphs.graphs, "no decode step went through a CUDA graph"
