"""Torch definitions of every kernel op: the meaning our CUDA kernels must reproduce.

The torch runner calls these directly; kernel tests compare against them. Shapes use the
flattened-batch layout of DESIGN.md §5: T tokens in the step, B sequences, H query heads,
KVH key/value heads, D head size. KV cache per layer: (2, num_blocks, block_size, KVH, D).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Llama defines it: normalise in fp32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x; return (rms_norm(residual), residual)."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def rope_cos_sin(max_positions: int, head_dim: int, theta: float) -> torch.Tensor:
    """(max_positions, head_dim) fp32 table: cos in the first half, sin in the second."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def rotary(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (GPT-NeoX / Hugging Face Llama) rotary embedding.

    x: (T, heads, D); positions: (T,); cos_sin: (max_positions, D).
    """
    half = x.shape[-1] // 2
    cs = cos_sin[positions]  # (T, D)
    cos = cs[:, None, :half].to(x.dtype)
    sin = cs[:, None, half:].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each token's K/V at its slot (block * block_size + offset); slot -1 is skipped.

    key, value: (T, KVH, D); kv_cache: (2, num_blocks, block_size, KVH, D); slot_mapping: (T,).
    """
    flat = kv_cache.view(2, -1, *kv_cache.shape[3:])  # (2, num_slots, KVH, D)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat[0].index_copy_(0, slots, key[keep].to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, value[keep].to(kv_cache.dtype))


def gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of B sequences read through their block tables: each (B, max_len, KVH, D)."""
    b = block_table.shape[0]
    num_blocks_needed = -(-max_len // kv_cache.shape[2])
    ids = block_table[:, :num_blocks_needed].reshape(-1).long()
    # index_select copies whole blocks in one pass (faster than advanced indexing on CPU)
    k = kv_cache[0].index_select(0, ids).view(b, -1, *kv_cache.shape[3:])[:, :max_len]
    v = kv_cache[1].index_select(0, ids).view(b, -1, *kv_cache.shape[3:])[:, :max_len]
    return k, v


def paged_attention_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over its whole cached context.

    q: (B, H, D); block_table: (B, max_blocks) int; seq_lens: (B,) context length including the
    query token (whose K/V is already written). Returns (B, H, D) in q's dtype.
    """
    max_len = int(seq_lens.max())
    k, v = gather_kv(kv_cache, block_table, max_len)  # (B, L, KVH, D)
    mask = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None]  # (B, L)
    out = F.scaled_dot_product_attention(
        q.float().unsqueeze(2),  # (B, H, 1, D)
        k.float().transpose(1, 2),  # (B, KVH, L, D)
        v.float().transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2).to(q.dtype)


def paged_attention_prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention for chunks of several query tokens over cached + new K/V.

    q: (T, H, D) with sequence b's queries at query_start_loc[b]:query_start_loc[b+1]; they are
    the last q_len tokens of its seq_lens[b]-token context. Returns (T, H, D).
    """
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        s, e = starts[b], starts[b + 1]
        q_len = e - s
        k, v = gather_kv(kv_cache, block_table[b : b + 1], seq_len)  # (1, L, KVH, D)
        # Query j sits at absolute position seq_len - q_len + j and sees keys 0..that position.
        qpos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= qpos[:, None]  # (q_len, L)
        o = F.scaled_dot_product_attention(
            q[s:e].float().transpose(0, 1).unsqueeze(0),  # (1, H, q_len, D)
            k.float().transpose(1, 2),
            v.float().transpose(1, 2),
            attn_mask=mask[None, None],
            scale=scale,
            enable_gqa=True,
        )
        out[s:e] = o[0].transpose(0, 1).to(q.dtype)
    return out
