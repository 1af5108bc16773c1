"""DESIGN.md §2: every module has a place, the dependency direction holds, and the edge gateway
imports without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("gateway", "geo", "kernels")
HEAVY = ("torch", "tensorrt", "kernels", "gateway.worker")
_BASE = {"gateway.core", "gateway.config"}
# package -> the project packages it may import (besides itself). The fronts (api, rpc) sit over
# edge, which sits over routing, pools, registry and core; the CLI starts everything.
ALLOWED: dict[str, set[str]] = {
    "gateway.core": set(),
    "gateway.config": {"gateway.core"},
    "geo": set(),
    "kernels": set(),
    "gateway.worker": _BASE | {"kernels"},
    "gateway.routing": _BASE | {"geo"},
    "gateway.pools": _BASE,
    "gateway.registry": _BASE,
    "gateway.edge": _BASE | {"gateway.routing", "gateway.pools", "gateway.registry", "geo"},
    "gateway.api": _BASE | {"gateway.edge", "gateway.routing", "gateway.pools", "geo"},
    "gateway.rpc": _BASE | {"gateway.edge", "gateway.routing", "gateway.pools", "geo"},
    "gateway.cli": _BASE | {"gateway.api", "gateway.rpc", "gateway.edge", "gateway.registry", "gateway.worker"},
    "gateway.__main__": {"gateway.cli"},
    "gateway": set(),  # the package's own __init__ (this module alone: not a prefix)
}
_MODULE_ONLY = {"gateway"}
# Entry points that may import the worker (and so torch), but only inside the function that runs it.
LAZY_HEAVY = ("gateway.cli",)


def _package_of(module: str) -> str | None:
    for pkg in sorted(ALLOWED, key=len, reverse=True):
        if module == pkg or (pkg not in _MODULE_ONLY and module.startswith(pkg + ".")):
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


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _top_level_imports(tree: ast.Module) -> set[str]:
    """Imports that run when the module is imported (not those inside functions)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= _imports(node)
        elif isinstance(node, (ast.If, ast.Try)):  # `if TYPE_CHECKING:` and guarded imports count
            names |= _imports(ast.Module(body=[n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))],
                                         type_ignores=[]))
    return names


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """graph: module -> the modules it imports. A module of ours that no package places, or an
    import of ours against DESIGN §2's arrows, is a violation."""
    bad = []
    for module, imports in sorted(graph.items()):
        pkg = _package_of(module)
        if pkg is None:
            bad.append(f"{module} has no place in DESIGN §2's layout (tests/test_layering.py ALLOWED)")
            continue
        for imp in sorted(imports):
            if not imp.startswith(OURS):
                continue
            target = _package_of(imp) or imp
            if target != pkg and target not in ALLOWED[pkg]:
                bad.append(f"{module} imports {imp}")
    return bad


def heavy_violations(graph: dict[str, set[str]], top_level: dict[str, set[str]]) -> list[str]:
    """Outside gateway.worker and kernels nothing imports torch, tensorrt, kernels or gateway.worker;
    the CLI may, inside the command that starts a worker."""
    bad = []
    for module, imports in sorted(graph.items()):
        if module.startswith(("gateway.worker", "kernels")):
            continue
        checked = top_level[module] if module.startswith(LAZY_HEAVY) else imports
        bad += [f"{module} imports {imp}" for imp in sorted(checked) if imp.startswith(HEAVY)]
    return bad


def _graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    graph, top = {}, {}
    for module, path in _modules():
        tree = ast.parse(path.read_text())
        graph[module] = _imports(tree)
        top[module] = _top_level_imports(tree)
    return graph, top


def test_every_module_has_a_place_and_the_arrows_hold():
    graph, _ = _graphs()
    bad = layering_violations(graph)
    assert not bad, "\n".join(bad)


def test_the_check_fails_on_a_misplaced_module_or_a_backward_arrow():
    ok = {"gateway.edge.forward": {"gateway.pools.upstream", "gateway.core.errors", "asyncio"},
          "gateway.api.app": {"gateway.edge.gateway"}, "gateway.rpc.server": {"gateway.edge.forward"}}
    assert layering_violations(ok) == []
    assert layering_violations({**ok, "gateway.newthing": set()}) == [
        "gateway.newthing has no place in DESIGN §2's layout (tests/test_layering.py ALLOWED)"]
    assert layering_violations({**ok, "gateway.rpc.server": {"gateway.api.app"}}) == [
        "gateway.rpc.server imports gateway.api.app"]  # one front never imports the other
    assert layering_violations({**ok, "gateway.edge.forward": {"gateway.api.h1"}}) == [
        "gateway.edge.forward imports gateway.api.h1"]  # the pipeline never imports a front
    assert layering_violations({**ok, "gateway.pools.load": {"gateway.routing.latency"}}) == [
        "gateway.pools.load imports gateway.routing.latency"]


def test_only_the_worker_touches_torch():
    graph, top = _graphs()
    bad = heavy_violations(graph, top)
    assert not bad, "\n".join(bad)
    # and the check itself: a top-level import in the CLI, or any import in the edge, fails it
    assert heavy_violations({"gateway.cli.run": {"gateway.worker.server"}},
                            {"gateway.cli.run": {"gateway.worker.server"}}) == [
        "gateway.cli.run imports gateway.worker.server"]
    assert heavy_violations({"gateway.cli.run": {"gateway.worker.server"}}, {"gateway.cli.run": set()}) == []
    assert heavy_violations({"gateway.edge.x": {"torch"}}, {"gateway.edge.x": set()}) == ["gateway.edge.x imports torch"]


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
