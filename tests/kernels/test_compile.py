"""Every .cu compiles with nvcc for sm_90 and sm_80, and the hot kernels do not spill.

Also compiles the text the launcher hands NVRTC (includes inlined), so that path is checked too.
"""
from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kernels import launcher
from kernels.ptxas import CSRC, KernelResources, compile_cubin, find_nvcc, parse_ptxas

NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH, $CUDA_HOME/bin or /usr/local/cuda/bin")
SOURCES = sorted(p.name for p in CSRC.glob("*.cu"))
ARCHS = ("sm_90", "sm_80")
HOT = ("paged_attention_", "write_kv_", "rms_norm_", "fused_add_rms_norm_", "rotary_")


@pytest.fixture(scope="module")
def builds() -> dict[tuple[str, str], tuple[int, str]]:
    """(source, arch) -> (nvcc return code, output); compiled in parallel once for the module."""
    assert NVCC is not None
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(8) as pool:
        jobs = {(s, a): pool.submit(compile_cubin, NVCC, CSRC / s, a, Path(tmp)) for s in SOURCES for a in ARCHS}
        return {k: f.result() for k, f in jobs.items()}


def test_sources_exist() -> None:
    assert set(SOURCES) == {"paged_attention.cu", "kv_cache_write.cu", "rms_norm.cu", "rotary.cu"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_compiles_without_spills(builds: dict[tuple[str, str], tuple[int, str]], source: str, arch: str) -> None:
    code, log = builds[(source, arch)]
    assert code == 0, log
    kernels = parse_ptxas(log)
    assert kernels, f"no ptxas resource report in:\n{log}"
    for k in kernels:
        assert k.arch == arch
        if k.name.startswith(HOT):
            assert (k.spill_stores, k.spill_loads) == (0, 0), k


def test_every_launcher_name_is_an_entry_point(builds: dict[tuple[str, str], tuple[int, str]]) -> None:
    names = {k.name for (_, a), (_, log) in builds.items() if a == "sm_90" for k in parse_ptxas(log)}
    for dt in ("float32", "float16", "bfloat16"):
        for d in launcher.HEAD_SIZES:
            for g in launcher.HEAD_GROUPS:
                assert f"paged_attention_{dt}_d{d}_g{g}" in names
            assert f"paged_attention_reduce_{dt}_d{d}" in names
        for op in ("write_kv", "rms_norm", "fused_add_rms_norm", "rotary"):
            assert f"{op}_{dt}" in names


def test_inlined_source_compiles(tmp_path: Path) -> None:
    """The launcher inlines #include "common.cuh": the result stands alone (as NVRTC sees it)."""
    assert NVCC is not None
    src = launcher.load_source("rms_norm.cu")
    assert "#include" not in src
    (tmp_path / "alone").mkdir()
    cu = tmp_path / "alone" / "rms_norm.cu"
    cu.write_text(src)
    code, log = compile_cubin(NVCC, cu, "sm_90", tmp_path)
    assert code == 0, log


def test_parse_ptxas_sample() -> None:
    log = (
        "ptxas info    : Compiling entry function 'k1' for 'sm_90'\n"
        "ptxas info    : Function properties for k1\n"
        "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers, 2080 bytes smem, 452 bytes cmem[0]\n"
        "ptxas info    : Compiling entry function 'k2' for 'sm_90'\n"
        "ptxas info    : Function properties for k2\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 21 registers, used 0 barriers, 412 bytes cmem[0]\n"
    )
    assert parse_ptxas(log) == [
        KernelResources("k1", "sm_90", 40, 8, 4, 12, 2080),
        KernelResources("k2", "sm_90", 21, 0, 0, 0, 0),
    ]
