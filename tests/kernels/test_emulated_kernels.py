"""The CUDA kernels run on the CPU through emulate.h (g++), via the launcher's real op functions
(argument checks, grid sizes, split-context buffers, argument marshalling), against
kernels/reference.py. Unused cache slots are NaN-poisoned. This is the CPU stand-in for the
`gpu` tests in test_kernels_gpu.py: it checks indexing and arithmetic, not the GPU's behaviour.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kernels import launcher as K
from kernels import reference as ref
from tests.kernels.emulated import EmuLibrary, find_cxx

pytestmark = pytest.mark.skipif(find_cxx() is None, reason="g++ not found (the CPU emulator needs it)")
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def emu(emu_libs: dict[str, Path]) -> EmuLibrary:
    return EmuLibrary(emu_libs)


@pytest.fixture(autouse=True)
def _on_cpu(emu: EmuLibrary, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(K, "check_device", lambda *named: None)
    monkeypatch.setattr(K, "library", lambda device: emu)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOL[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def paged(lens: list[int], bs: int, kvh: int, d: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN cache (2, num_blocks, bs, KVH, D) with random K/V in the used slots; shuffled tables."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    nb = sum(need) + 2
    ids = list(range(nb))
    random.Random(seed).shuffle(ids)
    table = torch.full((len(lens), max(need) + 1), ids[-1], dtype=torch.int32)
    cache = torch.full((2, nb, bs, kvh, d), float("nan"), dtype=dtype)
    pos = 0
    for b, (n, k) in enumerate(zip(lens, need)):
        table[b, :k] = torch.tensor(ids[pos : pos + k], dtype=torch.int32)
        pos += k
        slots = (table[b, :k].long()[:, None] * bs + torch.arange(bs)).reshape(-1)[:n]
        cache.view(2, -1, kvh, d)[:, slots] = torch.randn(2, n, kvh, d, generator=g).to(dtype)
    return cache, table


@pytest.mark.parametrize(
    ("dtype", "d", "bs", "gqa", "partition_size"),
    [
        (torch.float32, 64, 8, 1, 512),
        (torch.float32, 128, 16, 4, 24),
        (torch.float16, 64, 16, 4, 512),
        (torch.float16, 128, 8, 8, 40),
        (torch.bfloat16, 128, 32, 1, 64),
        (torch.bfloat16, 64, 16, 8, 16),
    ],
)
def test_decode(dtype: torch.dtype, d: int, bs: int, gqa: int, partition_size: int) -> None:
    lens = [1, bs - 1, bs, bs + 1, 70]
    kvh = 1 if gqa == 8 else 2
    cache, table = paged(lens, bs, kvh, d, dtype, seed=d + bs)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), kvh * gqa, d).to(dtype)
    out = K.paged_attention(q, cache, table, seq_lens, d**-0.5, max(lens), partition_size=partition_size)
    for b in range(len(lens)):
        close(out[b : b + 1], ref.paged_attention_decode(q[b : b + 1], cache, table[b : b + 1], seq_lens[b : b + 1], d**-0.5))


@pytest.mark.parametrize(("dtype", "d", "gqa", "group"), [
    (torch.float16, 64, 4, 1), (torch.float16, 64, 4, 2), (torch.bfloat16, 128, 8, 2), (torch.float32, 64, 8, 4),
])
def test_decode_forced_head_groups(dtype: torch.dtype, d: int, gqa: int, group: int) -> None:
    """Fewer query heads per block than share a KV head: every grouping gives the same result."""
    lens = [1, 15, 16, 17, 70]
    cache, table = paged(lens, 16, 2, d, dtype, seed=11)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), 2 * gqa, d).to(dtype)
    out = K.paged_attention(q, cache, table, seq_lens, d**-0.5, max(lens), partition_size=24, group=group)
    for b in range(len(lens)):
        close(out[b : b + 1], ref.paged_attention_decode(q[b : b + 1], cache, table[b : b + 1], seq_lens[b : b + 1], d**-0.5))


@pytest.mark.parametrize("group", [3, 8])
def test_decode_group_must_divide_the_heads_sharing_a_kv_head(group: int) -> None:
    cache, table = paged([5], 16, 2, 64, torch.float16, seed=1)
    q = torch.randn(1, 8, 64).half()  # 4 query heads per KV head
    with pytest.raises(ValueError, match=f"group {group}: must be one of"):
        K.paged_attention(q, cache, table, torch.tensor([5], dtype=torch.int32), 0.125, 5, group=group)


def test_decode_padded_row_is_zero_and_q_may_be_strided() -> None:
    cache, table = paged([9, 1], 8, 2, 64, torch.float16, seed=3)
    qkv = torch.randn(2, 8 * 64, dtype=torch.float16)
    q = qkv[:, : 4 * 64].view(2, 4, 64)  # row stride 512: a view of a fused projection
    seq_lens = torch.tensor([9, 0], dtype=torch.int32)
    out = K.paged_attention(q, cache, table, seq_lens, 0.125, 64, partition_size=8)
    close(out[:1], ref.paged_attention_decode(q[:1], cache, table[:1], seq_lens[:1], 0.125))
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize(("dtype", "partition_size"), [(torch.float32, 512), (torch.bfloat16, 16), (torch.float16, 24)])
def test_prefill(dtype: torch.dtype, partition_size: int) -> None:
    chunks = [(1, 1), (9, 3), (17, 17), (40, 6)]  # (seq_len, q_len)
    lens = [s for s, _ in chunks]
    cache, table = paged(lens, 8, 2, 64, dtype, seed=5)
    qsl = torch.tensor([0] + [sum(q for _, q in chunks[: i + 1]) for i in range(len(chunks))], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), 4, 64).to(dtype)
    out = K.paged_attention(q, cache, table, seq_lens, 0.125, 64, query_start_loc=qsl, partition_size=partition_size)
    close(out, ref.paged_attention_prefill(q, cache, table, qsl, seq_lens, 0.125))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv(dtype: torch.dtype) -> None:
    t, kvh, d = 10, 2, 64
    qkv = torch.randn(t, 6 * d).to(dtype)
    k, v = qkv[:, 2 * d : 4 * d].view(t, kvh, d), qkv[:, 4 * d :].view(t, kvh, d)
    slots = torch.randperm(4 * 8)[:t]
    slots[::3] = -1
    cache = torch.full((2, 4, 8, kvh, d), float("nan"), dtype=dtype)
    expected = cache.clone()
    ref.write_kv(k, v, expected, slots)
    K.write_kv(k, v, cache, slots)
    assert torch.equal(cache.nan_to_num(7.0), expected.nan_to_num(7.0))


@pytest.mark.parametrize("hidden", [64, 200, 1024])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm(dtype: torch.dtype, hidden: int) -> None:
    x, r = torch.randn(3, hidden).to(dtype), torch.randn(3, hidden).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    close(K.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))
    exp_out, exp_res = ref.fused_add_rms_norm(x, r, w, 1e-5)
    out, res = K.fused_add_rms_norm(x, r.clone(), w, 1e-5)
    close(res, exp_res)
    close(out, exp_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary(dtype: torch.dtype) -> None:
    t, h, kvh, d = 5, 4, 2, 64
    table = ref.rope_cos_sin(256, d, 10000.0)
    pos = torch.randint(0, 256, (t,))
    qkv = torch.randn(t, (h + 2 * kvh) * d).to(dtype)
    q, k = qkv[:, : h * d].view(t, h, d), qkv[:, h * d : (h + kvh) * d].view(t, kvh, d)
    exp_q, exp_k, v = ref.rotary(q, pos, table), ref.rotary(k, pos, table), qkv[:, (h + kvh) * d :].clone()
    K.rotary(q, k, pos, table)
    close(q, exp_q)
    close(k, exp_k)
    assert torch.equal(qkv[:, (h + kvh) * d :], v)
