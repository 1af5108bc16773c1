"""DESIGN.md §2: the dependency direction holds, and the edge gateway imports without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package -> the project packages it may import (besides itself)
ALLOWED = {
    "gateway.core": set(),
    "gateway.config": set(),
    "geo": set(),
    "kernels": set(),
    "gateway.worker": {"gateway.core", "gateway.config", "kernels"},
    "gateway.routing": {"gateway.core", "gateway.config", "geo"},
    "gateway.pools": {"gateway.core", "gateway.config"},
    "gateway.registry": {"gateway.core", "gateway.config"},
    "gateway.api": {"gateway.core", "gateway.config", "gateway.routing", "gateway.pools"},
    "gateway.rpc": {"gateway.core", "gateway.config", "gateway.routing", "gateway.pools"},
}
OURS = ("gateway", "geo", "kernels")
HEAVY = ("torch", "tensorrt", "kernels", "gateway.worker")


def _package_of(module: str) -> str | None:
    for pkg in sorted(ALLOWED, key=len, reverse=True):
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return None


def _modules() -> list[tuple[str, Path]]:
    out = []
    for top in OURS:
        for path in (ROOT / top).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((".".join(parts), path))
    return out


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_dependency_direction():
    bad = []
    for module, path in _modules():
        pkg = _package_of(module)
        if pkg is None:
            continue
        for imp in _imports(path):
            if not imp.startswith(OURS):
                continue
            target = _package_of(imp) or imp
            if target != pkg and target not in ALLOWED[pkg] and not (pkg == "gateway.config" and imp == "gateway.config"):
                bad.append(f"{module} imports {imp}")
    assert not bad, "\n".join(bad)


def test_only_the_worker_touches_torch():
    bad = []
    for module, path in _modules():
        # The CLI imports the worker inside its `worker` command only; importing the CLI without
        # torch is checked below.
        if module.startswith(("gateway.worker", "kernels")) or module == "gateway.__main__":
            continue
        for imp in _imports(path):
            if imp.startswith(HEAVY):
                bad.append(f"{module} imports {imp}")
    assert not bad, "\n".join(bad)


def test_edge_gateway_imports_without_torch():
    mods = [m for m, _ in _modules() if m.startswith(("gateway", "geo")) and not m.startswith("gateway.worker")]
    code = (
        "import sys\n"
        "for name in ('torch', 'tensorrt', 'safetensors', 'tokenizers'):\n"
        "    sys.modules[name] = None  # any import of it now fails\n"
        f"import importlib\nfor m in {mods!r}:\n    importlib.import_module(m)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
