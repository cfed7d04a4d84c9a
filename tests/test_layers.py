"""Imports only point down the layers (scripts/import_graph.py, docs/adding-a-method.md) and none is cyclic."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_upward_or_sideways_imports_and_no_cycles():
    assert _import_graph().check() == []


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    graph = _import_graph()
    package = tmp_path / "effigen"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "registry.py").write_text("def f():\n    from .post.distill import X\n")  # lazy, still upward
    (package / "post").mkdir()
    (package / "post" / "__init__.py").write_text("")
    (package / "post" / "distill.py").write_text("from ..registry import f\n")
    monkeypatch.setattr(graph, "PACKAGE", package)
    problems = graph.check()
    assert any(p.startswith("upward import registry -> post at effigen.registry:2") for p in problems), problems
    assert any("import cycle" in p and "effigen.registry" in p for p in problems), problems


def test_the_registry_and_the_pipeline_load_no_training_or_post_training_code():
    code = ("import sys, effigen.pipeline, effigen.registry; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('effigen.')}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for package in ("training", "post", "cli", "report", "convert"):
        assert f"'{package}'" not in loaded, loaded
