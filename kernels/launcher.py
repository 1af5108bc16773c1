"""Compile kernels/csrc with NVRTC and launch them through cuda.core on torch's current stream.

Every public op checks its arguments first (shapes, dtypes, contiguity, device) and raises
ValueError with a clear message; only then is cuda.core imported (lazily: `import kernels.launcher`
works on a machine without it). Cubins are cached on disk under ~/.cache/meshgate/cubins by
(source hash, arch, options). Layouts are those of kernels/reference.py.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

CSRC = Path(__file__).parent / "csrc"
CACHE_DIR = Path(os.path.expanduser("~/.cache/meshgate/cubins"))
HEAD_SIZES = (64, 128)
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)
NUM_WARPS = 4  # paged_attention.cu's NUM_WARPS (CUDA cores) and MMA_WARPS (tensor cores)
MMA_WARPS = 2
PARTITION_SIZE = 512  # tokens per split-context partition
HEAD_GROUPS = (8, 4, 2, 1)  # query heads per attention block (paged_attention.cu's instantiations)
_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.M)


# -- sources and the cache key (pure; unit-tested on CPU) -------------------------------------
def load_source(name: str, root: Path = CSRC) -> str:
    """A .cu file with its local #include "x.cuh" lines inlined: NVRTC then needs no include path
    and the hash covers the headers too."""
    text = (root / name).read_text()
    return _INCLUDE.sub(lambda m: load_source(m.group(1), root), text)


def cache_key(source: str, arch: str, options: Sequence[str]) -> str:
    h = hashlib.sha256()
    for part in (source, arch, "\0".join(options)):
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()[:32]


def cubin_path(source: str, arch: str, options: Sequence[str], cache_dir: Path = CACHE_DIR) -> Path:
    return cache_dir / f"{cache_key(source, arch, options)}-{arch}.cubin"


# -- argument checks (pure) -------------------------------------------------------------------
def _fail(msg: str) -> None:
    raise ValueError(msg)


def check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if dtype is None and t.dtype not in DTYPE_NAMES:
        _fail(f"{name}: dtype {t.dtype} not supported (float32, float16, bfloat16)")
    if dtype is not None and t.dtype != dtype:
        _fail(f"{name}: expected dtype {dtype}, got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int | None]) -> None:
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    if not ok:
        dims = ["*" if s is None else str(s) for s in shape]
        want = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
        _fail(f"{name}: expected shape {want}, got {tuple(t.shape)}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        _fail(f"{name}: must be contiguous (strides {t.stride()})")


def check_rows(name: str, t: torch.Tensor) -> None:
    """(T, heads, D) whose heads of one row are contiguous; the row stride may be larger."""
    if t.stride(2) != 1 or t.stride(1) != t.shape[2] or t.stride(0) < t.shape[1] * t.shape[2]:
        _fail(f"{name}: each row's (heads, head_dim) must be contiguous (strides {t.stride()})")


def check_device(*named: tuple[str, torch.Tensor]) -> None:
    dev = named[0][1].device
    for name, t in named:
        if t.device.type != "cuda":
            _fail(f"{name}: must be on a CUDA device, got {t.device}")
        if t.device != dev:
            _fail(f"{name}: on {t.device}, expected {dev} like {named[0][0]}")


def check_kv_cache(kv_cache: torch.Tensor, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(2, num_blocks, block_size, KVH, D) contiguous, T = dtype, D supported."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        _fail(f"kv_cache: expected shape (2, num_blocks, block_size, kv_heads, head_dim), got {tuple(kv_cache.shape)}")
    check_dtype("kv_cache", kv_cache, dtype)
    check_contiguous("kv_cache", kv_cache)
    if kv_cache.data_ptr() % 16:  # the attention kernel loads K/V as 8- or 16-byte vectors
        _fail("kv_cache: data must be 16-byte aligned (a view at an offset is not)")
    _, nb, bs, kvh, d = kv_cache.shape
    return nb, bs, kvh, d


def check_head_size(d: int) -> None:
    if d not in HEAD_SIZES:
        _fail(f"head_dim {d} not supported by the attention kernels (supported: {HEAD_SIZES})")


def check_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor | None,
) -> None:
    """q (R, H, D); decode: R == B; prefill: query_start_loc (B+1,) int32."""
    check_dtype("q", q)
    if q.dim() != 3:
        _fail(f"q: expected shape (tokens, num_heads, head_dim), got {tuple(q.shape)}")
    check_rows("q", q)
    if q.shape[0] > 65535:  # grid.y
        _fail(f"q: {q.shape[0]} rows; at most 65535 per launch")
    _, _, kvh, d = check_kv_cache(kv_cache, q.dtype)
    check_head_size(q.shape[2])
    check_shape("q", q, (None, None, d))
    if q.shape[1] % kvh:
        _fail(f"q: num_heads {q.shape[1]} is not a multiple of kv_heads {kvh}")
    b = block_table.shape[0] if block_table.dim() == 2 else -1
    check_shape("block_table", block_table, (None, None))
    check_dtype("block_table", block_table, torch.int32)
    check_contiguous("block_table", block_table)
    check_shape("seq_lens", seq_lens, (b,))
    check_dtype("seq_lens", seq_lens, torch.int32)
    if query_start_loc is None:
        check_shape("q", q, (b, None, d))
    else:
        check_shape("query_start_loc", query_start_loc, (b + 1,))
        check_dtype("query_start_loc", query_start_loc, torch.int32)
    named = [("q", q), ("kv_cache", kv_cache), ("block_table", block_table), ("seq_lens", seq_lens)]
    check_device(*named + ([("query_start_loc", query_start_loc)] if query_start_loc is not None else []))


def num_partitions(max_seq_len: int, partition_size: int = PARTITION_SIZE) -> int:
    """Split the context when it is long: one partition per partition_size tokens."""
    return max(1, -(-max_seq_len // partition_size)) if max_seq_len > partition_size else 1


def head_group(num_heads: int, num_kv_heads: int) -> int:
    """Query heads one attention block computes: the most of HEAD_GROUPS that share a KV head, so
    each K/V row is read once for all of them."""
    ratio = num_heads // num_kv_heads
    return next(g for g in HEAD_GROUPS if ratio % g == 0)


def attention_threads(dtype: torch.dtype, group: int) -> int:
    """Threads of an attention block: paged_attention.cu runs 16-bit types with more than one head
    a block on the tensor cores (MMA_WARPS), the rest on the CUDA cores (NUM_WARPS)."""
    return (MMA_WARPS if dtype != torch.float32 and group > 1 else NUM_WARPS) * 32


# -- cuda.core (lazy) -------------------------------------------------------------------------
def _cuda_core() -> Any:
    try:
        import cuda.core as cc  # cuda-core >= 0.4 / 1.x

        cc.Program  # noqa: B018 (older releases keep it in .experimental)
        return cc
    except (ImportError, AttributeError):
        pass
    try:
        from cuda.core import experimental as cce

        return cce
    except ImportError as e:
        raise RuntimeError("the cuda runner needs NVIDIA's cuda-python: pip install 'meshgate[cuda]'") from e


class _TorchStream:
    """torch's stream under the __cuda_stream__ protocol that cuda.core understands."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


class KernelLibrary:
    """Loaded cubins of one device; kernels by name. Thread-safe loading."""

    def __init__(self, device_index: int):
        self.cc = _cuda_core()
        self.device = self.cc.Device(device_index)
        self.device.set_current()  # the primary context, the one torch uses
        major, minor = torch.cuda.get_device_capability(device_index)
        self.arch = f"sm_{major}{minor}"
        self._modules: dict[str, Any] = {}
        self._kernels: dict[str, Any] = {}
        self._streams: dict[int, Any] = {}
        self._lock = threading.Lock()

    def kernel(self, file: str, name: str) -> Any:
        k = self._kernels.get(name)
        if k is None:
            with self._lock:
                if file not in self._modules:
                    self._modules[file] = self._load(file)
                k = self._kernels[name] = self._modules[file].get_kernel(name)
        return k

    def _load(self, file: str) -> Any:
        src = load_source(file)
        path = cubin_path(src, self.arch, NVRTC_OPTIONS)
        if not path.exists():
            cubin = self._compile(file, src)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(bytes(cubin))
            tmp.replace(path)  # atomic: concurrent workers never read half a file
        return self.cc.ObjectCode.from_cubin(path.read_bytes())

    def _compile(self, file: str, src: str) -> bytes:
        """NVRTC; when it cannot run (no libnvrtc) but nvcc is there, nvcc on the same text."""
        try:
            opts = self.cc.ProgramOptions(name=file, arch=self.arch, std="c++17")
            return bytes(self.cc.Program(src, "c++", options=opts).compile("cubin").code)
        except Exception as nvrtc_error:
            from kernels.ptxas import find_nvcc

            nvcc = find_nvcc()
            if nvcc is None:
                raise
            with tempfile.TemporaryDirectory() as tmp:
                cu, out = Path(tmp) / file, Path(tmp) / "k.cubin"
                cu.write_text(src)
                cmd = [nvcc, f"-arch={self.arch}", "-cubin", "-std=c++17", "-o", str(out), str(cu)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode:
                    raise RuntimeError(f"{file}: NVRTC failed ({nvrtc_error}) and nvcc failed:\n{r.stderr}")
                return out.read_bytes()

    def stream(self) -> Any:
        handle = int(torch.cuda.current_stream().cuda_stream)
        s = self._streams.get(handle)
        if s is None:  # Stream.from_handle where it exists (cuda.core 0.4+), else the protocol
            from_handle = getattr(self.cc.Stream, "from_handle", None)
            if handle == 0:  # torch's default stream is the legacy NULL stream
                s = self.device.default_stream
            else:
                s = from_handle(handle) if from_handle else self.device.create_stream(_TorchStream(handle))
            self._streams[handle] = s
        return s

    def launch(self, file: str, name: str, grid: tuple[int, ...], block: int, *args: Any) -> None:
        cfg = self.cc.LaunchConfig(grid=grid, block=block)
        self.cc.launch(self.stream(), cfg, self.kernel(file, name), *args)


_LIBS: dict[int, KernelLibrary] = {}


def library(device: torch.device) -> KernelLibrary:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    lib = _LIBS.get(idx)
    if lib is None:
        lib = _LIBS[idx] = KernelLibrary(idx)
    return lib


def _p(t: torch.Tensor | None) -> Any:
    """A pointer argument (null for None). Numpy scalars marshal with exact C types."""
    return np.uint64(0 if t is None else t.data_ptr())


def _i32(v: int) -> Any:
    return np.int32(v)


def _i64(v: int) -> Any:
    return np.int64(v)


def _f32(v: float) -> Any:
    return np.float32(v)


# -- ops --------------------------------------------------------------------------------------
def paged_attention(
    q: torch.Tensor,  # (R, H, D): R = B (decode) or T (prefill)
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, KVH, D)
    block_table: torch.Tensor,  # (B, max_blocks) int32
    seq_lens: torch.Tensor,  # (B,) int32, context length including this step's tokens
    scale: float,
    max_seq_len: int,  # an upper bound of seq_lens (host side, so no device sync): sets the split
    query_start_loc: torch.Tensor | None = None,  # (B+1,) int32 for prefill; None: decode
    out: torch.Tensor | None = None,
    partition_size: int = PARTITION_SIZE,
    group: int | None = None,  # query heads per block; None: head_group (tests and benchmarks force one)
) -> torch.Tensor:
    """reference.paged_attention_decode (query_start_loc None) or reference.paged_attention_prefill."""
    check_attention(q, kv_cache, block_table, seq_lens, query_start_loc)
    g = head_group(q.shape[1], kv_cache.shape[3]) if group is None else group
    if g not in HEAD_GROUPS or (q.shape[1] // kv_cache.shape[3]) % g:
        _fail(f"group {g}: must be one of {HEAD_GROUPS} and divide num_heads / kv_heads")
    if out is None:
        out = torch.empty_like(q)
    check_shape("out", out, tuple(q.shape))
    check_dtype("out", out, q.dtype)
    check_contiguous("out", out)
    rows, heads, d = q.shape
    if rows == 0:
        return out
    _, nb, bs, kvh, _ = kv_cache.shape
    parts = num_partitions(max_seq_len, partition_size)
    tmp_out = tmp_ml = None
    if parts > 1:  # (R, H, P, D) partial sums and (R, H, P, 2) max / denominator
        tmp_out = torch.empty((rows, heads, parts, d), dtype=torch.float32, device=q.device)
        tmp_ml = torch.empty((rows, heads, parts, 2), dtype=torch.float32, device=q.device)
    lib, name = library(q.device), f"{DTYPE_NAMES[q.dtype]}_d{d}"
    lib.launch(
        "paged_attention.cu", f"paged_attention_{name}_g{g}", (heads // g, rows, parts), attention_threads(q.dtype, g),
        _p(out), _p(tmp_out), _p(tmp_ml), _p(q), _p(kv_cache), _p(block_table), _p(seq_lens),
        _p(query_start_loc), _i64(nb * bs * kvh * d), _i64(q.stride(0)), _i32(heads), _i32(kvh), _i32(bs),
        _i32(block_table.shape[1]), _i32(block_table.shape[0]), _i32(partition_size), _f32(scale),
    )
    if parts > 1:
        lib.launch(
            "paged_attention.cu", f"paged_attention_reduce_{name}", (heads, rows), d,
            _p(out), _p(tmp_out), _p(tmp_ml), _i32(heads), _i32(parts),
        )
    return out


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """reference.write_kv: key, value (T, KVH, D) in the cache's dtype; slot_mapping (T,) int64."""
    nb, bs, kvh, d = check_kv_cache(kv_cache, kv_cache.dtype)
    check_dtype("kv_cache", kv_cache)
    for name, t in (("key", key), ("value", value)):
        check_shape(name, t, (None, kvh, d))
        check_dtype(name, t, kv_cache.dtype)
        check_rows(name, t)
    check_shape("value", value, (key.shape[0], kvh, d))
    check_shape("slot_mapping", slot_mapping, (key.shape[0],))
    check_dtype("slot_mapping", slot_mapping, torch.int64)
    check_contiguous("slot_mapping", slot_mapping)
    check_device(("kv_cache", kv_cache), ("key", key), ("value", value), ("slot_mapping", slot_mapping))
    if key.shape[0] == 0:
        return
    library(key.device).launch(
        "kv_cache_write.cu", f"write_kv_{DTYPE_NAMES[key.dtype]}", (key.shape[0],), min(1024, kvh * d),
        _p(kv_cache), _p(key), _p(value), _p(slot_mapping), _i64(nb * bs * kvh * d),
        _i64(key.stride(0)), _i64(value.stride(0)), _i32(kvh * d),
    )


def _check_norm(x: torch.Tensor, weight: torch.Tensor, *more: tuple[str, torch.Tensor]) -> None:
    check_dtype("x", x)
    check_shape("x", x, (None, None))
    check_contiguous("x", x)
    check_shape("weight", weight, (x.shape[1],))
    check_dtype("weight", weight, x.dtype)
    for name, t in more:
        check_shape(name, t, tuple(x.shape))
        check_dtype(name, t, x.dtype)
        check_contiguous(name, t)
    check_device(("x", x), ("weight", weight), *more)


def _norm_threads(hidden: int) -> int:
    return min(1024, max(32, -(-hidden // 4) // 32 * 32))  # ~4 elements a thread


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """reference.rms_norm over x (N, hidden)."""
    out = torch.empty_like(x) if out is None else out
    _check_norm(x, weight, ("out", out))
    if x.shape[0]:
        library(x.device).launch(
            "rms_norm.cu", f"rms_norm_{DTYPE_NAMES[x.dtype]}", (x.shape[0],), _norm_threads(x.shape[1]),
            _p(out), _p(x), _p(weight), _i32(x.shape[1]), _f32(eps),
        )
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.fused_add_rms_norm, with residual updated in place: returns (normed, residual)."""
    out = torch.empty_like(x) if out is None else out
    _check_norm(x, weight, ("residual", residual), ("out", out))
    if x.shape[0]:
        library(x.device).launch(
            "rms_norm.cu", f"fused_add_rms_norm_{DTYPE_NAMES[x.dtype]}", (x.shape[0],),
            _norm_threads(x.shape[1]), _p(out), _p(residual), _p(x), _p(weight), _i32(x.shape[1]), _f32(eps),
        )
    return out, residual


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """reference.rotary applied in place to q (T, H, D) and k (T, KVH, D)."""
    check_dtype("q", q)
    check_shape("q", q, (None, None, None))
    d = q.shape[2]
    check_shape("k", k, (q.shape[0], None, d))
    check_dtype("k", k, q.dtype)
    check_rows("q", q)
    check_rows("k", k)
    if d % 2:
        _fail(f"q: head_dim {d} must be even for rotate-half RoPE")
    check_shape("positions", positions, (q.shape[0],))
    check_dtype("positions", positions, torch.int64)
    check_contiguous("positions", positions)
    check_shape("cos_sin", cos_sin, (None, d))
    check_dtype("cos_sin", cos_sin, torch.float32)
    check_contiguous("cos_sin", cos_sin)
    check_device(("q", q), ("k", k), ("positions", positions), ("cos_sin", cos_sin))
    if q.shape[0]:
        threads = min(1024, max(32, (q.shape[1] + k.shape[1]) * d // 2 // 32 * 32))
        library(q.device).launch(
            "rotary.cu", f"rotary_{DTYPE_NAMES[q.dtype]}", (q.shape[0],), threads,
            _p(q), _p(k), _p(positions), _p(cos_sin), _i64(q.stride(0)), _i64(k.stride(0)),
            _i32(q.shape[1]), _i32(k.shape[1]), _i32(d),
        )
