"""Build kernels/csrc/*.cu for the CPU emulator (emulate.h) and launch them like cuda.core would:
`EmuLibrary.launch` has the signature of kernels.launcher.KernelLibrary.launch."""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from kernels.launcher import CSRC, DTYPE_NAMES, HEAD_GROUPS, HEAD_SIZES

HERE = Path(__file__).parent
DTS = sorted(DTYPE_NAMES.values())
NAMES: dict[str, list[str]] = {
    "paged_attention.cu": [f"paged_attention_{dt}_d{d}_g{g}" for dt in DTS for d in HEAD_SIZES for g in HEAD_GROUPS]
    + [f"paged_attention_reduce_{dt}_d{d}" for dt in DTS for d in HEAD_SIZES],
    "kv_cache_write.cu": [f"write_kv_{dt}" for dt in DTS],
    "rms_norm.cu": [f"{op}_{dt}" for op in ("rms_norm", "fused_add_rms_norm") for dt in DTS],
    "rotary.cu": [f"rotary_{dt}" for dt in DTS],
}
_CTYPES = {np.uint64: ctypes.c_uint64, np.int64: ctypes.c_int64, np.int32: ctypes.c_int32, np.float32: ctypes.c_float}


def find_cxx() -> str | None:
    return shutil.which("g++")


def build(out_dir: Path) -> dict[str, Path]:
    """One shared library per .cu with an emu_<kernel>(grid, block, args) entry per kernel."""
    cxx = find_cxx()
    assert cxx is not None

    def one(file: str) -> tuple[str, Path]:
        stem = file.removesuffix(".cu")
        wrapper = out_dir / f"{stem}.cpp"
        lines = [f'#include "{CSRC / file}"']
        lines += [f'extern "C" void emu_{n}(const int* g, int b, void** a) {{ emu_launch({n}, g, b, a); }}' for n in NAMES[file]]
        wrapper.write_text("\n".join(lines) + "\n")
        lib = out_dir / f"lib{stem}.so"
        cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-DMESHGATE_EMULATE",
               "-include", str(HERE / "emulate.h"), "-o", str(lib), str(wrapper)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return file, lib

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, NAMES))


class EmuLibrary:
    def __init__(self, libs: dict[str, Path]):
        self.libs = {f: ctypes.CDLL(str(p)) for f, p in libs.items()}
        self.launches: list[tuple[str, tuple[int, ...], int]] = []

    def launch(self, file: str, name: str, grid: tuple[int, ...], block: int, *args: Any) -> None:
        assert block % 32 == 0 and block <= 1024, block
        vals = [_CTYPES[type(a)](a.item()) for a in args]  # exact C types, as cuda.core marshals them
        argv = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
        g = (ctypes.c_int * 3)(*(tuple(grid) + (1, 1, 1))[:3])
        self.launches.append((name, tuple(grid), block))
        getattr(self.libs[file], f"emu_{name}")(g, ctypes.c_int(block), argv)
