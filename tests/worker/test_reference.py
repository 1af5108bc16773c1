"""kernels/reference.py against naive formulas written out independently."""
from __future__ import annotations

import math

import pytest
import torch

from kernels import reference as ref


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_rms_norm_matches_the_formula(gen) -> None:
    x = torch.randn(7, 64, generator=gen) * 3
    w = torch.randn(64, generator=gen)
    eps = 1e-5
    want = torch.stack([w * row / math.sqrt(float((row**2).mean()) + eps) for row in x])
    torch.testing.assert_close(ref.rms_norm(x, w, eps), want, atol=1e-5, rtol=1e-5)


def test_rms_norm_normalises_in_fp32_for_half_inputs(gen) -> None:
    x = (torch.randn(5, 128, generator=gen) * 50).to(torch.bfloat16)
    w = torch.ones(128, dtype=torch.bfloat16)
    got = ref.rms_norm(x, w, 1e-6)
    assert got.dtype == torch.bfloat16
    xf = x.float()
    want = xf / xf.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1e-2)


def test_fused_add_rms_norm_returns_norm_and_sum(gen) -> None:
    x, res = torch.randn(4, 32, generator=gen), torch.randn(4, 32, generator=gen)
    w = torch.randn(32, generator=gen)
    normed, new_res = ref.fused_add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(new_res, x + res)
    torch.testing.assert_close(normed, ref.rms_norm(x + res, w, 1e-5))


def hf_rotary(x: torch.Tensor, positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Hugging Face Llama: q * cos + rotate_half(q) * sin with cos/sin of cat(freqs, freqs)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]  # (T, 1, D)

    def rotate_half(t: torch.Tensor) -> torch.Tensor:
        t1, t2 = t[..., : t.shape[-1] // 2], t[..., t.shape[-1] // 2 :]
        return torch.cat((-t2, t1), dim=-1)

    return x * cos + rotate_half(x) * sin


@pytest.mark.parametrize("head_dim, theta", [(32, 10000.0), (64, 500000.0)])
def test_rotary_matches_hugging_face(gen, head_dim: int, theta: float) -> None:
    table = ref.rope_cos_sin(4096, head_dim, theta)
    assert table.shape == (4096, head_dim) and table.dtype == torch.float32
    positions = torch.cat([torch.arange(6), torch.randint(0, 4096, (20,), generator=gen)])
    x = torch.randn(len(positions), 3, head_dim, generator=gen)
    got = ref.rotary(x, positions, table)
    torch.testing.assert_close(got, hf_rotary(x, positions, head_dim, theta), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], x[0])  # position 0 is the identity


def test_rotary_scores_depend_only_on_relative_position(gen) -> None:
    table = ref.rope_cos_sin(256, 32, 10000.0)
    q, k = torch.randn(1, 1, 32, generator=gen), torch.randn(1, 1, 32, generator=gen)

    def score(m: int, n: int) -> float:
        rq = ref.rotary(q, torch.tensor([m]), table)
        rk = ref.rotary(k, torch.tensor([n]), table)
        return float((rq * rk).sum())

    assert score(10, 3) == pytest.approx(score(107, 100), abs=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-4)


def test_write_kv_stores_at_slots_and_skips_minus_one(gen) -> None:
    num_blocks, bs, kvh, d = 4, 4, 2, 8
    cache = torch.zeros(2, num_blocks, bs, kvh, d)
    k, v = torch.randn(5, kvh, d, generator=gen), torch.randn(5, kvh, d, generator=gen)
    slots = torch.tensor([0, -1, 7, 13, -1])
    ref.write_kv(k, v, cache, slots)
    written = {0: 0, 7: 2, 13: 3}
    for slot, t in written.items():
        torch.testing.assert_close(cache[0, slot // bs, slot % bs], k[t])
        torch.testing.assert_close(cache[1, slot // bs, slot % bs], v[t])
    untouched = [s for s in range(num_blocks * bs) if s not in written]
    flat = cache.view(2, num_blocks * bs, kvh, d)
    assert flat[:, untouched].abs().sum() == 0


def test_write_kv_casts_to_the_cache_dtype(gen) -> None:
    cache = torch.zeros(2, 2, 4, 1, 4, dtype=torch.bfloat16)
    k = torch.randn(1, 1, 4, generator=gen)
    ref.write_kv(k, k, cache, torch.tensor([5]))
    torch.testing.assert_close(cache[0, 1, 1].float(), k[0].to(torch.bfloat16).float())


# -- paged attention against dense attention on contiguous K/V ----------------------------------


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, scale: float) -> torch.Tensor:
    """q: (Q, H, D) at positions q_start..; k, v: (L, KVH, D). Query head h reads KV head
    h // (H // KVH) (Hugging Face's repeat_kv). Causal. Returns (Q, H, D)."""
    num_q, heads, _ = q.shape
    group = heads // k.shape[1]
    out = torch.empty_like(q)
    for i in range(num_q):
        visible = q_start + i + 1
        for h in range(heads):
            kk, vv = k[:visible, h // group], v[:visible, h // group]  # (visible, D)
            w = torch.softmax((kk @ q[i, h]) * scale, dim=0)
            out[i, h] = w @ vv
    return out


def scatter_to_pages(seqs_kv, num_blocks: int, bs: int, gen: torch.Generator):
    """Put each sequence's contiguous K/V into randomly chosen blocks of a paged cache."""
    kvh, d = seqs_kv[0][0].shape[1:]
    cache = torch.randn(2, num_blocks, bs, kvh, d, generator=gen)  # garbage outside the tables
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(-(-k.shape[0] // bs) for k, _ in seqs_kv)
    table = torch.zeros(len(seqs_kv), max_blocks, dtype=torch.int32)
    for b, (k, v) in enumerate(seqs_kv):
        for j in range(-(-k.shape[0] // bs)):
            blk = perm.pop()
            table[b, j] = blk
            n = min(bs, k.shape[0] - j * bs)
            cache[0, blk, :n] = k[j * bs : j * bs + n]
            cache[1, blk, :n] = v[j * bs : j * bs + n]
    return cache, table


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (8, 2), (2, 2)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_paged_attention_decode_matches_dense(gen, heads: int, kv_heads: int, dtype, tol: float) -> None:
    bs, d, scale = 4, 16, 16**-0.5
    seq_lens = [1, 4, 5, 13, 8]  # inside, at and across block boundaries
    seqs = [(torch.randn(n, kv_heads, d, generator=gen), torch.randn(n, kv_heads, d, generator=gen)) for n in seq_lens]
    cache, table = scatter_to_pages(seqs, num_blocks=16, bs=bs, gen=gen)
    q = torch.randn(len(seq_lens), heads, d, generator=gen)
    got = ref.paged_attention_decode(q.to(dtype), cache.to(dtype), table, torch.tensor(seq_lens, dtype=torch.int32), scale)
    assert got.shape == q.shape and got.dtype == dtype
    for b, (k, v) in enumerate(seqs):
        kq, vq = k.to(dtype).float(), v.to(dtype).float()
        want = naive_attention(q[b : b + 1].to(dtype).float(), kq, vq, seq_lens[b] - 1, scale)
        torch.testing.assert_close(got[b : b + 1].float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (8, 2)])
def test_paged_attention_prefill_matches_dense_causal(gen, heads: int, kv_heads: int) -> None:
    bs, d, scale = 4, 16, 16**-0.5
    # (context length after the step, query tokens in the step): whole prompts and later chunks.
    shapes = [(6, 6), (13, 5), (9, 1), (16, 3), (3, 3)]
    seqs = [(torch.randn(n, kv_heads, d, generator=gen), torch.randn(n, kv_heads, d, generator=gen)) for n, _ in shapes]
    cache, table = scatter_to_pages(seqs, num_blocks=24, bs=bs, gen=gen)
    q = torch.randn(sum(ql for _, ql in shapes), heads, d, generator=gen)
    qsl = torch.tensor([0] + [sum(ql for _, ql in shapes[: i + 1]) for i in range(len(shapes))], dtype=torch.int32)
    seq_lens = torch.tensor([n for n, _ in shapes], dtype=torch.int32)
    got = ref.paged_attention_prefill(q, cache, table, qsl, seq_lens, scale)
    for b, ((n, ql), (k, v)) in enumerate(zip(shapes, seqs)):
        s, e = int(qsl[b]), int(qsl[b + 1])
        want = naive_attention(q[s:e], k, v, n - ql, scale)
        torch.testing.assert_close(got[s:e], want, atol=1e-5, rtol=1e-5)


def test_gather_kv_reads_through_the_block_table(gen) -> None:
    seqs = [(torch.randn(n, 1, 4, generator=gen), torch.randn(n, 1, 4, generator=gen)) for n in (7, 3)]
    cache, table = scatter_to_pages(seqs, num_blocks=8, bs=2, gen=gen)
    k, v = ref.gather_kv(cache, table, 7)
    assert k.shape == (2, 7, 1, 4)
    torch.testing.assert_close(k[0], seqs[0][0])
    torch.testing.assert_close(v[1, :3], seqs[1][1])
