"""The `tensorrt` runner: the model's dense per-token segments as TensorRT engines, our kernels for
the KV write and paged attention between them, CUDA graphs for decode steps.

One step (T tokens, S sampling rows), every engine enqueued on torch's current stream:

    embed(input_ids) -> h                                  (T, E)
    per layer i:  pre.i(h, rope) -> q, k, v                (T, H, D), (T, KVH, D) x 2
                  write_kv(k, v)  paged_attention(q) -> o  (T, H, D)   our kernels (kernels/launcher)
                  post.i(o, h) -> h                        (T, E)
    final(h[logits_indices]) -> logits                     (S, V) float32

Engines come from trt_build (export and build on the first start when `meshgate build-engine` has
not made them). Attention, the decode CUDA graphs and the device checks are the cuda runner's.
"""
from __future__ import annotations

from pathlib import Path

import torch

from gateway.config import EngineConfig
from gateway.worker.batch import Batch
from gateway.worker.cuda_runner import (
    CudaAttention,
    DecodeGraphs,
    GraphedRunner,
    require_cuda,
)
from gateway.worker.families import check_context
from gateway.worker.model import LlamaConfig
from gateway.worker.runner import DTYPES, _cos_sin, make_kv_caches
from gateway.worker.trt_build import ENGINE_ROOT, build_engines, dims_of, export_onnx
from kernels import launcher as K
from kernels import onnx_export as ox
from kernels import trt_engine as te
from kernels.trt_engine import Engine, Profile


class TrtRunner(GraphedRunner):
    def __init__(self, folder: str | Path, cfg: EngineConfig, use_cuda_graphs: bool = True,
                 engine_root: Path = ENGINE_ROOT):
        require_cuda("tensorrt", cfg)
        te.tensorrt()  # the missing-package error before minutes of export
        mc = LlamaConfig.from_folder(folder)
        K.check_head_size(mc.head_dim)
        device = torch.device(cfg.device)
        profiles = te.token_profiles(cfg.max_num_batched_tokens, cfg.max_num_seqs)
        model = export_onnx(folder, cfg.dtype, engine_root)
        arch = te.arch_of(torch.cuda.get_device_capability(device))
        with torch.cuda.device(device):  # build and deserialize on the configured GPU
            paths = build_engines(model, profiles, arch)
            engines = {s.name: Engine(paths[s.name].read_bytes(), s) for s in model.specs}
            self.scratch = te.share_scratch(list(engines.values()), device)
        self._setup(mc, cfg, engines, profiles, use_cuda_graphs)

    def _setup(self, mc: LlamaConfig, cfg: EngineConfig, engines: dict, profiles: dict[str, Profile],  # type: ignore[type-arg]
               use_cuda_graphs: bool) -> None:
        """Everything after the engines exist; CPU tests build the runner through this with
        engines that run the ONNX files in onnxruntime. engines: segment name -> callable
        (*inputs) -> tuple of outputs, in kernels.onnx_export.segment_specs' order and shapes."""
        self.device, self.dtype, self.config = torch.device(cfg.device), DTYPES[cfg.dtype], mc
        if mc.qk_norm:  # the exported dense segments have no per-head q/k norm
            raise ValueError(f"engine.runner 'tensorrt' does not serve {mc.model_type} (q/k norm); use 'cuda' or 'torch'")
        check_context(mc, cfg.max_model_len)
        specs = ox.segment_specs(dims_of(mc), self.dtype)
        missing = {s.name for s in specs} - set(engines)
        assert not missing, f"no engine for segments {sorted(missing)}"
        self.engines = engines
        self.max_tokens, self.max_rows = profiles[ox.TOKENS].max, profiles[ox.ROWS].max
        self.cos_sin = _cos_sin(mc).to(self.device)  # (max_positions, D) fp32
        self.kv_caches = make_kv_caches(mc, cfg, self.dtype, self.device)
        self.attn = CudaAttention(cfg.max_model_len)
        self.scale = mc.head_dim**-0.5
        self.slot: int | None = None  # which engine contexts a forward uses: None, or a graph's size
        self.graphs = _SlotGraphs(self, cfg) if use_cuda_graphs else None

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits (S, vocab) fp32, as LlamaForCausalLM.forward."""
        t, e = batch.num_tokens, self.engines
        rows = int(batch.logits_indices.shape[0])
        if t > self.max_tokens or rows > self.max_rows:  # the engines' profile ends there
            raise ValueError(f"step of {t} tokens / {rows} rows exceeds the TensorRT profile "
                             f"({self.max_tokens} tokens, {self.max_rows} rows): rebuild with a larger budget")
        slot = self.slot
        rope = self.cos_sin.index_select(0, batch.positions)  # (T, D) fp32: one gather for all layers
        (h,) = e["embed"](batch.input_ids, slot=slot)  # (T, E)
        for i, kv in enumerate(self.kv_caches):
            q, k, v = e[f"pre.{i}"](h, rope, slot=slot)  # (T, H, D), (T, KVH, D), (T, KVH, D)
            K.write_kv(k, v, kv, batch.slot_mapping)
            o = self.attn(q, kv, batch, self.scale)  # (T, H, D), contiguous
            (h,) = e[f"post.{i}"](o.view(t, -1), h, slot=slot)  # (T, E): the residual stream through layer i
        if rows == 0:  # a step of prompt chunks that sample nothing; the profile starts at 1 row
            return torch.empty((0, self.config.vocab_size), dtype=torch.float32, device=self.device)
        (logits,) = e["final"](h.index_select(0, batch.logits_indices), slot=slot)  # (S, E) -> (S, V) fp32
        return logits


class _SlotGraphs(DecodeGraphs):
    """The cuda runner's decode graphs, each warmed up and captured with engine contexts of its own
    (kernels.trt_engine.Engine: a captured context must keep its shapes)."""

    runner: TrtRunner

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.runner.slot = size
        try:
            return super()._capture(size)
        finally:
            self.runner.slot = None
