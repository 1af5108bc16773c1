"""Each CUDA kernel against kernels/reference.py on a GPU (skipped without one).

Unused cache slots are NaN: a kernel that reads past a sequence's context fails loudly.
Tolerances (relative and absolute): fp32 1e-5, fp16 1e-3, bf16 1e-2.
"""
from __future__ import annotations

import random

import pytest
import torch

from kernels import launcher as K
from kernels import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
KVH = 2


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOL[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def paged_cache(seq_lens: list[int], block_size: int, d: int, dtype: torch.dtype, seed: int = 0):
    """A NaN-poisoned cache whose used slots hold random K/V, and shuffled block tables.

    Returns kv_cache (2, num_blocks, block_size, KVH, D) and block_table (B, max_blocks) int32.
    """
    g = torch.Generator(device="cuda").manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + 4  # spare blocks stay NaN; padded table entries point at them
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)
    table = torch.full((len(seq_lens), max(need) + 1), ids[-1], dtype=torch.int32)
    cache = torch.full((2, num_blocks, block_size, KVH, d), float("nan"), dtype=dtype, device="cuda")
    pos = 0
    for b, (n, nb) in enumerate(zip(seq_lens, need)):
        table[b, :nb] = torch.tensor(ids[pos : pos + nb], dtype=torch.int32)
        pos += nb
        slots = (table[b, :nb].long()[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:n].cuda()
        kv = torch.randn(2, n, KVH, d, generator=g, device="cuda").to(dtype)
        cache.view(2, -1, KVH, d)[:, slots] = kv
    return cache, table.cuda()


def lens_for(block_size: int, long: bool) -> list[int]:
    if not long:
        return [1, 2, block_size - 1, block_size, block_size + 1, 3 * block_size, 100, 511, 512]
    return [1, block_size, 513, 1024 + block_size, 2047, 4096, 8191, 8192]


@pytest.mark.parametrize("long", [False, True], ids=["short", "long-split"])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_attention_decode(dtype: torch.dtype, d: int, block_size: int, gqa: int, long: bool) -> None:
    lens = lens_for(block_size, long)
    cache, table = paged_cache(lens, block_size, d, dtype, seed=d + block_size + gqa)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), KVH * gqa, d, device="cuda").to(dtype)
    scale = d**-0.5
    out = K.paged_attention(q, cache, table, seq_lens, scale, max_seq_len=max(lens))
    for b in range(len(lens)):  # one by one: the reference's padded gather would read NaN
        expected = ref.paged_attention_decode(q[b : b + 1], cache, table[b : b + 1], seq_lens[b : b + 1], scale)
        close(out[b : b + 1], expected)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_forced_head_groups(dtype: torch.dtype, group: int) -> None:
    """8 query heads per KV head computed 1, 2 or 4 per block: the same result as the reference."""
    lens = [1, 15, 16, 17, 600, 2049]
    cache, table = paged_cache(lens, 16, 128, dtype, seed=group)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), KVH * 8, 128, device="cuda").to(dtype)
    out = K.paged_attention(q, cache, table, seq_lens, 0.09, max_seq_len=max(lens), group=group)
    for b in range(len(lens)):
        close(out[b : b + 1], ref.paged_attention_decode(q[b : b + 1], cache, table[b : b + 1], seq_lens[b : b + 1], 0.09))


@pytest.mark.parametrize("partition_size", [8, 24, 512])
def test_split_partitions_not_aligned_with_blocks(partition_size: int) -> None:
    lens = [1, 15, 16, 17, 100, 1000]
    cache, table = paged_cache(lens, 16, 128, torch.float32)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), 8, 128, device="cuda")
    out = K.paged_attention(q, cache, table, seq_lens, 0.1, max_seq_len=2000, partition_size=partition_size)
    for b in range(len(lens)):
        close(out[b : b + 1], ref.paged_attention_decode(q[b : b + 1], cache, table[b : b + 1], seq_lens[b : b + 1], 0.1))


def test_padded_row_with_no_context_gives_zeros() -> None:
    cache, table = paged_cache([5, 1], 16, 64, torch.float16)
    seq_lens = torch.tensor([5, 0], dtype=torch.int32, device="cuda")
    q = torch.randn(2, 2, 64, device="cuda").half()
    for m in (16, 4096):
        out = K.paged_attention(q, cache, table, seq_lens, 0.125, max_seq_len=m)
        assert torch.equal(out[1], torch.zeros_like(out[1]))


PREFILL = [(1, 1), (8, 8), (9, 3), (33, 33), (100, 37), (1000, 64), (4100, 128)]  # (seq_len, q_len)


@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_attention_prefill(dtype: torch.dtype, d: int, block_size: int, gqa: int) -> None:
    lens = [s for s, _ in PREFILL]
    cache, table = paged_cache(lens, block_size, d, dtype, seed=7)
    qsl = torch.tensor([0] + [sum(q for _, q in PREFILL[: i + 1]) for i in range(len(PREFILL))], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(int(qsl[-1]), KVH * gqa, d, device="cuda").to(dtype)
    out = K.paged_attention(q, cache, table, seq_lens, d**-0.5, max_seq_len=max(lens), query_start_loc=qsl.cuda())
    for b in range(len(lens)):
        s, e = int(qsl[b]), int(qsl[b + 1])
        expected = ref.paged_attention_prefill(
            q[s:e], cache, table[b : b + 1], torch.tensor([0, e - s], dtype=torch.int32), seq_lens[b : b + 1], d**-0.5
        )
        close(out[s:e], expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv_skips_minus_one(dtype: torch.dtype) -> None:
    t, nb, bs, d = 40, 16, 16, 128
    qkv = torch.randn(t, (8 + 2 * KVH) * d, device="cuda").to(dtype)  # fused projection: strided views
    k = qkv[:, 8 * d : (8 + KVH) * d].view(t, KVH, d)
    v = qkv[:, (8 + KVH) * d :].view(t, KVH, d)
    slots = torch.randperm(nb * bs, device="cuda")[:t]
    slots[::7] = -1
    cache = torch.full((2, nb, bs, KVH, d), float("nan"), dtype=dtype, device="cuda")
    expected = cache.clone()
    ref.write_kv(k, v, expected, slots)
    K.write_kv(k, v, cache, slots)
    assert torch.equal(cache.nan_to_num(7.0), expected.nan_to_num(7.0))


@pytest.mark.parametrize("hidden", [64, 1000, 2048, 8192])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_and_fused_add(dtype: torch.dtype, hidden: int) -> None:
    x = torch.randn(33, hidden, device="cuda").to(dtype)
    r = torch.randn(33, hidden, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype)
    close(K.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))
    exp_out, exp_res = ref.fused_add_rms_norm(x, r, w, 1e-5)
    out, res = K.fused_add_rms_norm(x, r.clone(), w, 1e-5)
    close(res, exp_res)
    close(out, exp_out)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_in_place_on_fused_views(dtype: torch.dtype, d: int) -> None:
    t, h = 37, 8
    table = ref.rope_cos_sin(4096, d, 10000.0).cuda()
    positions = torch.randint(0, 4096, (t,), device="cuda")
    qkv = torch.randn(t, (h + 2 * KVH) * d, device="cuda").to(dtype)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + KVH) * d].view(t, KVH, d)
    exp_q, exp_k = ref.rotary(q, positions, table), ref.rotary(k, positions, table)
    v_before = qkv[:, (h + KVH) * d :].clone()
    K.rotary(q, k, positions, table)
    close(q, exp_q)
    close(k, exp_k)
    assert torch.equal(qkv[:, (h + KVH) * d :], v_before)
