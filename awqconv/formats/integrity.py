"""Checksums recorded when an artifact is written, checked whenever it is read.

Every artifact directory awqconv writes carries ``awqconv-manifest.json``: the artifact's format,
the awqconv version, the source model and quantization settings, and each file's path, size and
sha256. Readers (``export``, ``eval``, ``verify``, ``load``) check it before trusting a byte, so a
flipped, truncated, deleted or added weight file is named instead of silently exported. Artifacts
written by other tools (no manifest) are read as they are.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import CorruptFileError

MANIFEST = "awqconv-manifest.json"
MANIFEST_FORMAT = "awqconv-artifact"
MANIFEST_VERSION = 1
# written beside an artifact after the fact (verify's report); never part of the artifact
NOT_CHECKED = frozenset({MANIFEST, "verify.json"})
_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def artifact_dir(path: Path) -> Path:
    """The directory that holds an artifact's manifest (a ``.gguf`` file's parent)."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def _files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() not in NOT_CHECKED and not p.name.endswith(".verify.json")
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def record(root: Path, artifact_format: str, provenance: dict[str, Any], quant_config: dict[str, Any]) -> dict[str, Any]:
    """Hash every file under ``root`` and write the manifest; returns it."""
    from .. import __version__
    from .._io import timestamp

    files = [
        {"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _files(root)
    ]
    manifest = {
        "format": MANIFEST_FORMAT,
        "manifest_version": MANIFEST_VERSION,
        "artifact_format": artifact_format,
        "awqconv_version": __version__,
        "created": timestamp(),
        "source": {"model": provenance.get("source_model"), "revision": provenance.get("revision")},
        "quantization": quant_config,
        "files": files,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The validated manifest of the artifact at ``path``; None when it has none."""
    root = artifact_dir(path)
    f = root / MANIFEST
    if not f.exists():
        return None
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CorruptFileError(f"{f} is not valid JSON ({e}); the artifact cannot be checked: re-export it") from None
    problem = _manifest_problem(m)
    if problem:
        raise CorruptFileError(f"{f}: {problem}; re-export the artifact")
    return m


def _manifest_problem(m: Any) -> str | None:
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        return f"not an awqconv artifact manifest (format should be {MANIFEST_FORMAT!r})"
    if m.get("manifest_version") != MANIFEST_VERSION:
        return f"manifest_version {m.get('manifest_version')!r} is not {MANIFEST_VERSION}: upgrade awqconv"
    if not isinstance(m.get("artifact_format"), str):
        return "artifact_format is missing or not a string"
    files = m.get("files")
    if not isinstance(files, list):
        return "files is missing or not a list"
    for i, e in enumerate(files):
        ok = (isinstance(e, dict) and isinstance(e.get("path"), str) and type(e.get("size")) is int
              and e["size"] >= 0 and isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64)
        if not ok:
            return f"files[{i}] is not a {{path, size, sha256}} entry"
        rel = Path(e["path"])
        if rel.is_absolute() or ".." in rel.parts:
            return f"files[{i}] path {e['path']!r} points outside the artifact"
    return None


def check(path: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Check every file of the artifact at ``path`` against its manifest; CorruptFileError names the
    first file that is missing, added, resized or changed. Returns the manifest (None: none kept)."""
    root = artifact_dir(path)
    m = manifest if manifest is not None else read_manifest(root)
    if m is None:
        return None
    listed = {e["path"]: e for e in m["files"]}
    for rel, e in listed.items():
        f = root / rel
        if not f.is_file():
            raise CorruptFileError(f"{root}: {rel} is missing (listed in {MANIFEST}); the artifact is incomplete: re-export it")
        size = f.stat().st_size
        if size != e["size"]:
            raise CorruptFileError(
                f"{root}: {rel} is {size} bytes, {MANIFEST} recorded {e['size']}; the file was truncated or "
                "changed: re-export it"
            )
        if sha256_file(f) != e["sha256"]:
            raise CorruptFileError(
                f"{root}: {rel} does not match the sha256 in {MANIFEST}; the file changed after it was "
                "written: re-export it"
            )
    extra = [p.relative_to(root).as_posix() for p in _files(root) if p.relative_to(root).as_posix() not in listed]
    if extra:
        raise CorruptFileError(
            f"{root}: {', '.join(extra[:3])} {'is' if len(extra) == 1 else 'are'} not listed in {MANIFEST}; "
            "files were added to the artifact after it was written: remove them or re-export"
        )
    return m
