"""The launcher's CPU-checkable parts: lazy import, the cubin cache key, argument checks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import launcher as K

F16 = torch.float16


def cache(num_blocks: int = 8, block_size: int = 16, kvh: int = 2, d: int = 64, dtype=F16) -> torch.Tensor:
    return torch.zeros(2, num_blocks, block_size, kvh, d, dtype=dtype)


def decode_args(b: int = 3, h: int = 4, kvh: int = 2, d: int = 64, dtype=F16) -> dict:
    return dict(
        q=torch.zeros(b, h, d, dtype=dtype),
        kv_cache=cache(kvh=kvh, d=d, dtype=dtype),
        block_table=torch.zeros(b, 4, dtype=torch.int32),
        seq_lens=torch.ones(b, dtype=torch.int32),
        scale=0.125,
        max_seq_len=64,
    )


def test_import_is_lazy() -> None:
    code = "import sys, kernels.launcher; assert 'cuda.core' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_cache_key_changes_with_source_arch_options() -> None:
    base = K.cache_key("src", "sm_90", ("-std=c++17",))
    assert base == K.cache_key("src", "sm_90", ("-std=c++17",))
    assert base != K.cache_key("src2", "sm_90", ("-std=c++17",))
    assert base != K.cache_key("src", "sm_80", ("-std=c++17",))
    assert base != K.cache_key("src", "sm_90", ("-std=c++17", "-lineinfo"))
    assert base != K.cache_key("src", "sm_90", ())


def test_cubin_path_under_cache_dir(tmp_path: Path) -> None:
    p = K.cubin_path("src", "sm_90", K.NVRTC_OPTIONS, tmp_path)
    assert p.parent == tmp_path and p.name.endswith("-sm_90.cubin")
    assert K.CACHE_DIR == Path("~/.cache/meshgate/cubins").expanduser()


def test_load_source_inlines_headers_and_hash_follows_header(tmp_path: Path) -> None:
    (tmp_path / "h.cuh").write_text("#define X 1\n")
    (tmp_path / "a.cu").write_text('#include "h.cuh"\nint y = X;\n')
    src = K.load_source("a.cu", tmp_path)
    assert src == "#define X 1\n\nint y = X;\n"
    (tmp_path / "h.cuh").write_text("#define X 2\n")
    assert K.cache_key(K.load_source("a.cu", tmp_path), "sm_90", ()) != K.cache_key(src, "sm_90", ())


def test_num_partitions() -> None:
    assert K.num_partitions(1) == 1
    assert K.num_partitions(512) == 1
    assert K.num_partitions(513) == 2
    assert K.num_partitions(8192) == 16


def test_head_group_is_the_most_heads_sharing_a_kv_head() -> None:
    assert [K.head_group(h, kvh) for h, kvh in [(32, 32), (32, 8), (64, 8), (48, 8), (40, 8), (128, 8)]] == [1, 4, 8, 2, 1, 8]


def test_attention_threads_follow_the_kernels_dispatch() -> None:
    """16-bit types with several heads a block run on the tensor cores in MMA_WARPS warps."""
    assert K.attention_threads(torch.float16, 4) == K.attention_threads(torch.bfloat16, 8) == K.MMA_WARPS * 32
    assert K.attention_threads(torch.float16, 1) == K.attention_threads(torch.float32, 8) == K.NUM_WARPS * 32


def test_valid_decode_args_fail_only_on_device() -> None:
    with pytest.raises(ValueError, match="q: must be on a CUDA device, got cpu"):
        K.paged_attention(**decode_args())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(q=torch.zeros(3, 4, 64, dtype=torch.float64)), "q: dtype torch.float64 not supported"),
        (dict(q=torch.zeros(3, 4, 64, dtype=torch.float32)), "kv_cache: expected dtype torch.float32"),
        (dict(q=torch.zeros(3, 4, 80, dtype=F16), kv_cache=cache(d=80)), "head_dim 80 not supported"),
        (dict(q=torch.zeros(3, 4, 128, dtype=F16)), r"q: expected shape \(\*, \*, 64\)"),
        (dict(q=torch.zeros(3, 3, 64, dtype=F16)), "num_heads 3 is not a multiple of kv_heads 2"),
        (dict(q=torch.zeros(4, 3, 64, dtype=F16).transpose(0, 1)), "q: each row's"),
        (dict(q=torch.zeros(5, 4, 64, dtype=F16)), r"q: expected shape \(3, \*, 64\)"),
        (dict(kv_cache=torch.zeros(8, 16, 2, 64, dtype=F16)), "kv_cache: expected shape"),
        (dict(kv_cache=cache().transpose(2, 3)), "kv_cache: .*"),
        (dict(block_table=torch.zeros(3, 4, dtype=torch.int64)), "block_table: expected dtype torch.int32"),
        (dict(block_table=torch.zeros(4, 3, dtype=torch.int32).t()), "block_table: must be contiguous"),
        (dict(seq_lens=torch.ones(2, dtype=torch.int32)), r"seq_lens: expected shape \(3,\)"),
        (dict(seq_lens=torch.ones(3, dtype=torch.int64)), "seq_lens: expected dtype torch.int32"),
    ],
)
def test_attention_argument_errors(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        K.paged_attention(**{**decode_args(), **change})


def test_prefill_needs_query_start_loc_shape() -> None:
    args = {**decode_args(), "q": torch.zeros(7, 4, 64, dtype=F16)}
    with pytest.raises(ValueError, match=r"query_start_loc: expected shape \(4,\)"):
        K.paged_attention(**args, query_start_loc=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        K.paged_attention(**args, query_start_loc=torch.tensor([0, 2, 5, 7], dtype=torch.int32))


def test_write_kv_errors() -> None:
    kv = cache()
    k = torch.zeros(5, 2, 64, dtype=F16)
    slots = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(ValueError, match="key: expected dtype torch.float16"):
        K.write_kv(k.float(), k, kv, slots)
    with pytest.raises(ValueError, match="slot_mapping: expected dtype torch.int64"):
        K.write_kv(k, k, kv, slots.int())
    with pytest.raises(ValueError, match=r"value: expected shape \(5, 2, 64\)"):
        K.write_kv(k, k[:4], kv, slots)
    with pytest.raises(ValueError, match=r"key: expected shape \(\*, 2, 64\)"):
        K.write_kv(torch.zeros(5, 3, 64, dtype=F16), k, kv, slots)
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        K.write_kv(k, k, kv, slots)
    # a view of a fused qkv projection (row stride > KVH * D) is accepted
    qkv = torch.zeros(5, 8 * 64, dtype=F16)
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        K.write_kv(qkv[:, :128].view(5, 2, 64), qkv[:, 128:256].view(5, 2, 64), kv, slots)


def test_norm_and_rotary_errors() -> None:
    x = torch.zeros(4, 32, dtype=F16)
    with pytest.raises(ValueError, match=r"weight: expected shape \(32,\)"):
        K.rms_norm(x, torch.ones(31, dtype=F16), 1e-5)
    with pytest.raises(ValueError, match="weight: expected dtype torch.float16"):
        K.rms_norm(x, torch.ones(32), 1e-5)
    with pytest.raises(ValueError, match="x: must be contiguous"):
        K.rms_norm(torch.zeros(32, 4, dtype=F16).t(), torch.ones(32, dtype=F16), 1e-5)
    with pytest.raises(ValueError, match=r"residual: expected shape \(4, 32\)"):
        K.fused_add_rms_norm(x, x[:3], torch.ones(32, dtype=F16), 1e-5)
    q, k = torch.zeros(3, 4, 64, dtype=F16), torch.zeros(3, 2, 64, dtype=F16)
    pos, cs = torch.zeros(3, dtype=torch.int64), torch.zeros(16, 64)
    with pytest.raises(ValueError, match="cos_sin: expected dtype torch.float32"):
        K.rotary(q, k, pos, cs.half())
    with pytest.raises(ValueError, match="positions: expected dtype torch.int64"):
        K.rotary(q, k, pos.int(), cs)
    with pytest.raises(ValueError, match=r"k: expected shape \(3, \*, 64\)"):
        K.rotary(q, k[:2], pos, cs)
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        K.rotary(q, k, pos, cs)


def test_misaligned_cache_and_too_many_rows() -> None:
    flat = torch.zeros(2 * 8 * 16 * 2 * 64 + 1, dtype=F16)
    with pytest.raises(ValueError, match="16-byte aligned"):
        K.paged_attention(**{**decode_args(), "kv_cache": flat[1:].view(2, 8, 16, 2, 64)})
    with pytest.raises(ValueError, match="at most 65535"):
        K.paged_attention(**{**decode_args(), "q": torch.zeros(65536, 4, 64, dtype=F16)})
