"""Dependencies flow one way: formats never import the quantizer, and the quantizer never imports formats."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "awqconv"


def _imports(folder: str) -> set[tuple[str, str]]:
    found = set()
    for f in (PKG / folder).glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                found.add((f.name, mod))
            elif isinstance(node, ast.Import):
                found.update((f.name, a.name) for a in node.names)
    return found


@pytest.mark.parametrize(("folder", "forbidden"), [("formats", "quant"), ("quant", "formats"), ("kernels", "runtime")])
def test_no_import_across_the_boundary(folder: str, forbidden: str) -> None:
    bad = [(f, m) for f, m in _imports(folder) if m.lstrip(".").split(".")[0] == forbidden
           or m.startswith(f"awqconv.{forbidden}") or m == f"..{forbidden}" or m.startswith(f"..{forbidden}.")]
    assert not bad, f"awqconv/{folder} imports {forbidden}: {bad}"
