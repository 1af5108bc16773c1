"""TensorRT engines of the ONNX segments (kernels/onnx_export.py): cache keys, build, load, run.

An engine is only valid for the TensorRT version and GPU architecture that built it, the exact
ONNX graph and weights, and the shape range of its optimization profile; the cache key is those,
plus the dtype (builder settings may depend on it even where the graph already fixes the types).
The key and paths are pure and tested on any machine; building and running need a GPU and the
`tensorrt` package, imported lazily (`import kernels.trt_engine` works without either).

Networks are strongly typed: every tensor's type comes from the ONNX graph (fp16/bf16 weights,
RMSNorm in fp32 through the graph's casts), so TensorRT never picks a precision by itself.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from kernels.onnx_export import SegmentSpec

WORKSPACE_BYTES = 1 << 30  # the builder's scratch limit for tactics (not kept by the engine)


@dataclass(frozen=True, slots=True)
class Profile:
    """min <= opt <= max over the dynamic axis; TensorRT tunes its kernels for opt."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


def token_profiles(max_num_batched_tokens: int, max_num_seqs: int) -> dict[str, Profile]:
    """The profiles of a worker's engines by axis name. Token segments see up to the step's token
    budget (a padded decode graph may exceed it when max_num_seqs is larger); opt is a full decode
    batch, the most frequent step. The final segment sees one row per sampling sequence."""
    tokens = max(max_num_batched_tokens, max_num_seqs)
    return {
        "num_tokens": Profile(1, min(max_num_seqs, tokens), tokens),
        "num_rows": Profile(1, max_num_seqs, max_num_seqs),
    }


@dataclass(frozen=True, slots=True)
class EngineKey:
    trt_version: str  # e.g. "10.13.3.9"
    arch: str  # e.g. "sm_90"
    onnx_sha256: str  # kernels.onnx_export.sha256_onnx
    profile: Profile
    dtype: str  # "float16" | "bfloat16" | "float32"

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def path(self, cache_dir: Path, name: str) -> Path:
        """name is for people (the segment); the digest is what tells engines apart."""
        return Path(cache_dir) / f"{name}-{self.arch}-{self.digest()}.plan"


def arch_of(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


# -- tensorrt (lazy) --------------------------------------------------------------------------
def tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RuntimeError(
            "engine.runner 'tensorrt' needs NVIDIA's TensorRT Python package, which is not installed: "
            "pip install 'meshgate[tensorrt]'"
        ) from e
    return trt


def trt_version() -> str:
    return str(tensorrt().__version__)


def _logger(trt: Any) -> Any:
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


_LOGGER: Any = None


def profile_shapes(dims: Sequence[int], p: Profile) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shapes of an input whose ONNX dims have -1 on the dynamic axis (dim 0)."""
    if not dims or dims[0] != -1 or any(d < 0 for d in dims[1:]):
        raise ValueError(f"expected one dynamic leading dim, got {tuple(dims)}")
    return tuple((n, *dims[1:]) for n in (p.min, p.opt, p.max))


def build_engine(onnx_path: Path, profile: Profile, dtype: str, workspace_bytes: int = WORKSPACE_BYTES) -> bytes:
    """Parse the ONNX file into a strongly typed network and build it with one optimization profile
    over its dynamic axis; the serialized engine (a .plan). fp32 networks are built without TF32
    (TensorRT's default allows it), so that they compute what the fp32 torch runner computes."""
    trt = tensorrt()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # always on in 11.x
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: external weights resolve beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if dtype == "float32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        opt_profile.set_shape(t.name, *profile_shapes(list(t.shape), profile))
    config.add_optimization_profile(opt_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    return bytes(plan)


def save_plan(path: Path, plan: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(plan)
    tmp.replace(path)  # atomic: a worker starting beside a build never reads half an engine


def load_or_build(onnx_path: Path, key: EngineKey, cache_dir: Path, build: bool = True) -> Path:
    """The cached engine for key, built from onnx_path first when missing (and build is True)."""
    path = key.path(cache_dir, onnx_path.stem)
    if not path.exists():
        if not build:
            raise FileNotFoundError(f"no engine {path.name} in {cache_dir} (meshgate build-engine makes it)")
        save_plan(path, build_engine(onnx_path, key.profile, key.dtype))
    return path


# -- running ----------------------------------------------------------------------------------
def _torch_dtype(trt: Any, dt: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int64: torch.int64, trt.int32: torch.int32}
    return table[dt]


class Engine:
    """One deserialized engine and its execution contexts, one per `slot`: None for eager steps and
    one per captured CUDA graph. A graph replays what an enqueue recorded, and an enqueue may read
    the context's shape state from memory; a context that a graph was captured with therefore never
    sees another shape. Activation scratch memory is given from outside (set_scratch): the
    segments of a step run one after another on one stream, so one buffer serves every context of
    every engine instead of one allocation each."""

    def __init__(self, plan: bytes, spec: SegmentSpec):
        trt = tensorrt()
        self.trt, self.spec = trt, spec
        self.engine = trt.Runtime(_logger(trt)).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError(f"{spec.name}: TensorRT could not load the engine (built by another version?)")
        self._check_io()
        self.scratch_bytes = int(self.engine.device_memory_size_v2)  # the profile's largest shapes
        self.scratch: torch.Tensor | None = None
        self.contexts: dict[int | None, Any] = {}

    def _check_io(self) -> None:
        """The engine's tensors are the spec's, with its dtypes: a stale or foreign plan fails here."""
        e, trt = self.engine, self.trt
        got = {}
        for i in range(e.num_io_tensors):
            name = e.get_tensor_name(i)
            got[name] = (e.get_tensor_mode(name) == trt.TensorIOMode.INPUT, _torch_dtype(trt, e.get_tensor_dtype(name)))
        want = {s.name: (True, s.dtype) for s in self.spec.inputs} | {s.name: (False, s.dtype) for s in self.spec.outputs}
        if got != want:
            raise RuntimeError(f"{self.spec.name}: engine tensors {got} are not the segment's {want}")

    def set_scratch(self, scratch: torch.Tensor) -> None:
        assert scratch.numel() * scratch.element_size() >= self.scratch_bytes
        self.scratch = scratch

    def context(self, slot: int | None) -> Any:
        ctx = self.contexts.get(slot)
        if ctx is None:  # made on the warm-up run before a capture, never inside one
            assert self.scratch is not None, "set_scratch first"
            ctx = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            ctx.set_device_memory(self.scratch.data_ptr(), self.scratch_bytes)
            self.contexts[slot] = ctx
        return ctx

    def __call__(self, *inputs: torch.Tensor, slot: int | None = None) -> tuple[torch.Tensor, ...]:
        """Enqueue on torch's current stream (so CUDA-graph capture records it); outputs are fresh
        tensors from torch's allocator, shaped by the spec for this call's row count."""
        n = int(inputs[0].shape[0])
        ctx = self.context(slot)
        for spec, t in zip(self.spec.inputs, inputs, strict=True):
            assert t.dtype == spec.dtype and tuple(t.shape) == spec.shape(n) and t.is_contiguous(), spec
            ctx.set_input_shape(spec.name, tuple(t.shape))
            ctx.set_tensor_address(spec.name, t.data_ptr())
        outs = tuple(torch.empty(s.shape(n), dtype=s.dtype, device=inputs[0].device) for s in self.spec.outputs)
        for spec, t in zip(self.spec.outputs, outs):
            ctx.set_tensor_address(spec.name, t.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"{self.spec.name}: TensorRT execute_async_v3 failed for {n} rows")
        return outs


def share_scratch(engines: Sequence[Engine], device: torch.device) -> torch.Tensor:
    """One activation buffer for engines that never run concurrently (256-byte aligned by torch)."""
    size = max((e.scratch_bytes for e in engines), default=0)
    scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
    for e in engines:
        e.set_scratch(scratch)
    return scratch
