"""The shape of the house: each layer imports only the layers below it, the reference libraries
stay off the engine's import path, and engine/ files stay small.

    kernels/ (ops)  ->  models/ (model, loading, quantised weights)  ->  engine/  ->  tools/, bench/

Imports are read from the source (every ``import`` and ``from ... import``, also inside
functions), so a lazy import counts like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"kernels", "models", "engine", "tools", "bench", "tests"}
ALLOWED = {
    "kernels": {"kernels"},
    "models": {"kernels", "models"},
    "engine": {"kernels", "models", "engine"},
    "tools": {"kernels", "models", "engine", "tools"},
    "bench": {"kernels", "models", "engine", "tools", "bench"},
}
# Test and benchmark oracles only: never imported by what users run.
REFERENCE_ONLY = {"transformers", "peft", "trl", "bitsandbytes", "llama_cpp", "liger_kernel", "unsloth"}
MAX_ENGINE_FILE_LINES = 400


def imported_packages(path: Path, package: str) -> set[str]:
    """Top-level package names imported anywhere in the file of ``package`` (a relative import
    counts as ``package`` itself)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(package if node.level else node.module.split(".")[0])
    return names


def files_of(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(package):
    wrong = {}
    for file in files_of(package):
        ours = imported_packages(file, package) & OURS
        if ours - ALLOWED[package]:
            wrong[str(file.relative_to(ROOT))] = sorted(ours - ALLOWED[package])
    assert not wrong, f"{package}/ may import only {sorted(ALLOWED[package])}; found {wrong}"


@pytest.mark.parametrize("package", ["kernels", "models", "engine", "tools"])
def test_reference_libraries_stay_off_the_import_path(package):
    wrong = {str(f.relative_to(ROOT)): sorted(imported_packages(f, package) & REFERENCE_ONLY)
             for f in files_of(package)}
    wrong = {f: names for f, names in wrong.items() if names}
    assert not wrong, f"test/benchmark oracles imported by {package}/: {wrong}"


def test_engine_files_stay_small():
    long = {str(f.relative_to(ROOT)): n for f in files_of("engine")
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_ENGINE_FILE_LINES}
    assert not long, f"engine/ files over {MAX_ENGINE_FILE_LINES} lines: {long}"


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path):
    """The rule cannot be dodged by importing inside a function."""
    probe = tmp_path / "probe.py"
    probe.write_text("from . import sibling\n\ndef f():\n    from engine.errors import InputError\n"
                     "    import transformers.models\n")
    assert imported_packages(probe, "models") == {"models", "engine", "transformers"}
