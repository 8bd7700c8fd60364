"""Every registered format module meets the declared FormatModule protocol, and the format
modules import each other in one direction only (no cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from awqconv.formats import FORMATS, FormatModule, get_format
from awqconv.formats.base import protocol_problems

FORMATS_DIR = Path(__file__).resolve().parents[2] / "awqconv" / "formats"


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_module_meets_the_protocol(name):
    mod = get_format(name)
    assert protocol_problems(mod) == []
    assert isinstance(mod, FormatModule)
    assert mod.NAME == name


def test_protocol_problems_names_what_is_missing():
    import types

    fake = types.ModuleType("fake_format")
    fake.NAME = "fake"
    fake.plan = lambda request: []
    fake.write = lambda qm, out_dir: None  # no variant parameter
    problems = protocol_problems(fake)
    assert any("write" in p for p in problems)
    assert any("read is missing" in p for p in problems)
    assert any("detect is missing" in p for p in problems)


def _module_imports() -> dict[str, set[str]]:
    """format module -> sibling modules it imports (at any depth of its code)."""
    graph: dict[str, set[str]] = {}
    for f in FORMATS_DIR.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
        graph[f.stem] = deps
    return graph


def test_format_modules_import_without_cycles():
    graph = _module_imports()
    graph["__init__"] = set()  # the package re-exports; its lazy imports go through importlib

    def visit(node: str, path: list[str]) -> None:
        for dep in graph.get(node, ()):
            assert dep not in path, f"import cycle: {' -> '.join(path + [dep])}"
            visit(dep, path + [dep])

    for mod in graph:
        visit(mod, [mod])
