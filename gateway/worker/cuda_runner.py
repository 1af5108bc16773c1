"""The `cuda` runner: the torch runner's dense layers with our kernels for attention (decode and
chunked prefill), KV write, RMSNorm and rotary, and CUDA graphs for decode steps.

Dense layers stay torch (cuBLAS); q/k/v and gate/up projections are fused into one GEMM each.
Decode-only steps of up to max_num_seqs sequences replay a CUDA graph captured (lazily, once per
size) at the next captured batch size; padded rows have seq_len 0 and slot -1, so they read and
write no KV and their logits are dropped.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from gateway.config import EngineConfig
from gateway.worker.batch import Batch
from gateway.worker.runner import TorchRunner
from kernels import launcher as K


class CudaAttention:
    """AttentionBackend over our paged-attention kernels. q: (T, H, D) -> (T, H, D)."""

    PREFILL_SPLIT_MAX_ROWS = 64  # more prefill rows fill the GPU without splitting the context

    def __init__(self, max_model_len: int):
        self.max_model_len = max_model_len

    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, batch: Batch, scale: float) -> torch.Tensor:
        nd, b = batch.num_decodes, int(batch.seq_lens.shape[0])
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if nd:
            K.paged_attention(
                q[:nd], kv_cache, batch.block_table[:nd], batch.seq_lens[:nd], scale,
                self._bound(batch.requests[:nd]), out=out[:nd],
            )
        if nd < b:
            qsl = batch.query_start_loc[nd:] - batch.query_start_loc[nd]  # (B - nd + 1,) int32
            bound = self._bound(batch.requests[nd:])
            rows = q.shape[0] - nd
            # Split partials cost (rows, H, P, D) fp32: only worth it for a few long rows.
            part = K.PARTITION_SIZE if rows <= self.PREFILL_SPLIT_MAX_ROWS else max(bound, 1)
            K.paged_attention(
                q[nd:], kv_cache, batch.block_table[nd:], batch.seq_lens[nd:], scale, bound,
                query_start_loc=qsl, out=out[nd:], partition_size=part,
            )
        return out

    def _bound(self, requests: list) -> int:  # type: ignore[type-arg]
        """A host-side bound of seq_lens (no device sync): a request's context after this step is
        at most its token count. Graph-captured batches have no requests: max_model_len."""
        if not requests:
            return self.max_model_len
        return min(self.max_model_len, max(r.num_tokens for r in requests))


def require_cuda(runner: str, cfg: EngineConfig) -> None:
    """The GPU runners' first check: a clear error instead of a failure deep in CUDA code."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"engine.runner {runner!r} needs a CUDA GPU, and torch.cuda.is_available() is False "
            "on this machine; use runner 'torch'"
        )
    if not cfg.device.startswith("cuda"):
        raise ValueError(f"engine.device: runner {runner!r} needs a CUDA device, got {cfg.device!r}")


class GraphedRunner:
    """A runner whose decode-only steps may replay CUDA graphs of its forward (DecodeGraphs)."""

    device: torch.device
    graphs: DecodeGraphs | None

    def forward(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def execute(self, batch: Batch) -> torch.Tensor:
        if self.graphs is not None:
            logits = self.graphs.run(batch)
            if logits is not None:
                return logits
        return self.forward(batch)


class CudaRunner(GraphedRunner):
    def __init__(self, folder: str | Path, cfg: EngineConfig, use_cuda_graphs: bool = True):
        require_cuda("cuda", cfg)
        self._setup(TorchRunner(folder, cfg), cfg, use_cuda_graphs)  # weights on the GPU, KV caches

    def _setup(self, base: TorchRunner, cfg: EngineConfig, use_cuda_graphs: bool) -> None:
        """Everything but the device checks (CPU tests build the runner through this)."""
        mc = base.config
        K.check_head_size(mc.head_dim)
        self.device, self.dtype, self.config = base.device, base.dtype, mc
        self.model, self.kv_caches = base.model, base.kv_caches
        self.attn = CudaAttention(cfg.max_model_len)
        self._fuse_weights()
        self.graphs = DecodeGraphs(self, cfg) if use_cuda_graphs else None

    def _fuse_weights(self) -> None:
        """One GEMM for q/k/v and one for gate/up: (out_features, hidden) concatenations."""
        self.layers = self.model.model.decoder_layers()
        self.qkv: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.gate_up: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            self.qkv.append(_cat(a.q_proj, a.k_proj, a.v_proj))
            self.gate_up.append(_cat(m.gate_proj, m.up_proj))

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits (S, vocab) fp32, as LlamaForCausalLM.forward with our kernels."""
        mc, inner = self.config, self.model.model
        h = inner.embed_tokens(batch.input_ids)  # (T, hidden)
        residual: torch.Tensor | None = None
        for i, (layer, kv) in enumerate(zip(inner.decoder_layers(), self.kv_caches)):
            n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
            if residual is None:
                residual, x = h, K.rms_norm(h, n1.weight, n1.eps)
            else:
                x, residual = K.fused_add_rms_norm(h, residual, n1.weight, n1.eps)
            a = self._attention(i, x, batch, kv)
            x, residual = K.fused_add_rms_norm(a, residual, n2.weight, n2.eps)
            gu = F.linear(x, *self.gate_up[i])  # (T, 2 * intermediate)
            g, u = torch.split(gu, mc.intermediate_size, dim=-1)
            h = layer.mlp.down_proj(F.silu(g) * u)
        assert residual is not None  # a model has layers
        h = (h + residual)[batch.logits_indices]  # (S, hidden)
        norm = inner.norm
        return self.model.lm_head(K.rms_norm(h.contiguous(), norm.weight, norm.eps)).float()

    def _attention(self, i: int, x: torch.Tensor, batch: Batch, kv: torch.Tensor) -> torch.Tensor:
        mc, t = self.config, x.shape[0]
        h, kvh, d = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
        qkv = F.linear(x, *self.qkv[i])  # (T, (H + 2 KVH) * D); the views below keep its row stride
        q = qkv[:, : h * d].view(t, h, d)
        k = qkv[:, h * d : (h + kvh) * d].view(t, kvh, d)
        v = qkv[:, (h + kvh) * d :].view(t, kvh, d)
        a = self.layers[i].self_attn
        if a.q_norm is not None and a.k_norm is not None:  # Qwen3: per-head norms, in place (torch)
            q.copy_(a.q_norm(q))
            k.copy_(a.k_norm(k))
        K.rotary(q, k, batch.positions, self.model.cos_sin)
        K.write_kv(k, v, kv, batch.slot_mapping)
        o = self.attn(q, kv, batch, d**-0.5)  # (T, H, D)
        return a.o_proj(o.view(t, h * d))


def _cat(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.cat([m.weight for m in linears])
    b = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    return w, b


def graph_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then multiples of 16 (vLLM's shape), up to max_num_seqs."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """CUDA graphs of decode-only steps over static input buffers, one per padded batch size."""

    def __init__(self, runner: GraphedRunner, cfg: EngineConfig):
        self.runner = runner
        self.sizes = graph_sizes(cfg.max_num_seqs)
        n, dev = self.sizes[-1], runner.device
        max_blocks = -(-cfg.max_model_len // cfg.block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.block_table = torch.zeros((n, max_blocks), dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device=dev)  # type: ignore[no-untyped-call]  # warmup and capture share it (one cuda.core wrap)

    def run(self, batch: Batch) -> torch.Tensor | None:
        """Logits (S, vocab), or None when the step is not a graph-able decode."""
        b = int(batch.seq_lens.shape[0])
        if batch.num_decodes != b or batch.num_tokens != b or b > self.sizes[-1]:
            return None
        if batch.block_table.shape[1] > self.block_table.shape[1]:
            return None
        size = next(s for s in self.sizes if s >= b)
        self._fill(batch, b, size)
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[batch.logits_indices]  # a fresh tensor: the next replay cannot change it

    def _fill(self, batch: Batch, b: int, size: int) -> None:
        self.input_ids[:b].copy_(batch.input_ids)
        self.positions[:b].copy_(batch.positions)
        self.seq_lens[:b].copy_(batch.seq_lens)
        self.slot_mapping[:b].copy_(batch.slot_mapping)
        self.block_table[:b, : batch.block_table.shape[1]].copy_(batch.block_table)
        if size > b:  # padded rows: no context, no KV write
            self.seq_lens[b:size].zero_()
            self.slot_mapping[b:size].fill_(-1)
            self.input_ids[b:size].zero_()
            self.positions[b:size].zero_()

    def _static_batch(self, size: int) -> Batch:
        return Batch(
            input_ids=self.input_ids[:size], positions=self.positions[:size],
            query_start_loc=self.query_start_loc[: size + 1], seq_lens=self.seq_lens[:size],
            slot_mapping=self.slot_mapping[:size], block_table=self.block_table[:size],
            logits_indices=self.logits_indices[:size], num_decodes=size, requests=[], sampling=[],
        )

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warmup runs the real step (KV writes are idempotent) and loads the kernels before capture.
        static = self._static_batch(size)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.runner.forward(static)
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            logits = self.runner.forward(static)  # (size, vocab) fp32
        return graph, logits
