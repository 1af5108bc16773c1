"""Embeddings from the worker's model: mean pooling of the final-norm hidden states over the
input's tokens, L2-normalized.

The model is a causal LM, so each token's state sees only the tokens before it; the mean over all
of them is the usual pooling for such models used as embedders (last-token pooling is the other),
and needs no token the tokenizer may lack. Inputs run as one padded batch through the model's
own weights (dense causal attention, no KV cache: nothing is generated), on the engine thread
between steps (async_engine.py), several requests' inputs together.
"""
from __future__ import annotations

import asyncio
import base64
from typing import Any

import torch
import torch.nn.functional as F

from gateway.core.errors import BadRequest
from gateway.core.responses_protocol import EmbeddingRequest
from gateway.worker.model import LlamaForCausalLM
from kernels import reference as ref

MAX_BATCH_TOKENS = 8192  # padded tokens per forward pass: bounds the activations' memory


@torch.inference_mode()
def embed(model: LlamaForCausalLM, seqs: list[list[int]]) -> torch.Tensor:
    """(len(seqs), hidden) fp32 unit vectors, one per token sequence (each non-empty)."""
    out = []
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths pad little
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(seqs[order[end]]) <= MAX_BATCH_TOKENS:
            end += 1
        out.append(_pooled(model, [seqs[i] for i in order[start:end]]))
        start = end
    pooled = torch.cat(out)
    result = torch.empty_like(pooled)
    result[torch.tensor(order)] = pooled
    return result


def _pooled(model: LlamaForCausalLM, seqs: list[list[int]]) -> torch.Tensor:
    states, valid = hidden_states(model, seqs)
    m = valid[..., None].float()
    return F.normalize((states * m).sum(1) / m.sum(1), dim=-1).cpu()


@torch.inference_mode()
def hidden_states(model: LlamaForCausalLM, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-norm hidden states (n, L, hidden) fp32 of a padded batch, and its (n, L) bool mask of
    real tokens."""
    w = model.lm_head.weight
    dev = w.device
    n, length = len(seqs), max(len(s) for s in seqs)
    ids = torch.zeros((n, length), dtype=torch.long)
    valid = torch.zeros((n, length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        valid[i, :len(s)] = True
    ids, valid = ids.to(dev), valid.to(dev)
    pos = torch.arange(length, device=dev).repeat(n)  # (n*length,)
    inner = model.model
    h = inner.embed_tokens(ids.view(-1))  # (n*length, hidden)
    t = h.shape[0]
    for layer in inner.decoder_layers():
        a = layer.self_attn
        x = layer.input_layernorm(h)
        q, k = a.q_proj(x).view(t, a.num_heads, a.head_dim), a.k_proj(x).view(t, a.num_kv_heads, a.head_dim)
        if a.q_norm is not None and a.k_norm is not None:  # Qwen3: per-head norms before rotary
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = ref.rotary(q, pos, model.cos_sin), ref.rotary(k, pos, model.cos_sin)
        v = a.v_proj(x).view(t, a.num_kv_heads, a.head_dim)
        q, k, v = (z.view(n, length, -1, a.head_dim).transpose(1, 2) for z in (q, k, v))  # (n, heads, L, D)
        rep = a.num_heads // a.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # causal, and padding sits after each sequence's tokens, so no real token attends to it
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=a.scale)
        h = h + a.o_proj(o.transpose(1, 2).reshape(t, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return inner.norm(h).view(n, length, -1).float(), valid


async def embed_request(engine: Any, e: EmbeddingRequest, max_model_len: int, timeout_s: float) -> dict[str, Any]:
    """The CreateEmbeddingResponse body for a parsed request (engine: the AsyncEngine)."""
    tok = engine.engine.tokenizer
    vocab = engine.engine.vocab_size
    if e.token_ids is not None:
        seqs = [list(s) for s in e.token_ids]
        if any(t >= vocab for s in seqs for t in s):
            raise BadRequest("'input' holds a token id outside the vocabulary", param="input")
    else:
        seqs = [tok.encode(t) for t in e.texts or ()]
    if any(len(s) > max_model_len for s in seqs):
        raise BadRequest(f"an input is longer than this model's {max_model_len} tokens", param="input",
                         code="context_length_exceeded")
    if any(not s for s in seqs):
        raise BadRequest("an input has no tokens", param="input")
    hidden = int(engine.engine.runner.model.config.hidden_size)
    if e.dimensions is not None and e.dimensions != hidden:
        # Truncating would only keep meaning for a model trained for it (Matryoshka); this one is not.
        raise BadRequest(f"this model's embeddings have {hidden} dimensions and cannot be shortened",
                         param="dimensions", code="unsupported_parameter")
    async with asyncio.timeout(timeout_s):
        vectors = await engine.embed(seqs)
    data = []
    for i, v in enumerate(vectors):
        emb: Any = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if e.encoding_format == "base64" \
            else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = sum(len(s) for s in seqs)
    return {"object": "list", "data": data, "model": e.model, "usage": {"prompt_tokens": n, "total_tokens": n}}
