"""Helpers shared by the writers/readers of Hugging Face-style checkpoint directories."""

from __future__ import annotations

import json
from pathlib import Path

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
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return str(q.get("quant_method", "")).lower() if isinstance(q, dict) else None
