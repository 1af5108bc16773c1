"""The tensorrt runner's forward without a GPU: onnxruntime runs the exported ONNX segments in
place of the TensorRT engines, and the kernels' launches are replaced by kernels/reference.py
(after the launcher's real argument checks); compared with the torch runner on the engine's real
steps (chunked prefill, mixed steps, decode through padded graph buffers). What stays unproven
here is TensorRT itself: building and running the engines (test_trt_runner_gpu.py)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from gateway.config import EngineConfig, ModelConfig
from gateway.worker import cuda_runner, trt_build, trt_runner
from gateway.worker.batch import Batch
from gateway.worker.engine import Engine, model_folder
from gateway.worker.model import LlamaConfig
from gateway.worker.request import Request, SamplingParams
from gateway.worker.runner import TorchRunner
from kernels import launcher as K
from kernels import trt_engine as te
from tests.kernels.ort import TINY, OrtEngine  # skips the module without onnxruntime/onnxscript
from tests.kernels.test_cuda_runner_cpu import Both, _eager_capture, _NoLaunch, _ref_ops

CFG = EngineConfig(block_size=8, num_blocks=128, max_num_seqs=8, max_num_batched_tokens=48,
                   max_model_len=600, num_threads=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, trt_build.ExportedModel]:
    folder = model_folder(ModelConfig(tiny=TINY, cache_dir=str(tmp_path_factory.mktemp("model"))))
    return folder, trt_build.export_onnx(folder, "float32", tmp_path_factory.mktemp("engines"))


def _runner(exported: tuple[Path, trt_build.ExportedModel], graphs: bool,
            profiles: dict[str, te.Profile] | None = None) -> trt_runner.TrtRunner:
    folder, exp = exported
    runner = trt_runner.TrtRunner.__new__(trt_runner.TrtRunner)
    engines = {s.name: OrtEngine(exp.onnx[s.name][0], s) for s in exp.specs}
    profiles = profiles or te.token_profiles(CFG.max_num_batched_tokens, CFG.max_num_seqs)
    runner._setup(LlamaConfig.from_folder(folder), CFG, engines, profiles, use_cuda_graphs=graphs)
    return runner


@pytest.fixture
def reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: None)
    monkeypatch.setattr(cuda_runner.DecodeGraphs, "_capture", _eager_capture)
    monkeypatch.setattr(K, "check_device", lambda *named: None)
    monkeypatch.setattr(K, "library", lambda device: _NoLaunch())
    ops = _ref_ops()
    monkeypatch.setattr(cuda_runner, "K", ops)  # CudaAttention's paged attention
    monkeypatch.setattr(trt_runner, "K", ops)  # the KV write


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "padded-static-buffers"])
def test_trt_runner_wiring_on_cpu(exported: tuple[Path, trt_build.ExportedModel], reference_kernels: None,
                                  graphs: bool) -> None:
    folder, _ = exported
    runner = _runner(exported, graphs)
    both = Both(TorchRunner(folder, CFG), runner)  # type: ignore[arg-type]
    engine = Engine(ModelConfig(path=str(folder)), CFG, runner=both)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for i in range(6):
        prompt = [rng.randrange(TINY.vocab_size) for _ in range(rng.randrange(1, 90))]
        engine.add_request(Request(f"r{i}", prompt, params))
    while engine.has_work():
        engine.step()
    assert both.num_checked >= 6
    calls = runner.engines["pre.0"].calls  # type: ignore[attr-defined]
    assert 1 in calls and max(calls) > 8  # decode steps and prefill chunks went through the segments
    slots = runner.engines["final"].slots  # type: ignore[attr-defined]
    if graphs:  # decode steps of 1..6 sequences went through padded sizes, each with its contexts
        assert runner.graphs is not None and len(runner.graphs.graphs) >= 2
        assert slots == {None, *runner.graphs.graphs}
    else:
        assert slots == {None}


def _one_sequence(n: int) -> Batch:
    pos = torch.arange(n)
    return Batch(input_ids=torch.zeros(n, dtype=torch.int64), positions=pos,
                 query_start_loc=torch.tensor([0, n], dtype=torch.int32), seq_lens=torch.tensor([n], dtype=torch.int32),
                 slot_mapping=pos, block_table=torch.zeros((1, 4), dtype=torch.int32),
                 logits_indices=torch.tensor([n - 1]), num_decodes=0, requests=[], sampling=[])


def test_a_step_beyond_the_profile_is_refused(exported: tuple[Path, trt_build.ExportedModel],
                                              reference_kernels: None) -> None:
    runner = _runner(exported, False, {"num_tokens": te.Profile(1, 4, 4), "num_rows": te.Profile(1, 1, 1)})
    with pytest.raises(ValueError, match="5 tokens / 1 rows exceeds the TensorRT profile"):
        runner.forward(_one_sequence(5))
    assert runner.forward(_one_sequence(4)).shape == (1, TINY.vocab_size)
