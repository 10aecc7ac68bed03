"""The package's layers import only the layers below them (docs/development.md): the DP core stays
free of model and cluster code, and the engine never learns about transformers."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Layer -> the dist_dpc packages it may import (itself included).
ALLOWED = {
    "utils": {"utils"},
    "privacy": {"privacy"},
    "engine": {"privacy", "engine"},
    "data": {"data", "utils"},
    "models": {"privacy", "engine", "models"},
    "compress": {"privacy", "engine", "compress"},
    "tasks": {"privacy", "engine", "models", "data", "tasks", "utils"},
    "pipeline": {"privacy", "engine", "models", "data", "tasks", "compress", "pipeline", "utils"},
}
THIRD_PARTY_ONLY = {"privacy": {"torch", "opacus", "numpy", "scipy"}}  # nothing else outside the stdlib
NEVER = {"engine": {"transformers", "datasets", "wandb", "submitit"},
         "compress": {"deepspeed", "wandb", "submitit"},
         "tasks": {"deepspeed", "wandb", "submitit"},
         "pipeline": {"submitit"}}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def layer_files():
    for layer in ALLOWED:
        for path in sorted((ROOT / "dist_dpc" / layer).rglob("*.py")):
            yield layer, path


@pytest.mark.parametrize("layer,path", list(layer_files()), ids=lambda x: str(x).rsplit("dist_dpc/", 1)[-1])
def test_module_imports_only_layers_below(layer, path):
    for name in imports(path):
        parts = name.split(".")
        if parts[0] == "launch":
            pytest.fail(f"{path}: dist_dpc.{layer} imports launch/ (launch sits on top of everything)")
        if parts[0] == "dist_dpc":
            below = parts[1] if len(parts) > 1 else ""
            assert below in ALLOWED[layer], f"{path}: dist_dpc.{layer} may not import {name}"
            continue
        assert parts[0] not in NEVER.get(layer, set()), f"{path}: dist_dpc.{layer} may not import {name}"
        if layer in THIRD_PARTY_ONLY and parts[0] not in sys.stdlib_module_names:
            assert parts[0] in THIRD_PARTY_ONLY[layer], f"{path}: dist_dpc.{layer} may import only torch and opacus, not {name}"


def test_the_rules_see_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import transformers\nfrom dist_dpc.pipeline import phases\n")
    assert {"transformers", "dist_dpc.pipeline"} <= imports(bad)
