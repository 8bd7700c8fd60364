"""Dependencies flow one way: formats never import the quantizer, and the quantizer never imports formats;
the architecture registry (archs.py) imports none of them."""

from __future__ import annotations

import ast
import sys
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


def test_the_architecture_registry_is_a_leaf() -> None:
    """archs.py imports only errors and the standard library; quant, formats and runtime import it."""
    found = set()
    for node in ast.walk(ast.parse((PKG / "archs.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            found.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    relative = {m for m in found if m.startswith(".")}
    assert relative <= {".errors"}, f"awqconv/archs.py imports {relative - {'.errors'}}"
    third_party = {m.split(".")[0] for m in found if not m.startswith(".")} - {"__future__"}
    assert all(m in sys.stdlib_module_names for m in third_party), f"awqconv/archs.py imports {third_party}"
