"""The cuda runner against the torch runner on the same steps (prefill chunks, mixed steps, graph
decode), both on the GPU in fp32. Skipped without CUDA."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

for _dep in ("yaml", "tokenizers", "safetensors"):  # the engine's own dependencies
    pytest.importorskip(_dep)

from gateway.config import EngineConfig, ModelConfig, TinyModelConfig
from gateway.worker.batch import Batch
from gateway.worker.engine import Engine, model_folder
from gateway.worker.request import Request, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


class Both:
    """Runs both runners on every batch and checks their logits agree; returns the torch ones."""

    def __init__(self, torch_runner, cuda_runner):  # type: ignore[no-untyped-def]
        self.a, self.b = torch_runner, cuda_runner
        self.device, self.config = torch_runner.device, torch_runner.config
        self.num_checked = 0

    def execute(self, batch: Batch) -> torch.Tensor:
        expected = self.a.execute(batch)
        got = self.b.execute(batch)
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
        self.num_checked += 1
        return expected


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_cuda_runner_matches_torch_runner(tmp_path: Path, graphs: bool) -> None:
    from gateway.worker.cuda_runner import CudaRunner
    from gateway.worker.runner import TorchRunner

    tiny = TinyModelConfig(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2)
    mcfg = ModelConfig(tiny=tiny, cache_dir=str(tmp_path))
    cfg = EngineConfig(device="cuda", block_size=16, num_blocks=256, max_num_seqs=16,
                       max_num_batched_tokens=128, max_model_len=1024)
    folder = model_folder(mcfg)
    both = Both(TorchRunner(folder, cfg), CudaRunner(folder, cfg, use_cuda_graphs=graphs))
    engine = Engine(mcfg, cfg, runner=both)
    rng = random.Random(0)
    for i in range(12):
        prompt = [rng.randrange(tiny.vocab_size) for _ in range(rng.randrange(1, 300))]
        engine.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)))
    while engine.has_work():
        engine.step()
    assert both.num_checked > 24
    if graphs:
        assert both.b.graphs.graphs, "no decode step went through a CUDA graph"
