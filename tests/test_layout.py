"""The package's seams, read from its imports: the worker side never imports the launcher, and the data
and model code never reach for torch.distributed, DeepSpeed's engine or Ray."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "distsft"

FORBIDDEN = {
    "training": ("distsft.launcher", "distsft.cli", "ray"),
    "checkpoint": ("distsft.launcher", "distsft.cli", "distsft.training", "ray"),
    "metrics": ("distsft.launcher", "distsft.cli", "distsft.training", "ray"),
    "model": ("distsft.launcher", "distsft.cli", "distsft.training", "torch.distributed", "deepspeed", "ray"),
    "data": ("distsft.launcher", "distsft.cli", "distsft.training", "distsft.model", "torch.distributed", "ray"),
    "recipes": ("distsft.launcher", "distsft.cli", "distsft.training", "distsft.model", "distsft.data", "ray"),
    "harness": ("distsft.launcher", "distsft.cli", "distsft.training", "torch.distributed", "deepspeed", "ray"),
    "config": ("distsft.launcher", "distsft.cli", "distsft.training", "distsft.model", "distsft.data", "ray"),
}


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package):
    bad = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {name}"
        for path in sorted((PACKAGE / package).rglob("*.py"))
        for line, name in imports(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])
    ]
    assert not bad, bad


def test_every_subpackage_says_what_lives_there_and_what_it_may_import():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc.lower(), f"{init}: no docstring saying what it may import"
