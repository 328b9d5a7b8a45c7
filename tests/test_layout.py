"""The package layout: one installed namespace, layers that only import downward, no cycles.

The layers (docs/design.md) by installed module name:

    app        hnet_serve.cli, hnet_serve.quickstart           may import anything
    export     hnet_serve.export.*                             core, training.data (provenance)
    scoring    hnet_serve.scoring.*                            core, serving
    training   hnet_serve.training.*                           core
    serving    hnet_serve.serving.*, hnet_serve.runtime        core
    core       every other hnet_serve.* module                 core

Every ``import`` counts, also those inside functions (a lazy import is still a dependency), and
``importlib.import_module`` is allowed only in the app layer (the CLI registers its commands).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
# Repository folder -> installed package (pyproject's [tool.setuptools.package-dir]).
FOLDERS = {"hnet_serve": "hnet_serve", "training": "hnet_serve.training",
           "export": "hnet_serve.export"}
APP = {"hnet_serve.cli", "hnet_serve.quickstart"}
# What each layer may import besides itself and the core.
ALLOWED: dict[str, tuple[str, ...]] = {
    "core": (),
    "serving": (),
    "training": (),
    "scoring": ("serving",),
    "export": ("training.data",),
}


def module_files() -> dict[str, Path]:
    """Installed module name -> source file, for every module of the distribution."""
    out: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def layer_of(module: str) -> str:
    if module in APP:
        return "app"
    if module == "hnet_serve.runtime":  # the documented import path, re-exporting serving
        return "serving"
    for layer in ("serving", "scoring", "training", "export"):
        if module == f"hnet_serve.{layer}" or module.startswith(f"hnet_serve.{layer}."):
            return layer
    return "core"


def imports_of(path: Path, module: str, known: set[str]) -> tuple[set[str], list[str]]:
    """Modules of ours that ``path`` imports (resolved to the longest known name), and the
    top-level names it imports that are not ours but look like our folders."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    stray: list[str] = []

    def add(name: str) -> None:
        parts = name.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        if parts:
            found.add(".".join(parts))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("training", "export"):
                    stray.append(alias.name)
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
                if name.split(".")[0] in ("training", "export"):
                    stray.append(name)
            for alias in node.names:
                add(f"{name}.{alias.name}")
            add(name)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            found.add("importlib.import_module")
    found.discard(module)
    return found, stray


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    graph = {}
    for module, path in files.items():
        deps, stray = imports_of(path, module, known)
        if stray:
            raise AssertionError(f"{module} imports top-level {stray}: use hnet_serve.<package>")
        graph[module] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``'a -> b'`` for every import that goes up or sideways against the layer rules."""
    bad = []
    for module, deps in sorted(graph.items()):
        layer = layer_of(module)
        for dep in sorted(deps):
            if dep == "importlib.import_module":
                if layer != "app":
                    bad.append(f"{module} -> importlib.import_module")
                continue
            target = layer_of(dep)
            if layer == "app" or target in ("core", layer):
                continue
            allowed = ALLOWED[layer]
            if not any(dep == f"hnet_serve.{a}" or dep.startswith(f"hnet_serve.{a}.")
                       or (a == target) for a in allowed):
                bad.append(f"{module} ({layer}) -> {dep} ({target})")
    return bad


# -- the checks -------------------------------------------------------------------------------
def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_imports_only_go_down():
    assert upward_imports(import_graph()) == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    graph = import_graph()
    graph["hnet_serve.model"] = graph["hnet_serve.model"] | {"hnet_serve.serving.runtime"}
    assert "hnet_serve.model (core) -> hnet_serve.serving.runtime (serving)" in upward_imports(graph)
    assert find_cycle(graph) is not None  # serving.runtime imports the model
    graph = import_graph()
    graph["hnet_serve.training.loop"] = graph["hnet_serve.training.loop"] | {
        "importlib.import_module"}
    assert upward_imports(graph) == ["hnet_serve.training.loop -> importlib.import_module"]


def test_no_source_file_is_over_450_lines():
    long = {m: n for m, p in module_files().items()
            if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {v: k for k, v in FOLDERS.items()}
    packages = {m for m, p in module_files().items() if p.name == "__init__.py"}
    assert set(config["packages"]) == packages


@pytest.mark.slow
def test_wheel_installs_only_hnet_serve(tmp_path):
    """The built wheel holds one top-level package, ``hnet_serve``, with training and export
    under it (no generic ``training``/``export`` on a user's path)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("hnet_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"hnet_serve"}
    for module in ("hnet_serve/training/loop.py", "hnet_serve/export/onnx_export.py",
                   "hnet_serve/serving/service.py", "hnet_serve/scoring/scorer.py",
                   "hnet_serve/training/data/sources.py", "hnet_serve/py.typed"):
        assert module in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_documented_import_paths_keep_working():
    """The README's Python API and the re-exports docs/design.md promises."""
    from hnet_serve import runtime as old_runtime
    from hnet_serve import scoring, serving
    from hnet_serve.scoring import scorer
    from hnet_serve.serving import config as serving_config
    from hnet_serve.serving import runtime

    assert old_runtime.Runtime is serving.Runtime is runtime.Runtime
    assert old_runtime.ServingConfig is serving.ServingConfig is serving_config.ServingConfig
    assert scoring.score_file is scorer.score_file
    with pytest.raises(AttributeError):
        scoring.no_such_name  # noqa: B018
