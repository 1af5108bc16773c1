"""The ONNX segments (kernels/onnx_export.py, exported through gateway/worker/trt_build.py) against
the torch model, run by onnxruntime on the CPU: each segment at several token counts from one
export (the axis is dynamic), then the segments chained with the reference attention against
LlamaForCausalLM.forward's logits. This is the CPU half of the TensorRT path's proof."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gateway.config import ModelConfig
from gateway.worker import trt_build
from gateway.worker.batch import Batch
from gateway.worker.engine import model_folder
from gateway.worker.model import LlamaConfig, LlamaForCausalLM, load_weights
from kernels import onnx_export as ox
from kernels import reference as ref
from tests.kernels.ort import TINY, OrtEngine  # skips the module without onnxruntime/onnxscript

onnx = pytest.importorskip("onnx")

SIZES = (1, 7, 64)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_folder(ModelConfig(tiny=TINY, cache_dir=str(tmp_path_factory.mktemp("model"))))


@pytest.fixture(scope="module")
def exported(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> trt_build.ExportedModel:
    return trt_build.export_onnx(folder, "float32", tmp_path_factory.mktemp("engines"))


def _model(folder: Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    model = LlamaForCausalLM(LlamaConfig.from_folder(folder))
    load_weights(model, folder)
    return model.to(dtype).eval()


def _engines(exp: trt_build.ExportedModel) -> dict[str, OrtEngine]:
    return {s.name: OrtEngine(exp.onnx[s.name][0], s) for s in exp.specs}


def test_every_segment_has_a_symbolic_token_axis(exported: trt_build.ExportedModel) -> None:
    assert [s.name for s in exported.specs] == ["embed", "pre.0", "post.0", "pre.1", "post.1", "final"]
    for spec in exported.specs:
        graph = onnx.load(str(exported.onnx[spec.name][0])).graph
        assert [i.name for i in graph.input] == [s.name for s in spec.inputs]
        for io in list(graph.input) + list(graph.output):
            assert io.type.tensor_type.shape.dim[0].dim_param == spec.axis, (spec.name, io.name)
        assert exported.onnx[spec.name][1] == ox.sha256_onnx(exported.onnx[spec.name][0])


@torch.inference_mode()
def test_segments_match_the_torch_model(folder: Path, exported: trt_build.ExportedModel) -> None:
    """ORT vs the model's own modules (not the export's source modules) at 1, 7 and 64 tokens."""
    model, eng = _model(folder), _engines(exported)
    c, g = model.config, torch.Generator().manual_seed(0)
    for n in SIZES:
        ids = torch.randint(0, c.vocab_size, (n,), generator=g)
        pos = torch.randint(0, c.max_position_embeddings, (n,), generator=g)
        h = torch.randn(n, c.hidden_size, generator=g)
        attn = torch.randn(n, c.num_attention_heads * c.head_dim, generator=g)
        torch.testing.assert_close(eng["embed"](ids)[0], model.model.embed_tokens(ids), rtol=0, atol=0)
        for i, layer in enumerate(model.model.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = ref.rotary(a.q_proj(x).view(n, -1, c.head_dim), pos, model.cos_sin)
            k = ref.rotary(a.k_proj(x).view(n, -1, c.head_dim), pos, model.cos_sin)
            v = a.v_proj(x).view(n, -1, c.head_dim)
            for got, want in zip(eng[f"pre.{i}"](h, model.cos_sin[pos]), (q, k, v), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            n2 = layer.post_attention_layernorm  # the forward's fused add, then the next one's
            xx, residual = ref.fused_add_rms_norm(a.o_proj(attn), h, n2.weight, n2.eps)
            torch.testing.assert_close(eng[f"post.{i}"](attn, h)[0], layer.mlp(xx) + residual, rtol=1e-5, atol=1e-5)
        logits = model.lm_head(model.model.norm(h)).float()
        torch.testing.assert_close(eng["final"](h)[0], logits, rtol=1e-5, atol=1e-5)
    assert all(e.calls == list(SIZES) for e in eng.values())  # one export served every size


def _step(ids: list[int], start: int, blocks: torch.Tensor, block_size: int) -> Batch:
    """One sequence: tokens ids at positions start.., its K/V slots through `blocks`."""
    n = len(ids)
    pos = torch.arange(start, start + n)
    return Batch(
        input_ids=torch.tensor(ids), positions=pos, query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([start + n], dtype=torch.int32),
        slot_mapping=blocks[pos // block_size] * block_size + pos % block_size,
        block_table=blocks[None].to(torch.int32), logits_indices=torch.tensor([n - 1]),
        num_decodes=int(n == 1), requests=[None], sampling=[],  # type: ignore[list-item]  (only len() is read)
    )


def _chain(eng: dict[str, OrtEngine], model: LlamaForCausalLM, batch: Batch, kv: list[torch.Tensor]) -> torch.Tensor:
    """The tensorrt runner's step with onnxruntime for the engines and the reference attention."""
    c = model.config
    rope = model.cos_sin[batch.positions]
    (h,) = eng["embed"](batch.input_ids)
    for i, cache in enumerate(kv):
        q, k, v = eng[f"pre.{i}"](h, rope)
        ref.write_kv(k, v, cache, batch.slot_mapping)
        if batch.num_decodes:
            o = ref.paged_attention_decode(q, cache, batch.block_table, batch.seq_lens, c.head_dim**-0.5)
        else:
            o = ref.paged_attention_prefill(q, cache, batch.block_table, batch.query_start_loc, batch.seq_lens,
                                            c.head_dim**-0.5)
        (h,) = eng[f"post.{i}"](o.reshape(o.shape[0], -1), h)
    return eng["final"](h[batch.logits_indices])[0]


@torch.inference_mode()
def test_chained_segments_reproduce_the_model_logits(folder: Path, exported: trt_build.ExportedModel) -> None:
    """A 13-token prompt in two prefill chunks, then greedy decode steps: ORT segments + reference
    attention vs LlamaForCausalLM.forward (the torch runner's path), each with its own KV cache."""
    model, eng = _model(folder), _engines(exported)
    c, bs = model.config, 8
    shape = (2, 8, bs, c.num_key_value_heads, c.head_dim)
    kv_model = [torch.zeros(shape) for _ in range(c.num_hidden_layers)]
    kv_chain = [torch.zeros(shape) for _ in range(c.num_hidden_layers)]
    blocks = torch.tensor([5, 2, 7, 0])  # scattered blocks: slots go through the block table
    prompt = torch.randint(0, c.vocab_size, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    chunks = [(prompt[:9], 0), (prompt[9:], 9)]  # two prefill chunks, then four decodes
    token = -1
    for i in range(6):
        ids, start = chunks[i] if i < 2 else ([token], len(prompt) + i - 2)
        batch = _step(ids, start, blocks, bs)
        want = model(batch, kv_model)  # (1, vocab)
        torch.testing.assert_close(_chain(eng, model, batch, kv_chain), want, rtol=1e-4, atol=1e-4)
        token = int(want.argmax(-1))


@torch.inference_mode()
def test_fp16_segments_match_the_fp16_model(folder: Path, tmp_path: Path) -> None:
    """fp16 weights in the graph, RMSNorm in fp32 through its casts; ORT vs the fp16 torch model.
    Inputs are scaled to the size of the tiny model's MLP output (~1e-2), so that a wrong MLP
    cannot hide under fp16 rounding of a large residual."""
    exp = trt_build.export_onnx(folder, "float16", tmp_path)
    model, eng = _model(folder, torch.float16), _engines(exp)
    c, n, g = model.config, 7, torch.Generator().manual_seed(2)
    h = (0.01 * torch.randn(n, c.hidden_size, generator=g)).half()
    attn = (0.01 * torch.randn(n, c.num_attention_heads * c.head_dim, generator=g)).half()
    layer = model.model.layers[0]
    n2 = layer.post_attention_layernorm
    xx, residual = ref.fused_add_rms_norm(layer.self_attn.o_proj(attn), h, n2.weight, n2.eps)
    mlp = layer.mlp(xx)
    assert float(mlp.abs().mean()) > 10 * (1e-4 + 1e-2 * float((mlp + residual).abs().mean()))  # above the tolerance
    got = eng["post.0"](attn, h)[0]
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, mlp + residual, rtol=1e-2, atol=1e-4)
    logits = eng["final"](h)[0]
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, model.lm_head(model.model.norm(h)).float(), rtol=1e-2, atol=1e-3)


def test_bf16_graph_types(folder: Path, tmp_path: Path) -> None:
    """onnxruntime's CPU provider has no bf16 kernels: check the graph's types instead (what a
    strongly typed TensorRT network takes), and that it is a valid model."""
    exp = trt_build.export_onnx(folder, "bfloat16", tmp_path)
    m = onnx.load(str(exp.onnx["post.0"][0]))
    onnx.checker.check_model(m, full_check=True)
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [bf16, bf16]
    casts = [a.i for node in m.graph.node if node.op_type == "Cast" for a in node.attribute if a.name == "to"]
    assert f32 in casts and bf16 in casts  # RMSNorm: up to fp32 and back
    final = onnx.load(str(exp.onnx["final"][0]))
    assert final.graph.output[0].type.tensor_type.elem_type == f32


def test_export_is_reused_until_the_checkpoint_changes(folder: Path, exported: trt_build.ExportedModel,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = exported.dir.parent
    monkeypatch.setattr(ox, "export_all", lambda *a, **k: pytest.fail("exported again"))
    again = trt_build.export_onnx(folder, "float32", root)
    assert again.dir == exported.dir and again.onnx == exported.onnx
    assert trt_build.model_dir(folder, "float16", root) != exported.dir
    ckpt = folder / "model.safetensors"
    st = ckpt.stat()
    try:
        import os

        os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        assert trt_build.model_dir(folder, "float32", root) != exported.dir
    finally:
        os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only outcome")
def test_build_engine_command_without_a_gpu(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.__main__ import main

    rc = main(["build-engine", "--model", str(folder), "--out", str(tmp_path), "--dtype", "fp16"])
    out, err = capsys.readouterr()
    assert rc == 1
    onnx_dir = trt_build.model_dir(folder, "float16", tmp_path) / "onnx"
    assert sorted(p.name for p in onnx_dir.glob("*.onnx")) == sorted(
        f"{n}.onnx" for n in ("embed", "pre.0", "post.0", "pre.1", "post.1", "final"))
    assert f"6 segments in {onnx_dir}" in out
    last = err.strip().splitlines()[-1]  # the reason, one line (a log line of the export may precede it)
    assert last.startswith("meshgate: build-engine: engines not built: no CUDA GPU") and str(onnx_dir) in last
    assert "Traceback" not in err
