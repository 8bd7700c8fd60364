"""Format writers and readers: pure re-layouts of the canonical integers.

Each format lives in its own module exposing the same five module-level names:

    NAME: str                                    # "hf-awq", "gguf", ...
    plan(request: ExportRequest) -> list[str]    # problems that would make write() fail; no side effects
    write(qm: QuantizedModel, out_dir: Path, variant: str | None) -> None   # into an existing empty dir
    read(path: Path) -> QuantizedModel           # back to canonical (exact where the format is)
    detect(path: Path) -> bool                   # does this directory/file hold this format?

A target is written ``name`` or ``name:variant`` (``gguf:q4_0``). Formats never import ``quant``.
Modules are imported lazily so one format's optional dependency never breaks another.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from ..errors import InputError

# name -> module (relative to this package)
FORMATS: dict[str, str] = {
    "canonical": ".canonical",
    "hf-awq": ".hf_awq",
    "gguf": ".gguf",
    "exllamav2": ".exllamav2",
    "peft": ".peft",
}


@dataclass(frozen=True)
class Target:
    name: str
    variant: str | None = None

    @property
    def label(self) -> str:
        return self.name if self.variant is None else f"{self.name}:{self.variant}"

    @property
    def dirname(self) -> str:
        """The sub-directory of the output that holds this artifact."""
        return self.label.replace(":", "-")


@dataclass
class ExportRequest:
    """What a format's plan() may inspect before any work is done."""

    target: Target
    hf_config: dict[str, Any]
    bits: int
    group_size: int  # resolved (per-channel already replaced by in_features is NOT done here: -1 stays)
    zero_point: bool
    scale_dtype: torch.dtype
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (out, in)


def parse_targets(spec: str | list[str] | tuple[str, ...]) -> list[Target]:
    """``"canonical,hf-awq,gguf:q4_0"`` -> Targets; unknown names fail with the list of known ones."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    targets: list[Target] = []
    for raw in items:
        raw = raw.strip()
        if not raw:
            continue
        name, _, variant = raw.partition(":")
        name = name.strip().lower()
        if name not in FORMATS:
            raise InputError(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")
        t = Target(name, variant.strip().lower() or None)
        if t not in targets:
            targets.append(t)
    if not targets:
        raise InputError(f"no output format given; use --to with some of {', '.join(FORMATS)}")
    return targets


def get_format(name: str) -> ModuleType:
    if name not in FORMATS:
        raise InputError(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[name], __name__)


def detect_format(path) -> str | None:
    """The name of the first format whose detect() accepts ``path``."""
    for name in FORMATS:
        try:
            mod = get_format(name)
        except ImportError:
            continue
        if mod.detect(path):
            return name
    return None
