"""Helpers shared by the writers/readers of Hugging Face-style checkpoint directories."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError

_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin")


def read_assets(path: Path, own_files: frozenset[str] | set[str]) -> dict[str, bytes]:
    """Every other top-level file (tokenizer, generation config, chat template), verbatim."""
    assets = {}
    for f in sorted(Path(path).iterdir()):
        n = f.name
        if not f.is_file() or n.startswith(".") or n in own_files or n.endswith(_WEIGHT_SUFFIXES):
            continue
        assets[n] = f.read_bytes()
    return assets


def quant_method(path: Path) -> str | None:
    """``config.json``'s ``quantization_config.quant_method`` (lower-cased), or None."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return quant_method_of(json.loads(cfg.read_text()))
    except (OSError, ValueError):
        return None


def quant_method_of(config: object) -> str | None:
    """The lower-cased ``quantization_config.quant_method`` of a parsed config.json, or None."""
    q = config.get("quantization_config") if isinstance(config, dict) else None
    return str(q.get("quant_method", "")).lower() if isinstance(q, dict) else None


def write_assets(out_dir: Path, assets: dict[str, bytes], own_files: frozenset[str] | set[str]) -> None:
    """Write tokenizer/generation files verbatim, skipping names the format writes itself and weights."""
    for fname, data in assets.items():
        if fname in own_files or fname.endswith(_WEIGHT_SUFFIXES[:2]):
            continue
        if Path(fname).name != fname or fname in (".", ".."):
            raise InputError(f"asset name {fname!r} is not a plain file name; refusing to write outside {out_dir}")
        (Path(out_dir) / fname).write_bytes(data)


def manifest_format(path: Path, manifest: str) -> str | None:
    """The ``format`` field of a JSON manifest in ``path``, or None when absent or unreadable."""
    f = Path(path) / manifest
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
