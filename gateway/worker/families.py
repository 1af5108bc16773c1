"""The model families the worker serves, read from a Hugging Face folder's config.json.

Llama (2, 3.x), Mistral, Qwen2/Qwen2.5 and Qwen3 are one decoder (RMSNorm, RoPE, GQA, SwiGLU) with
a few switches, set here per family:
- Qwen2: biases on the q/k/v projections (not on o_proj);
- Qwen3: RMSNorm of each head of q and k before the rotary embedding (q_norm, k_norm);
- Llama: attention_bias / mlp_bias as the config says;
- rope scaling: none, `linear`, or Llama 3's `llama3` (frequency-dependent); others are refused;
- sliding-window attention (Mistral v0.1, Qwen with use_sliding_window) is not implemented: such a
  model is served only when the engine's context never exceeds the window (then full attention is
  the same computation), and refused otherwise with the limit to set.
The family is chosen by model_type, else by architectures; anything else is a clear error.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

# model_type -> the architectures name Hugging Face gives it
FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModel(ValueError):
    pass


def family_of(d: dict[str, Any]) -> str:
    """The family of a config.json; a folder with neither field is taken as Llama (older exports)."""
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type in FAMILIES:
        return str(model_type)
    by_arch = {a: t for t, a in FAMILIES.items()}
    for a in archs:
        if a in by_arch:
            return by_arch[a]
    if model_type is None and not archs:
        return "llama"
    raise UnsupportedModel(
        f"unsupported model: model_type={model_type!r}, architectures={archs!r}; this worker serves "
        f"{', '.join(f'{t} ({a})' for t, a in FAMILIES.items())}"
    )


def family_fields(d: dict[str, Any]) -> dict[str, Any]:
    """The LlamaConfig fields that differ between families (biases, q/k norm, rope, window)."""
    family = family_of(d)
    attention_bias = bool(d.get("attention_bias", False))
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModel(f"config.json: rope scaling {rope_type!r} is not supported (known: {', '.join(ROPE_TYPES)})")
    return {
        "model_type": family,
        "qkv_bias": True if family == "qwen2" else attention_bias and family != "mistral",
        "attention_bias": attention_bias and family in ("llama", "qwen3"),  # o_proj's bias
        "mlp_bias": bool(d.get("mlp_bias", False)) and family == "llama",
        "qk_norm": family == "qwen3",
        "rope_theta": float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        "rope_type": rope_type,
        "rope_factor": float(rope.get("factor", 1.0)),
        "rope_low_freq_factor": float(rope.get("low_freq_factor", 1.0)),
        "rope_high_freq_factor": float(rope.get("high_freq_factor", 4.0)),
        "rope_original_max_positions": int(rope.get("original_max_position_embeddings", 8192)),
        "sliding_window": sliding_window(d, family),
    }


def sliding_window(d: dict[str, Any], family: str) -> int | None:
    """The window some layers attend within, or None when every layer attends to all."""
    window = d.get("sliding_window")
    if not window:
        return None
    if family == "mistral":
        return int(window)
    layer_types = d.get("layer_types")
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    return int(window) if family in ("qwen2", "qwen3") and d.get("use_sliding_window") else None


def check_context(mc: Any, max_model_len: int) -> None:
    """Refuse a sliding-window model whose window the engine's context could exceed."""
    w = mc.sliding_window
    if w is not None and max_model_len > w:
        raise UnsupportedModel(
            f"the model attends within a sliding window of {w} tokens, which this worker does not "
            f"implement; set engine.max_model_len <= {w} (it is {max_model_len}) to serve it with "
            "full attention, which is the same computation within the window"
        )


def inv_freq(mc: Any) -> torch.Tensor:
    """(head_dim / 2,) fp32 rotary frequencies, with the config's rope scaling applied."""
    d = mc.head_dim
    freq = 1.0 / (mc.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if mc.rope_type == "linear":
        return freq / mc.rope_factor
    if mc.rope_type == "llama3":
        # Llama 3: long wavelengths (beyond original/low) are slowed by `factor`, short ones
        # (below original/high) are kept, and the band between is interpolated linearly in
        # original/wavelength.
        wavelen = 2 * math.pi / freq
        lo, hi, orig = mc.rope_low_freq_factor, mc.rope_high_freq_factor, mc.rope_original_max_positions
        slowed = freq / mc.rope_factor
        mix = ((orig / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)
        blended = (1 - mix) * slowed + mix * freq
        return torch.where(wavelen > orig / lo, slowed, torch.where(wavelen < orig / hi, freq, blended))
    return freq


def rope_table(mc: Any) -> torch.Tensor:
    """(max_positions, head_dim) fp32: cos in the first half, sin in the second (kernels' layout)."""
    freqs = torch.outer(torch.arange(mc.max_position_embeddings, dtype=torch.float32), inv_freq(mc))
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names when there is one (a folder may
    hold other files, e.g. Mistral's consolidated.safetensors), else every *.safetensors."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not there: {missing[:3]}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    return files
