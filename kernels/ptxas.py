"""Compile kernels/csrc/*.cu with nvcc and read ptxas's resource report (registers, spills, smem).

CI has nvcc but no GPU: this is how the kernels are checked there.
    python -m kernels.ptxas [sm_90 ...]    prints a table per kernel
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


@dataclass(frozen=True, slots=True)
class KernelResources:
    name: str
    arch: str
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    smem_bytes: int


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for p in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        cand = Path(p) / "bin" / "nvcc"
        if p and cand.exists():
            return str(cand)
    return None


def parse_ptxas(text: str) -> list[KernelResources]:
    """Entries of `-Xptxas -v` output, in order. Lines come as entry / properties / spills / used."""
    out: list[KernelResources] = []
    name = arch = ""
    spill: tuple[int, int, int] = (0, 0, 0)
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            name, arch, spill = m.group(1), m.group(2), (0, 0, 0)
        elif m := _SPILL.search(line):
            spill = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        elif (m := _USED.search(line)) and name:
            smem = int(m.group(2) or 0)
            out.append(KernelResources(name, arch, int(m.group(1)), *spill, smem))
            name = ""
    return out


def compile_cubin(nvcc: str, source: Path, arch: str, out_dir: Path) -> tuple[int, str]:
    """(return code, nvcc + ptxas output) of `nvcc -arch=ARCH -cubin -Xptxas -v`."""
    cmd = [nvcc, f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-std=c++17", f"-I{source.parent}",
           "-o", str(out_dir / f"{source.stem}-{arch}.cubin"), str(source)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def main(argv: list[str]) -> int:
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
        return 1
    archs = argv or ["sm_90", "sm_80"]
    rc = 0
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted(CSRC.glob("*.cu")):
            for arch in archs:
                code, log = compile_cubin(nvcc, src, arch, Path(tmp))
                rc |= code
                for k in parse_ptxas(log):
                    print(f"{src.name:20} {k.arch:6} {k.name:40} regs {k.registers:3}  spill "
                          f"{k.spill_stores}/{k.spill_loads} B  stack {k.stack_bytes} B  smem {k.smem_bytes} B")
                if code:
                    print(log)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
