"""TensorRT engine cache keys, profiles and the lazy import (kernels/trt_engine.py), and the
`tensorrt` runner's selection and errors, without a GPU or the tensorrt package."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from gateway.config import EngineConfig
from gateway.worker import trt_build, trt_runner
from gateway.worker.runner import RUNNERS, make_runner
from kernels import onnx_export as ox
from kernels import trt_engine as te

KEY = te.EngineKey(trt_version="10.13.3.9", arch="sm_90", onnx_sha256="ab" * 32,
                   profile=te.Profile(1, 64, 512), dtype="float16")


def test_same_key_same_path(tmp_path: Path) -> None:
    twin = te.EngineKey("10.13.3.9", "sm_90", "ab" * 32, te.Profile(1, 64, 512), "float16")
    assert twin.path(tmp_path, "pre.0") == KEY.path(tmp_path, "pre.0")
    assert KEY.path(tmp_path, "pre.0").parent == tmp_path
    assert KEY.path(tmp_path, "pre.0").name.startswith("pre.0-sm_90-")


@pytest.mark.parametrize("change", [
    dict(trt_version="10.14.1.48"), dict(arch="sm_80"), dict(onnx_sha256="cd" * 32),
    dict(profile=te.Profile(1, 64, 1024)), dict(profile=te.Profile(1, 32, 512)), dict(profile=te.Profile(2, 64, 512)),
    dict(dtype="bfloat16"),
], ids=lambda c: next(iter(c)))
def test_any_field_changes_the_path(tmp_path: Path, change: dict) -> None:  # type: ignore[type-arg]
    other = dataclasses.replace(KEY, **change)
    assert other.digest() != KEY.digest()
    assert other.path(tmp_path, "pre.0") != KEY.path(tmp_path, "pre.0")


def test_profiles_follow_the_engine_limits() -> None:
    p = te.token_profiles(max_num_batched_tokens=512, max_num_seqs=64)
    assert p[ox.TOKENS] == te.Profile(1, 64, 512)
    assert p[ox.ROWS] == te.Profile(1, 64, 64)
    # a padded decode graph of max_num_seqs rows may exceed a smaller token budget
    assert te.token_profiles(32, 64)[ox.TOKENS] == te.Profile(1, 64, 64)
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        te.Profile(1, 600, 512)


def test_profile_shapes_put_the_range_on_the_dynamic_axis() -> None:
    assert te.profile_shapes([-1, 4096], te.Profile(1, 64, 512)) == ((1, 4096), (64, 4096), (512, 4096))
    assert te.profile_shapes([-1], te.Profile(1, 2, 3)) == ((1,), (2,), (3,))
    with pytest.raises(ValueError, match="one dynamic leading dim"):
        te.profile_shapes([8, 4096], te.Profile(1, 2, 3))
    with pytest.raises(ValueError, match="one dynamic leading dim"):
        te.profile_shapes([-1, -1], te.Profile(1, 2, 3))


def test_arch_names() -> None:
    assert te.arch_of((9, 0)) == "sm_90"
    assert te.arch_of((8, 6)) == "sm_86"


def test_engine_keys_give_each_segment_its_axis_profile(tmp_path: Path) -> None:
    specs = ox.segment_specs(ox.Dims(512, 128, 2, 2, 1, 64), torch.float16)
    onnx = {s.name: (tmp_path / f"{s.name}.onnx", f"{i:064x}") for i, s in enumerate(specs)}
    model = trt_build.ExportedModel(tmp_path, "float16", specs, onnx)
    profiles = te.token_profiles(256, 16)
    keys = trt_build.engine_keys(model, profiles, "sm_90", "10.13.3.9")
    assert keys["final"].profile == profiles[ox.ROWS]
    assert {keys[n].profile for n in ("embed", "pre.0", "post.1")} == {profiles[ox.TOKENS]}
    assert len({k.path(model.engine_dir, n) for n, k in keys.items()}) == len(specs)  # no two share a file
    assert all(k.dtype == "float16" and k.onnx_sha256 == onnx[n][1] for n, k in keys.items())


def test_a_cached_engine_is_loaded_not_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx_path = tmp_path / "pre.0.onnx"
    cached = KEY.path(tmp_path / "engines", "pre.0")
    monkeypatch.setattr(te, "build_engine", lambda *a, **k: pytest.fail("rebuilt a cached engine"))
    with pytest.raises(FileNotFoundError, match="meshgate build-engine"):
        te.load_or_build(onnx_path, KEY, tmp_path / "engines", build=False)
    te.save_plan(cached, b"plan")
    assert te.load_or_build(onnx_path, KEY, tmp_path / "engines") == cached
    built: list[tuple[Path, te.Profile, str]] = []
    monkeypatch.setattr(te, "build_engine", lambda p, prof, dtype: built.append((p, prof, dtype)) or b"new")
    other = dataclasses.replace(KEY, arch="sm_80")
    path = te.load_or_build(onnx_path, other, tmp_path / "engines")
    assert built == [(onnx_path, other.profile, "float16")] and path.read_bytes() == b"new" and path != cached
    assert not list((tmp_path / "engines").glob("*.tmp"))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_missing_tensorrt_names_the_extra() -> None:
    with pytest.raises(RuntimeError, match=r"pip install 'meshgate\[tensorrt\]'"):
        te.tensorrt()


def test_tensorrt_is_registered() -> None:
    assert RUNNERS["tensorrt"] == "gateway.worker.trt_runner:TrtRunner"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_tensorrt_runner_without_cuda_says_so(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="'tensorrt' needs a CUDA GPU.*use runner 'torch'"):
        make_runner(tmp_path, EngineConfig(runner="tensorrt", device="cuda"))


def test_tensorrt_runner_needs_a_cuda_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="engine.device: runner 'tensorrt' needs a CUDA device, got 'cpu'"):
        make_runner(tmp_path, EngineConfig(runner="tensorrt", device="cpu"))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_missing_tensorrt_is_reported_before_any_export(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    root = tmp_path / "engines"
    with pytest.raises(RuntimeError, match=r"needs NVIDIA's TensorRT.*pip install 'meshgate\[tensorrt\]'"):
        trt_runner.TrtRunner(tmp_path, EngineConfig(runner="tensorrt", device="cuda"), engine_root=root)
    assert not root.exists()
