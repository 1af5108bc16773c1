"""The cuda runner's forward on CPU: our kernels' launches replaced by kernels/reference.py (after
the launcher's real argument checks), compared with the torch runner. This checks the runner's
wiring (fused projections, strided q/k/v views, in-place norms and rotary, decode/prefill split)
without a GPU."""
from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from gateway.config import EngineConfig, ModelConfig, TinyModelConfig
from gateway.worker import cuda_runner
from gateway.worker.batch import Batch
from gateway.worker.engine import Engine, model_folder
from gateway.worker.request import Request, SamplingParams
from gateway.worker.runner import TorchRunner
from kernels import launcher as K
from kernels import reference as ref
from tests.kernels.emulated import EmuLibrary, find_cxx


class _NoLaunch:
    def launch(self, *args: Any) -> None:
        pass


def _ref_ops() -> SimpleNamespace:
    """The launcher's op API: real argument checks, reference results."""

    def paged_attention(q, kv, bt, sl, scale, max_seq_len, query_start_loc=None, out=None, **kw):  # type: ignore[no-untyped-def]
        K.paged_attention(q, kv, bt, sl, scale, max_seq_len, query_start_loc, out, **kw)
        if query_start_loc is None:
            res = ref.paged_attention_decode(q, kv, bt, sl, scale) if q.shape[0] else q
        else:
            res = ref.paged_attention_prefill(q, kv, bt, query_start_loc, sl, scale)
        assert out is not None and int(sl.max()) <= max_seq_len
        return out.copy_(res)

    def rms_norm(x, w, eps, out=None):  # type: ignore[no-untyped-def]
        K.rms_norm(x, w, eps, out)
        return ref.rms_norm(x, w, eps)

    def fused_add_rms_norm(x, r, w, eps, out=None):  # type: ignore[no-untyped-def]
        K.fused_add_rms_norm(x, r, w, eps, out)
        o, res = ref.fused_add_rms_norm(x, r, w, eps)
        r.copy_(res)  # in place, as the kernel does
        return o, r

    def rotary(q, k, pos, cs):  # type: ignore[no-untyped-def]
        K.rotary(q, k, pos, cs)
        q.copy_(ref.rotary(q, pos, cs))
        k.copy_(ref.rotary(k, pos, cs))

    def write_kv(k, v, kv, slots):  # type: ignore[no-untyped-def]
        K.write_kv(k, v, kv, slots)
        ref.write_kv(k, v, kv, slots)

    return SimpleNamespace(paged_attention=paged_attention, rms_norm=rms_norm, rotary=rotary,
                           fused_add_rms_norm=fused_add_rms_norm, write_kv=write_kv,
                           check_head_size=K.check_head_size, PARTITION_SIZE=K.PARTITION_SIZE)


class Both:
    def __init__(self, a: TorchRunner, b: cuda_runner.CudaRunner):
        self.a, self.b, self.device, self.config, self.num_checked = a, b, a.device, a.config, 0

    def execute(self, batch: Batch) -> torch.Tensor:
        expected = self.a.execute(batch)
        torch.testing.assert_close(self.b.execute(batch), expected, rtol=1e-4, atol=1e-4)
        self.num_checked += 1
        return expected


class _EagerGraph:
    """Stands in for a CUDA graph on CPU: replay re-runs the captured forward into its output."""

    def __init__(self, fn: Any, out: torch.Tensor):
        self.fn, self.out = fn, out

    def replay(self) -> None:
        self.out.copy_(self.fn())


def _eager_capture(self: cuda_runner.DecodeGraphs, size: int) -> tuple[Any, torch.Tensor]:
    static = self._static_batch(size)
    out = self.runner.forward(static)
    return _EagerGraph(lambda: self.runner.forward(static), out), out


def _run_both(tmp_path: Path, graphs: bool, num_requests: int, max_prompt: int, max_tokens: int,
              family: str | None = None) -> Both:
    """An engine whose steps run the torch runner and the cuda runner (built without the CUDA
    checks) on the same batches, checking their logits agree. family: a transformers-built
    Qwen2/Qwen3 folder instead of the tiny Llama."""
    tiny = TinyModelConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1)  # head_dim 64, GQA 2
    mcfg = ModelConfig(tiny=tiny, cache_dir=str(tmp_path))
    cfg = EngineConfig(block_size=8, num_blocks=128, max_num_seqs=8, max_num_batched_tokens=48,
                       max_model_len=600, num_threads=1)
    folder = model_folder(mcfg)
    if family is not None:
        folder = _family_folder(family, folder, tmp_path / family)
        mcfg = ModelConfig(path=str(folder))
    runner = cuda_runner.CudaRunner.__new__(cuda_runner.CudaRunner)
    runner._setup(TorchRunner(folder, cfg), cfg, use_cuda_graphs=graphs)
    both = Both(TorchRunner(folder, cfg), runner)
    engine = Engine(mcfg, cfg, runner=both)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(num_requests):
        prompt = [rng.randrange(tiny.vocab_size) for _ in range(rng.randrange(1, max_prompt))]
        engine.add_request(Request(f"r{i}", prompt, params))
    while engine.has_work():
        engine.step()
    return both


def _family_folder(family: str, tiny: Path, out: Path) -> Path:
    """A Qwen2 (q/k/v biases) or Qwen3 (q/k norms) model with random weights, head_dim 64."""
    transformers = pytest.importorskip("transformers")
    cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    cfg = cls(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=64, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tiny / name).read_bytes())
    return out


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_cuda_runner_wiring_on_cpu_for_qwen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str) -> None:
    """The fused q/k/v with Qwen2's biases, Qwen3's per-head q/k norms on the strided views."""
    monkeypatch.setattr(K, "check_device", lambda *named: None)
    monkeypatch.setattr(K, "library", lambda device: _NoLaunch())
    monkeypatch.setattr(cuda_runner, "K", _ref_ops())
    both = _run_both(tmp_path, False, num_requests=4, max_prompt=40, max_tokens=4, family=family)
    assert both.num_checked >= 4 and both.config.model_type == family


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "padded-static-buffers"])
def test_cuda_runner_wiring_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, graphs: bool) -> None:
    """Launches replaced by reference results (after the launcher's argument checks)."""
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: None)
    monkeypatch.setattr(cuda_runner.DecodeGraphs, "_capture", _eager_capture)
    monkeypatch.setattr(K, "check_device", lambda *named: None)
    monkeypatch.setattr(K, "library", lambda device: _NoLaunch())
    monkeypatch.setattr(cuda_runner, "K", _ref_ops())
    both = _run_both(tmp_path, graphs, num_requests=6, max_prompt=90, max_tokens=6)
    assert both.num_checked >= 6
    if graphs:  # decode steps of 1..6 sequences went through padded sizes
        assert both.b.graphs is not None and len(both.b.graphs.graphs) >= 2


@pytest.mark.skipif(find_cxx() is None, reason="g++ not found (the CPU emulator needs it)")
def test_cuda_runner_with_emulated_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emu_libs: dict[str, Path]
) -> None:
    """The real kernels (run on the CPU by the emulator) inside the runner, fp32."""
    emu = EmuLibrary(emu_libs)
    monkeypatch.setattr(K, "check_device", lambda *named: None)
    monkeypatch.setattr(K, "library", lambda device: emu)
    both = _run_both(tmp_path, False, num_requests=3, max_prompt=20, max_tokens=3)
    assert both.num_checked >= 3
    assert {n for n, _, _ in emu.launches} >= {"paged_attention_float32_d64_g2", "write_kv_float32", "rotary_float32",
                                              "rms_norm_float32", "fused_add_rms_norm_float32"}


def test_cuda_runner_without_cuda_constructor_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the error on a machine without CUDA")
    with pytest.raises(RuntimeError, match="torch.cuda.is_available\\(\\) is False"):
        cuda_runner.CudaRunner(tmp_path, EngineConfig(device="cuda"))
