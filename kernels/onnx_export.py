"""The dense per-token segments of a Llama step as small torch modules, and their ONNX export.

A step is `embed -> [pre(i) -> attention(i) -> post(i)] * layers -> final`; everything except the
attention (and the KV write before it) works on each token alone, so each of those pieces is a
graph with one dynamic axis, the step's token count. TensorRT builds an engine from each ONNX
file (kernels/trt_engine.py); our kernels do the paged attention between them.

    embed   input_ids (T,) int64                  -> hidden (T, E)
    pre.i   hidden (T, E), rope (T, D) float32    -> q (T, H, D), k (T, KVH, D), v (T, KVH, D)
            RMSNorm, the fused QKV projection, rotary on q and k
    post.i  attn (T, H*D), hidden (T, E)          -> hidden_out (T, E)
            O-proj + residual, RMSNorm, SwiGLU MLP + residual
    final   hidden (S, E)                         -> logits (S, V) float32
            final RMSNorm + LM head, on the S rows that sample (gathered before)

`rope` is each token's row of reference.rope_cos_sin, i.e. `cos_sin[positions]`, gathered once per
step by the caller. Why not the positions themselves: the (max_positions, D) table would then be a
constant of every layer's graph, e.g. 64 MiB x 32 layers for a 128k-context model with D 128.

The residual stream is carried whole (`hidden` is the sum so far), so layer 0 needs no special
case; the sums are the same ones, in the same order, as LlamaForCausalLM.forward's fused adds.
Segments are defined over plain weight tensors (DenseWeights): kernels/ imports nothing of the
worker (DESIGN.md §2), the worker maps its checkpoint onto these.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kernels import reference as ref

OPSET = 18  # within TensorRT 10's ONNX parser (opsets 9..22) and torch's dynamo exporter's default range
TOKENS = "num_tokens"  # the dynamic axis of embed/pre/post
ROWS = "num_rows"  # the dynamic axis of final (sampled rows)
EXPORT_FORMAT = "1"  # bump when a segment's definition changes: cached ONNX files are then stale
_INLINE_MAX_BYTES = 1 << 30  # larger segments keep weights in an external .data file (protobuf: < 2 GiB)


@dataclass(frozen=True, slots=True)
class Dims:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True, slots=True)
class LayerWeights:
    """One decoder layer; Linear weights are (out_features, in_features) as nn.Linear keeps them."""

    input_norm: torch.Tensor  # (E,)
    qkv: torch.Tensor  # ((H + 2 KVH) * D, E): q, k, v projections concatenated
    o_proj: torch.Tensor  # (E, H * D)
    post_norm: torch.Tensor  # (E,)
    gate_up: torch.Tensor  # (2 I, E): gate then up
    down: torch.Tensor  # (E, I)
    qkv_bias: torch.Tensor | None = None  # ((H + 2 KVH) * D,)
    o_bias: torch.Tensor | None = None  # (E,)
    gate_up_bias: torch.Tensor | None = None  # (2 I,)
    down_bias: torch.Tensor | None = None  # (E,)


@dataclass(frozen=True, slots=True)
class DenseWeights:
    embed: torch.Tensor  # (V, E)
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # (E,)
    lm_head: torch.Tensor  # (V, E)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float

    @property
    def dims(self) -> Dims:
        v, e = self.embed.shape
        return Dims(v, e, len(self.layers), self.num_heads, self.num_kv_heads, self.head_dim)

    def to(self, dtype: torch.dtype) -> DenseWeights:
        """Every weight in dtype: the exported graphs compute in the weights' dtype (RMSNorm in fp32)."""

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(dtype)

        def cast_opt(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else cast(t)

        def cast_layer(w: LayerWeights) -> LayerWeights:
            return LayerWeights(cast(w.input_norm), cast(w.qkv), cast(w.o_proj), cast(w.post_norm),
                                cast(w.gate_up), cast(w.down), cast_opt(w.qkv_bias), cast_opt(w.o_bias),
                                cast_opt(w.gate_up_bias), cast_opt(w.down_bias))

        return dataclasses.replace(self, embed=cast(self.embed), layers=[cast_layer(w) for w in self.layers],
                                   final_norm=cast(self.final_norm), lm_head=cast(self.lm_head))


# -- the segments -----------------------------------------------------------------------------
def rotary_rows(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """reference.rotary with the table rows already gathered: x (T, heads, D), rope (T, D) fp32."""
    half = x.shape[-1] // 2
    cos = rope[:, None, :half].to(x.dtype)
    sin = rope[:, None, half:].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Embed(nn.Module):
    def __init__(self, w: DenseWeights):
        super().__init__()
        self.weight = nn.Parameter(w.embed, requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (T,) -> (T, E)
        return F.embedding(input_ids, self.weight)


class PreAttention(nn.Module):
    def __init__(self, w: DenseWeights, layer: LayerWeights):
        super().__init__()
        self.h, self.kvh, self.d, self.eps = w.num_heads, w.num_kv_heads, w.head_dim, w.eps
        self.norm = nn.Parameter(layer.input_norm, requires_grad=False)
        self.qkv = nn.Parameter(layer.qkv, requires_grad=False)
        self.qkv_bias = _opt(layer.qkv_bias)

    def forward(self, hidden: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = ref.rms_norm(hidden, self.norm, self.eps)  # (T, E)
        qkv = F.linear(x, self.qkv, self.qkv_bias)  # (T, (H + 2 KVH) * D)
        q, k, v = torch.split(qkv, [self.h * self.d, self.kvh * self.d, self.kvh * self.d], dim=-1)
        # reshape, not view: the token count is symbolic in the exported graph
        q = rotary_rows(q.reshape(-1, self.h, self.d), rope)  # (T, H, D)
        k = rotary_rows(k.reshape(-1, self.kvh, self.d), rope)  # (T, KVH, D)
        return q, k, v.reshape(-1, self.kvh, self.d)


class PostAttention(nn.Module):
    def __init__(self, w: DenseWeights, layer: LayerWeights):
        super().__init__()
        self.eps = w.eps
        self.o_proj = nn.Parameter(layer.o_proj, requires_grad=False)
        self.o_bias = _opt(layer.o_bias)
        self.norm = nn.Parameter(layer.post_norm, requires_grad=False)
        self.gate_up = nn.Parameter(layer.gate_up, requires_grad=False)
        self.gate_up_bias = _opt(layer.gate_up_bias)
        self.down = nn.Parameter(layer.down, requires_grad=False)
        self.down_bias = _opt(layer.down_bias)

    def forward(self, attn: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # attn (T, H*D); hidden (T, E): the residual stream before this layer
        r = F.linear(attn, self.o_proj, self.o_bias) + hidden  # as the model's fused add: a + residual
        gu = F.linear(ref.rms_norm(r, self.norm, self.eps), self.gate_up, self.gate_up_bias)  # (T, 2I)
        g, u = gu.chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, self.down, self.down_bias) + r  # (T, E)


class Final(nn.Module):
    def __init__(self, w: DenseWeights):
        super().__init__()
        self.eps = w.eps
        self.norm = nn.Parameter(w.final_norm, requires_grad=False)
        self.lm_head = nn.Parameter(w.lm_head, requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (S, E) -> (S, V) float32
        return F.linear(ref.rms_norm(hidden, self.norm, self.eps), self.lm_head).float()


def _opt(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=False)


# -- segment descriptions (what a runner binds; no weights needed) ----------------------------
@dataclass(frozen=True, slots=True)
class TensorSpec:
    """An input or output: dims are ints or the name of the dynamic axis (always dim 0)."""

    name: str
    dims: tuple[int | str, ...]
    dtype: torch.dtype

    def shape(self, n: int) -> tuple[int, ...]:
        return tuple(n if isinstance(d, str) else d for d in self.dims)


@dataclass(frozen=True, slots=True)
class SegmentSpec:
    name: str  # "embed", "pre.3", "post.3", "final": also the ONNX file's stem
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def axis(self) -> str:
        return str(self.inputs[0].dims[0])


def segment_specs(d: Dims, dtype: torch.dtype) -> list[SegmentSpec]:
    """embed, pre.0, post.0, ..., final: a step runs them in this order (attention between)."""
    e, h, kvh, hd = d.hidden_size, d.num_heads, d.num_kv_heads, d.head_dim
    hidden = TensorSpec("hidden", (TOKENS, e), dtype)
    out = [SegmentSpec("embed", (TensorSpec("input_ids", (TOKENS,), torch.int64),), (hidden,))]
    for i in range(d.num_layers):
        out.append(SegmentSpec(
            f"pre.{i}", (hidden, TensorSpec("rope", (TOKENS, hd), torch.float32)),
            (TensorSpec("q", (TOKENS, h, hd), dtype), TensorSpec("k", (TOKENS, kvh, hd), dtype),
             TensorSpec("v", (TOKENS, kvh, hd), dtype)),
        ))
        out.append(SegmentSpec(
            f"post.{i}", (TensorSpec("attn", (TOKENS, h * hd), dtype), hidden),
            (TensorSpec("hidden_out", (TOKENS, e), dtype),),
        ))
    out.append(SegmentSpec("final", (TensorSpec("hidden", (ROWS, e), dtype),),
                           (TensorSpec("logits", (ROWS, d.vocab_size), torch.float32),)))
    return out


@dataclass(frozen=True, slots=True)
class Segment:
    spec: SegmentSpec
    module: nn.Module = field(repr=False)

    def example(self, n: int, vocab_size: int) -> tuple[torch.Tensor, ...]:
        """Seeded inputs with n on the dynamic axis (the same every call)."""
        g = torch.Generator().manual_seed(n)
        out = []
        for s in self.spec.inputs:
            if s.dtype == torch.int64:  # token ids
                out.append(torch.randint(0, vocab_size, s.shape(n), generator=g))
            elif s.name == "rope":  # rows of a real table: |cos|, |sin| <= 1 as in a step
                pos = torch.randint(0, 4096, (n,), generator=g)
                out.append(ref.rope_cos_sin(4096, s.dims[1], 10000.0)[pos])  # type: ignore[arg-type]
            else:
                out.append(torch.randn(s.shape(n), generator=g).to(s.dtype))
        return tuple(out)


def segments(w: DenseWeights) -> list[Segment]:
    specs = segment_specs(w.dims, w.embed.dtype)
    mods: list[nn.Module] = [Embed(w)]
    for layer in w.layers:
        mods += [PreAttention(w, layer), PostAttention(w, layer)]
    mods.append(Final(w))
    return [Segment(s, m.eval()) for s, m in zip(specs, mods, strict=True)]


# -- export -----------------------------------------------------------------------------------
def export_segment(seg: Segment, path: Path, example: tuple[torch.Tensor, ...]) -> Path:
    """One segment to ONNX (torch's dynamo exporter, onnxscript) with dim 0 dynamic. The example
    must have >= 2 rows: torch.export specialises sizes 0 and 1, which would pin the axis."""
    assert all(t.shape[0] >= 2 for t in example), "trace with at least 2 rows"
    spec = seg.spec
    path.parent.mkdir(parents=True, exist_ok=True)
    nbytes = sum(p.numel() * p.element_size() for p in seg.module.parameters())
    axis = torch.export.Dim(spec.axis, min=1, max=1 << 20)
    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            seg.module, example, dynamo=True, opset_version=OPSET, verbose=False,
            input_names=[s.name for s in spec.inputs], output_names=[s.name for s in spec.outputs],
            dynamic_shapes={s.name: {0: axis} for s in spec.inputs}, optimize=True,
        )
    assert program is not None
    program.save(str(path), external_data=nbytes > _INLINE_MAX_BYTES)
    return path


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter logs each op set it skips (torchvision's) and its optimizer every pass it runs:
    hundreds of lines per model that say nothing about our graphs."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_all(w: DenseWeights, out_dir: Path, example_rows: int = 8) -> dict[str, Path]:
    """Every segment of w to out_dir/NAME.onnx; returns {segment name: path}."""
    paths = {}
    for seg in segments(w):
        ex = seg.example(example_rows, w.dims.vocab_size)
        paths[seg.spec.name] = export_segment(seg, out_dir / f"{seg.spec.name}.onnx", ex)
    return paths


def onnx_files(path: Path) -> list[Path]:
    """The ONNX file and its external weights file when there is one."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def sha256_onnx(path: Path) -> str:
    """Content hash over the graph and its external weights: the engine cache's ONNX identity."""
    h = hashlib.sha256()
    for f in onnx_files(path):
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()
