"""dvc.yaml's code dependencies follow the imports: each stage depends on every gptcore module its script
imports (directly or through other modules, lazy imports inside functions included), and on nothing else
of the code, so a change to a module reruns exactly the stages that run it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None  # a name imported from a module, not a module


def imported_modules(path: Path) -> set[str]:
    """Every gptcore module a file imports, anywhere in it; `from a import b` may name module a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == "gptcore"}


def import_closure(script: Path) -> set[str]:
    """The files a stage script runs: itself and every gptcore module (and package __init__) it reaches."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                found = module_file(".".join(parts[:i]))
                if found is not None and found not in seen:
                    todo.append(found)
    return {p.relative_to(ROOT).as_posix() for p in seen}


def code_deps(stage: dict) -> list[str]:
    return [d for d in stage.get("deps", []) if d.split("/")[0] in ("gptcore", "stages")]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_are_its_import_closure(name):
    stage = STAGES[name]
    assert stage["cmd"] == f"python -m stages.{name}"  # run from the workspace: its own copy of gptcore
    closure = import_closure(ROOT / "stages" / f"{name}.py")
    covered = set()
    for dep in code_deps(stage):
        path = ROOT / dep
        assert path.exists(), f"{name}: dependency {dep} does not exist"
        files = {p.relative_to(ROOT).as_posix() for p in path.rglob("*.py")} if path.is_dir() else {dep}
        assert files <= closure, f"{name}: {dep} holds code the stage never imports: {sorted(files - closure)}"
        covered |= files
    assert closure <= covered, f"{name}: imports not in its deps: {sorted(closure - covered)}"


def test_the_closure_follows_lazy_and_package_imports():
    closure = import_closure(ROOT / "stages" / "train.py")
    # cutile_model imports gptcore.kernels, whose functions import the kernel files when first called
    assert {
        "gptcore/__init__.py",
        "gptcore/kernels/__init__.py",
        "gptcore/kernels/attention.py",
        "gptcore/kernels/layernorm.py",
        "gptcore/train_graph.py",
        "gptcore/data.py",
    } <= closure
    assert "gptcore/verify/__init__.py" not in closure and "gptcore/kernels/compile.py" not in closure
