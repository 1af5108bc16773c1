"""A model's TensorRT engines: checkpoint -> dense segments as ONNX (CPU) -> engines (GPU), cached.

Layout under an engine root (the worker's is ENGINE_ROOT; `meshgate build-engine --out` picks
another):

    ROOT/<folder name>-<model digest>-<dtype>/manifest.json      segments, ONNX hashes
                                             /onnx/<segment>.onnx
                                             /engines/<segment>-<arch>-<key digest>.plan

The ONNX export depends only on the checkpoint and dtype, so it is done once and reused; engines
are keyed by kernels.trt_engine.EngineKey (TensorRT version, GPU arch, ONNX hash, profile,
dtype), so another GPU, TensorRT or token budget builds its own beside the others.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from gateway.worker.model import LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, load_weights
from gateway.worker.runner import DTYPES
from kernels import onnx_export as ox
from kernels import trt_engine as te

log = logging.getLogger("meshgate.worker")

ENGINE_ROOT = Path("~/.cache/meshgate/engines")


def dense_weights(model: LlamaForCausalLM) -> ox.DenseWeights:
    """The checkpoint's tensors in the segments' layout: q/k/v and gate/up concatenated."""
    c, inner = model.config, model.model

    def fuse(*ms: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = torch.cat([m.weight.detach() for m in ms])
        b = torch.cat([m.bias.detach() for m in ms]) if ms[0].bias is not None else None
        return w, b

    def bias(m: torch.nn.Linear) -> torch.Tensor | None:
        return None if m.bias is None else m.bias.detach()

    layers = []
    for layer in cast(list[LlamaDecoderLayer], list(inner.layers)):
        a, m = layer.self_attn, layer.mlp
        qkv, qkv_b = fuse(a.q_proj, a.k_proj, a.v_proj)
        gate_up, gate_up_b = fuse(m.gate_proj, m.up_proj)
        layers.append(ox.LayerWeights(
            input_norm=layer.input_layernorm.weight.detach(), qkv=qkv, o_proj=a.o_proj.weight.detach(),
            post_norm=layer.post_attention_layernorm.weight.detach(), gate_up=gate_up,
            down=m.down_proj.weight.detach(), qkv_bias=qkv_b, o_bias=bias(a.o_proj),
            gate_up_bias=gate_up_b, down_bias=bias(m.down_proj),
        ))
    return ox.DenseWeights(
        embed=inner.embed_tokens.weight.detach(), layers=layers, final_norm=inner.norm.weight.detach(),
        lm_head=model.lm_head.weight.detach(), num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, eps=c.rms_norm_eps,
    )


def dims_of(mc: LlamaConfig) -> ox.Dims:
    return ox.Dims(mc.vocab_size, mc.hidden_size, mc.num_hidden_layers, mc.num_attention_heads,
                   mc.num_key_value_heads, mc.head_dim)


def model_digest(folder: Path) -> str:
    """config.json's text and each checkpoint file's name, size and mtime: enough to notice a
    changed checkpoint without reading gigabytes at every start (a copied folder re-exports)."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        h.update(f"\0{f.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    h.update(f"\0format {ox.EXPORT_FORMAT}".encode())
    return h.hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class ExportedModel:
    dir: Path  # ROOT/<model id>
    dtype: str  # "float16" | "bfloat16" | "float32"
    specs: list[ox.SegmentSpec]  # in step order
    onnx: dict[str, tuple[Path, str]]  # segment -> (ONNX path, sha256)

    @property
    def engine_dir(self) -> Path:
        return self.dir / "engines"


def model_dir(folder: Path, dtype: str, root: Path = ENGINE_ROOT) -> Path:
    folder = Path(folder).expanduser().resolve()
    return Path(root).expanduser() / f"{folder.name}-{model_digest(folder)}-{dtype}"


def export_onnx(folder: str | Path, dtype: str, root: Path = ENGINE_ROOT) -> ExportedModel:
    """The model's ONNX segments in dtype, exported on the CPU unless a complete export is there."""
    folder = Path(folder).expanduser().resolve()
    out = model_dir(folder, dtype, root)
    mc = LlamaConfig.from_folder(folder)
    specs = ox.segment_specs(dims_of(mc), DTYPES[dtype])
    onnx = _read_manifest(out, specs)
    if onnx is None:
        onnx = _export(folder, mc, dtype, out)
        manifest = {"format": ox.EXPORT_FORMAT, "model": str(folder), "dtype": dtype,
                    "segments": {n: {"file": p.name, "sha256": h, "bytes": p.stat().st_size} for n, (p, h) in onnx.items()}}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return ExportedModel(out, dtype, specs, onnx)


def _read_manifest(out: Path, specs: list[ox.SegmentSpec]) -> dict[str, tuple[Path, str]] | None:
    """A previous export, when its manifest names every segment and the files are there (their
    sizes checked, not re-hashed: hashing a large model at each start costs minutes)."""
    try:
        m = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    segs = m.get("segments", {})
    if m.get("format") != ox.EXPORT_FORMAT or set(segs) != {s.name for s in specs}:
        return None
    onnx = {}
    for name, entry in segs.items():
        path = out / "onnx" / entry["file"]
        if not path.exists() or sum(f.stat().st_size for f in ox.onnx_files(path)) < entry["bytes"]:
            return None
        onnx[name] = (path, entry["sha256"])
    return onnx


def _export(folder: Path, mc: LlamaConfig, dtype: str, out: Path) -> dict[str, tuple[Path, str]]:
    log.info("exporting %s to ONNX (%s, %d segments) under %s", folder, dtype, 2 * mc.num_hidden_layers + 2, out)
    with torch.device("meta"):
        model = LlamaForCausalLM(mc)
    model = model.to_empty(device="cpu").to(DTYPES[dtype])  # load_weights casts into these
    load_weights(model, folder)
    weights = dense_weights(model)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".onnx-"))
    try:  # into a temporary folder, then renamed: a crash never leaves a half export named onnx/
        paths = ox.export_all(weights, tmp)
        shutil.rmtree(out / "onnx", ignore_errors=True)
        tmp.rename(out / "onnx")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {name: (out / "onnx" / p.name, ox.sha256_onnx(out / "onnx" / p.name)) for name, p in paths.items()}


def engine_keys(model: ExportedModel, profiles: dict[str, te.Profile], arch: str, trt_version: str) -> dict[str, te.EngineKey]:
    return {s.name: te.EngineKey(trt_version, arch, model.onnx[s.name][1], profiles[s.axis], model.dtype)
            for s in model.specs}


def build_engines(model: ExportedModel, profiles: dict[str, te.Profile], arch: str, build: bool = True) -> dict[str, Path]:
    """Each segment's cached engine, built when missing (needs the GPU of `arch` and TensorRT)."""
    keys = engine_keys(model, profiles, arch, te.trt_version())
    paths = {}
    for spec in model.specs:
        onnx_path = model.onnx[spec.name][0]
        path = keys[spec.name].path(model.engine_dir, spec.name)
        if not path.exists():
            log.info("building TensorRT engine %s (%s)", path.name, arch)
        paths[spec.name] = te.load_or_build(onnx_path, keys[spec.name], model.engine_dir, build=build)
    return paths


def build_engine_command(folder: str, out: str | None, dtype: str, max_tokens: int, max_seqs: int) -> int:
    """`meshgate build-engine`: ONNX on any machine; engines where there is a GPU and TensorRT."""
    root = Path(out) if out else ENGINE_ROOT
    model = export_onnx(folder, dtype, root)
    print(f"onnx: {len(model.onnx)} segments in {model.dir / 'onnx'}", flush=True)
    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    else:
        try:
            te.tensorrt()
        except RuntimeError as e:
            reason = str(e)
    if reason:
        print(f"meshgate: build-engine: engines not built: {reason}; the ONNX files are in {model.dir / 'onnx'}",
              file=sys.stderr)
        return 1
    arch = te.arch_of(torch.cuda.get_device_capability(0))
    paths = build_engines(model, te.token_profiles(max_tokens, max_seqs), arch)
    print(f"engines: {len(paths)} for {arch}, TensorRT {te.trt_version()}, in {model.engine_dir}")
    return 0
