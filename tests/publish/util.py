"""Helpers of the publish tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from click.testing import CliRunner

from awqconv.cli import main

FORMATS = ["canonical", "hf-awq", "gguf", "exllamav2", "peft"]
TOKEN = "tok-alice"


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def copy_out(src: Path, dst: Path) -> Path:
    """A hard-linked copy of OUT: cheap; change files in it only by replacing them (tamper())."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def tamper(f: Path) -> None:
    """Flip one byte of ``f`` without touching the file it is hard-linked to."""
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.unlink()
    f.write_bytes(bytes(data))
