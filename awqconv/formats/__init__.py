"""Format writers and readers: pure re-layouts of the canonical integers.

Each format lives in its own module meeting :class:`~awqconv.formats.base.FormatModule`:

    NAME: str                                    # "hf-awq", "gguf", ...
    plan(request: ExportRequest) -> list[str]    # problems that would make write() fail; no side effects
    write(qm: QuantizedModel, out_dir: Path, variant: str | None) -> Any   # into an existing empty dir
    read(path: Path) -> QuantizedModel           # back to canonical (exact where the format is)
    detect(path: Path) -> bool                   # does this directory/file hold this format?
    uses_prescaled(variant: str | None) -> bool  # does write() read qm.prescaled?

A target is written ``name`` or ``name:variant`` (``gguf:q4_0``). Formats never import ``quant``.
Modules are imported lazily so one format's optional dependency never breaks another.
:func:`read_artifact` is the one way to read an artifact: checksums, reader, validation.
"""

from __future__ import annotations

import errno
import importlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import cast

from ..errors import InputError, UsageError
from ..model import QuantizedModel
from .base import ExportRequest, FormatModule, Target

__all__ = ["FORMATS", "ExportRequest", "FormatModule", "Target", "detect_format", "get_format",
           "needs_prescaled", "parse_targets", "read_artifact", "require_path"]

# name -> module (relative to this package)
FORMATS: dict[str, str] = {
    "canonical": ".canonical",
    "hf-awq": ".hf_awq",
    "gguf": ".gguf",
    "exllamav2": ".exllamav2",
    "peft": ".peft",
    "compressed-tensors": ".compressed_tensors",
    "mlx": ".mlx",
}


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
            raise UsageError(f"--to: unknown format {name!r}; choose from {', '.join(FORMATS)}")
        t = Target(name, variant.strip().lower() or None)
        if t not in targets:
            targets.append(t)
    if not targets:
        raise UsageError(f"no output format given; use --to with some of {', '.join(FORMATS)}")
    return targets


def get_format(name: str) -> FormatModule:
    """The format module registered as ``name`` (imported on first use)."""
    if name not in FORMATS:
        raise InputError(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")
    return cast(FormatModule, importlib.import_module(FORMATS[name], __name__))


def needs_prescaled(targets: Iterable[Target]) -> bool:
    """Whether writing any of ``targets`` reads the AWQ-prescaled float weights."""
    return any(get_format(t.name).uses_prescaled(t.variant) for t in targets)


def detect_format(path) -> str | None:
    """The format recorded in the artifact's checksum manifest, else the first whose detect()
    accepts ``path`` (a manifest names it even when a damaged file fools detection)."""
    from ..errors import CorruptFileError
    from .integrity import read_manifest

    try:
        m = read_manifest(path)
    except CorruptFileError:
        m = None
    if m is not None and m["artifact_format"].partition(":")[0] in FORMATS:
        return m["artifact_format"].partition(":")[0]
    for name in FORMATS:
        try:
            mod = get_format(name)
        except ImportError:
            continue
        if mod.detect(path):
            return name
    return None


def read_artifact(path: str | os.PathLike[str]) -> tuple[QuantizedModel, str]:
    """``(QuantizedModel, format name)`` of the artifact at ``path``, after every check: the files
    against their recorded checksums, then the reader, then types and finite values."""
    import json

    from ..errors import CorruptFileError
    from .integrity import check

    p = require_path(path)
    check(p)  # before detection: a damaged file is named, not guessed around
    name = detect_format(p)
    if name is None:
        cfg = p / "config.json"
        if p.is_dir() and cfg.is_file():
            try:
                json.loads(cfg.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise CorruptFileError(f"{cfg} is not valid JSON ({e}); re-create or re-export it") from None
        raise InputError(
            f"{p} is not an awqconv artifact (no canonical manifest, AWQ config, GGUF, ExLlamaV2 or PEFT "
            "layout found); pass a directory written by awqconv quantize or export"
        )
    qm = get_format(name).read(p)
    qm.validate(str(p))
    return qm, name


def require_path(path) -> Path:
    """``path`` as a Path when it exists; InputError telling a missing path from a broken link."""
    p = Path(path)
    try:
        p.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"{p} is a symbolic link loop; point it at an artifact directory") from None
        if os.path.islink(p):
            raise InputError(f"{p} is a symbolic link to a missing target ({os.readlink(p)})") from None
        raise InputError(f"{p} does not exist; pass an artifact directory such as out/canonical") from None
    return p
