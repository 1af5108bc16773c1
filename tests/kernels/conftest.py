from __future__ import annotations

from pathlib import Path

import pytest

from tests.kernels.emulated import build, find_cxx


@pytest.fixture(scope="session")
def emu_libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The CPU-emulator builds of kernels/csrc (g++), made once per session."""
    if find_cxx() is None:
        pytest.skip("g++ not found (the CPU emulator needs it)")
    return build(tmp_path_factory.mktemp("emu"))
