"""Llama architecture (RMSNorm, RoPE, GQA, SwiGLU) over the flattened batch and a paged KV cache,
with the switches that make it Mistral, Qwen2/2.5 and Qwen3 too (gateway/worker/families.py).

Parameter names follow Hugging Face's *ForCausalLM of those families, so a safetensors checkpoint
loads as is. Attention is a pluggable backend (torch references here; our CUDA kernels in the cuda
runner).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from gateway.worker import families
from gateway.worker.batch import Batch
from kernels import reference as ref


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # o_proj's bias (Llama's attention_bias also sets qkv_bias)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    model_type: str = "llama"
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
    rope_type: str = "default"  # default | linear | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    sliding_window: int | None = None  # served only when the context never exceeds it

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        """From a config.json of a supported family (UnsupportedModel otherwise)."""
        fam = families.family_fields(d)
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            **fam,
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> LlamaConfig:
        return cls.from_hf(json.loads((Path(folder) / "config.json").read_text()))


class AttentionBackend(Protocol):
    def __call__(
        self, q: torch.Tensor, kv_cache: torch.Tensor, batch: Batch, scale: float
    ) -> torch.Tensor: ...


DECODE_BUCKETS = 4


def torch_attention(q: torch.Tensor, kv_cache: torch.Tensor, batch: Batch, scale: float) -> torch.Tensor:
    """q: (T, H, D), K/V of this step already written. Decodes batched, prefill chunks causal."""
    nd = batch.num_decodes
    out = torch.empty_like(q) if nd < len(batch.requests) else None
    if nd:
        dec = _bucketed_decode(q[:nd], kv_cache, batch.block_table[:nd], batch.seq_lens[:nd], scale)
        if out is None:
            return dec
        out[:nd] = dec
    assert out is not None
    qsl = batch.query_start_loc[nd:] - batch.query_start_loc[nd]
    out[nd:] = ref.paged_attention_prefill(
        q[nd:], kv_cache, batch.block_table[nd:], qsl, batch.seq_lens[nd:], scale
    )
    return out


def _bucketed_decode(
    q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Batched decode pads every sequence to the longest context; sorting by length and running a
    few buckets bounds that waste (the gather dominates a CPU decode step)."""
    n = q.shape[0]
    if n < 2 * DECODE_BUCKETS:
        return ref.paged_attention_decode(q, kv_cache, block_table, seq_lens, scale)
    order = torch.argsort(seq_lens)
    out = torch.empty_like(q)
    for idx in torch.tensor_split(order, DECODE_BUCKETS):
        out[idx] = ref.paged_attention_decode(q[idx], kv_cache, block_table[idx], seq_lens[idx], scale)
    return out


class LlamaAttention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.scale = c.head_dim**-0.5
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        # Qwen3: per-head RMSNorm of q and k (before rotary)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        batch: Batch,
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, KVH, D)
        cos_sin: torch.Tensor,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = ref.rotary(q, batch.positions, cos_sin)
        k = ref.rotary(k, batch.positions, cos_sin)
        ref.write_kv(k, v, kv_cache, batch.slot_mapping)
        o = attn(q, kv_cache, batch, self.scale)  # (T, H, D)
        return self.o_proj(o.reshape(t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ref.rms_norm(x, self.weight, self.eps)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(c)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class LlamaModel(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def decoder_layers(self) -> list[LlamaDecoderLayer]:
        """The layers, typed (iterating an nn.ModuleList yields plain Modules)."""
        return cast("list[LlamaDecoderLayer]", list(self.layers))


class LlamaForCausalLM(nn.Module):
    cos_sin: torch.Tensor  # a buffer: (max_position, head_dim) rotary table

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.config = c
        self.model = LlamaModel(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("cos_sin", families.rope_table(c), persistent=False)

    @torch.inference_mode()
    def forward(
        self, batch: Batch, kv_caches: list[torch.Tensor], attn: AttentionBackend = torch_attention
    ) -> torch.Tensor:
        """Logits (S, vocab) in fp32 for the batch's sampling positions."""
        h = self.model.embed_tokens(batch.input_ids)  # (T, hidden)
        residual: torch.Tensor | None = None
        for layer, kv in zip(self.model.decoder_layers(), kv_caches):
            n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
            if residual is None:
                residual, x = h, n1(h)
            else:
                x, residual = ref.fused_add_rms_norm(h, residual, n1.weight, n1.eps)
            a = layer.self_attn(x, batch, kv, self.cos_sin, attn)
            x, residual = ref.fused_add_rms_norm(a, residual, n2.weight, n2.eps)
            h = layer.mlp(x)
        assert residual is not None  # a model has layers
        h = h + residual
        h = h[batch.logits_indices]
        return self.lm_head(self.model.norm(h)).float()


def load_weights(model: LlamaForCausalLM, folder: str | Path) -> None:
    """Load a Hugging Face folder's safetensors (its index's shards when it has one) into the model
    (strict)."""
    from safetensors.torch import load_file

    files = families.weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected = {k for k in model.state_dict() if k != "lm_head.weight"}
    else:
        expected = set(model.state_dict())
    missing = expected - set(state)
    unexpected = set(state) - expected - {k for k in state if "rotary_emb" in k}
    if missing or unexpected:
        raise ValueError(f"checkpoint mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if model.config.tie_word_embeddings:
        # to_empty() (meta -> real tensors) gives each module its own tensor: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k in expected:
            params[k].copy_(state[k])
