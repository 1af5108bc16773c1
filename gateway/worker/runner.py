"""Model runners share one interface: execute(batch) -> logits (S, vocab) fp32.

`torch` runs the Llama model with the torch reference ops, on CPU or CUDA. The GPU runners
(`cuda`, `tensorrt`) live in their own modules and are imported only when configured. `null`
runs no model at all (fixed logits), so the host's cost of a step can be measured anywhere.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Protocol

import torch

from gateway.config import EngineConfig
from gateway.worker.batch import Batch
from gateway.worker.families import check_context, rope_table
from gateway.worker.model import LlamaConfig, LlamaForCausalLM, load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RUNNERS = {
    "torch": "gateway.worker.runner:TorchRunner",
    "cuda": "gateway.worker.cuda_runner:CudaRunner",
    "tensorrt": "gateway.worker.trt_runner:TrtRunner",
    "null": "gateway.worker.runner:NullRunner",
}


class Runner(Protocol):
    device: torch.device

    def execute(self, batch: Batch) -> torch.Tensor: ...


class TorchRunner:
    def __init__(self, folder: str | Path, cfg: EngineConfig):
        self.device = torch.device(cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        mc = LlamaConfig.from_folder(folder)
        check_context(mc, cfg.max_model_len)
        self.config = mc
        with torch.device("meta"):
            model = LlamaForCausalLM(mc)
        model = model.to_empty(device="cpu")
        load_weights(model, folder)
        self.model = model.to(self.device, self.dtype).eval()
        self.model.cos_sin = _cos_sin(mc).to(self.device)  # rotary tables stay fp32
        self.kv_caches = make_kv_caches(mc, cfg, self.dtype, self.device)

    def execute(self, batch: Batch) -> torch.Tensor:
        return self.model(batch, self.kv_caches)


class NullRunner:
    """No model: every sampling row gets the same fixed logits (seeded noise over the folder's
    vocabulary). What is left of a step is the host's work around the model: schedule, batch
    update, sampling, output processing (benchmarks.engine_host measures it)."""

    def __init__(self, folder: str | Path, cfg: EngineConfig):
        self.device = torch.device(cfg.device)
        d = json.loads((Path(folder) / "config.json").read_text())
        eos = d.get("eos_token_id")
        self.config = NullModelConfig(int(d["vocab_size"]), eos[0] if isinstance(eos, list) else eos)
        g = torch.Generator().manual_seed(0)
        row = torch.randn(self.config.vocab_size, generator=g)  # (V,) fp32
        # (max_num_seqs, V): a step samples at most one row per running sequence
        self._logits = row.expand(cfg.max_num_seqs, -1).contiguous().to(self.device)

    def execute(self, batch: Batch) -> torch.Tensor:
        return self._logits[: batch.logits_indices.shape[0]]  # read-only: samplers copy


class NullModelConfig:
    __slots__ = ("eos_token_id", "vocab_size")

    def __init__(self, vocab_size: int, eos_token_id: int | None):
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id


def make_kv_caches(mc: LlamaConfig, cfg: EngineConfig, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """One (2, num_blocks, block_size, KVH, D) cache per layer, zeroed."""
    shape = (2, cfg.num_blocks, cfg.block_size, mc.num_key_value_heads, mc.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(mc.num_hidden_layers)]


def _cos_sin(mc: LlamaConfig) -> torch.Tensor:
    return rope_table(mc)


def make_runner(folder: str | Path, cfg: EngineConfig) -> Runner:
    """The runner named in config, imported lazily so torch-only machines never load GPU code."""
    target = RUNNERS.get(cfg.runner)
    if target is None:
        raise ValueError(f"engine.runner: unknown runner {cfg.runner!r} (known: {', '.join(RUNNERS)})")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(folder, cfg)
