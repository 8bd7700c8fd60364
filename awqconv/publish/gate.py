"""Only what was verified goes out: the artifacts of an output directory, each matched to the
``awqconv verify`` record that checked it, and re-hashed against it.

A verify record (``verify.json``, written by ``awqconv verify``) lists, per artifact, the sha256 of
the ``awqconv-manifest.json`` it checked, that manifest's file hashes and the artifact's verdict.
An artifact may be published when a record holds its current manifest with a passing verdict and
every file still hashes to what that manifest says. Everything here is local: no network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AwqconvError, CorruptFileError, InputError, UsageError
from ..formats.integrity import MANIFEST, read_manifest, sha256_file
from ..outdir import OUTPUT_MARKER, read_marker

VERIFY_JSON = "verify.json"


@dataclass
class Artifact:
    """One artifact of OUT as it will be published."""

    label: str  # its folder in OUT: "hf-awq", "gguf-q4_0"
    path: Path
    fmt: str  # "gguf"
    variant: str | None  # "q4_0"
    manifest: dict[str, Any]
    files: list[dict[str, Any]]  # {path, size, sha256} as the files are now
    verify: dict[str, Any] | None = None  # see _verify_summary
    refused: str | None = None  # why it is not publishable (published anyway only with --force)
    provenance: dict[str, Any] = field(default_factory=dict)  # from an awqconv.json, when one has it

    @property
    def verified(self) -> bool:
        return self.refused is None


def find_artifacts(out: Path) -> list[tuple[str, Path]]:
    """``(label, directory)`` of every artifact in OUT (or OUT itself when it is one)."""
    if not out.exists():
        raise InputError(f"{out} does not exist; pass the -o directory of `awqconv quantize`")
    if not out.is_dir():
        raise InputError(f"{out} is not a directory; pass the -o directory of `awqconv quantize`")
    if (out / MANIFEST).is_file():
        return [(out.resolve().name, out)]
    found = []
    for sub in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (sub / MANIFEST).is_file():
            found.append((sub.name, sub))
        elif any(f.suffix in (".safetensors", ".gguf") or f.name == "config.json" for f in sub.iterdir()):
            raise InputError(f"{sub} has no {MANIFEST}, so awqconv did not write it and cannot vouch for it; "
                             "publish only outputs of `awqconv quantize` or `awqconv export`")
    for name in (read_marker(out) or {}).get("entries", []):
        if not (out / str(name)).exists():
            raise InputError(f"{out / str(name)} is listed in {out / OUTPUT_MARKER} but is gone; "
                             "re-run the quantize or export that wrote it")
    if not found:
        raise InputError(f"{out} holds no awqconv artifact (no sub-directory with {MANIFEST}); run "
                         f"`awqconv quantize MODEL --to ... -o {out}` and `awqconv verify {out}` first")
    return found


def _records(out: Path, extra: list[Path]) -> list[dict[str, Any]]:
    """Every verify record that may cover OUT's artifacts, newest first."""
    paths = [out / VERIFY_JSON, *sorted(out.glob("*/" + VERIFY_JSON)), *sorted(out.glob("*/*.verify.json")), *extra]
    if (out / MANIFEST).is_file():  # OUT is one artifact: `awqconv verify` may have run on its parent
        paths.append(out.resolve().parent / VERIFY_JSON)
    recs = []
    for p in paths:
        if not p.is_file():
            if p in extra:
                raise InputError(f"--verify-json {p} does not exist")
            continue
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{p} is not a readable verify record ({e}); re-run `awqconv verify`") from None
        if isinstance(rec, dict) and isinstance(rec.get("artifacts"), list):
            rec["_file"] = str(p)
            recs.append(rec)
    return sorted(recs, key=lambda r: str(r.get("created") or ""), reverse=True)


def _verify_summary(rec: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """What a card and a published manifest say about one artifact's verification."""
    rows = [r for r in rec.get("rows", []) if isinstance(r, dict)]
    twin = entry.get("same_as")
    # its own rows, then the runtime rows of the artifact whose tensors it shares
    rows = [r for r in rows if r.get("artifact") == entry["name"]] + [
        r for r in rows if twin and r.get("artifact") == twin and r.get("check") not in ("checksums", "structure")]
    metrics = rec.get("metrics", {}).get(entry.get("same_as") or entry["name"]) or rec.get("metrics", {}).get(entry["name"])
    return {"ok": entry.get("ok"), "verified_at": rec.get("created"), "awqconv_version": rec.get("awqconv_version"),
            "device": rec.get("device"), "machine": rec.get("machine") or {}, "same_as": entry.get("same_as"),
            "metrics": metrics or {}, "rows": rows, "record": rec.get("_file")}


def _first_failure(rec: dict[str, Any], name: str) -> str:
    bad = [r for r in rec.get("rows", []) if isinstance(r, dict) and r.get("artifact") == name and r.get("ok") is False]
    if not bad:
        return "its checks failed"
    r = bad[0]
    return f"check '{r.get('check')}' failed ({r.get('value')}{': ' + str(r['detail']) if r.get('detail') else ''})"


def _match(label: str, msha: str, records: list[dict[str, Any]], out: Path) -> tuple[dict | None, dict | None, str]:
    """The newest record entry for the manifest hash ``msha``; else why there is none."""
    named = None
    for rec in records:
        for e in rec["artifacts"]:
            if not isinstance(e, dict):
                continue
            if e.get("manifest_sha256") == msha:
                return rec, e, ""
            if e.get("name") == label and named is None:
                named = e
    if named is None:
        return None, None, f"never verified (run `awqconv verify {out}`)"
    if "manifest_sha256" not in named:
        return None, None, ("verified by an awqconv that recorded no file hashes "
                            f"(re-run `awqconv verify {out}`)")
    return None, None, (f"changed since verification: its {MANIFEST} is not the one verify checked "
                        f"(re-exported; re-run `awqconv verify {out}`)")


def _rehash(art_dir: Path, manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """The manifest's files as they are now, and the first difference from the manifest (or None)."""
    now, problem = [], None
    listed = {e["path"] for e in manifest["files"]}
    for e in manifest["files"]:
        f = art_dir / e["path"]
        if not f.is_file():
            raise InputError(f"{art_dir}: {e['path']} is missing (listed in {MANIFEST}); the artifact is "
                             "incomplete and cannot be published, even with --force: re-export it")
        cur = {"path": e["path"], "size": f.stat().st_size, "sha256": sha256_file(f)}
        if problem is None and (cur["size"], cur["sha256"]) != (e["size"], e["sha256"]):
            problem = f"{e['path']} does not match the sha256 that verify checked"
        now.append(cur)
    if problem is None:
        from ..formats.integrity import _files

        extra = [p.relative_to(art_dir).as_posix() for p in _files(art_dir)]
        extra = [p for p in extra if p not in listed]
        if extra:
            problem = f"{', '.join(extra[:3])} appeared after verify (not in {MANIFEST}; not uploaded)"
    return now, problem


def _provenance(arts: list[tuple[str, Path]]) -> dict[str, Any]:
    """The quantization provenance (calibration hash, ...) from the first awqconv.json that has it."""
    for _, p in arts:
        f = p / "awqconv.json"
        try:
            prov = json.loads(f.read_text(encoding="utf-8")).get("provenance") if f.is_file() else None
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            prov = None
        if isinstance(prov, dict):
            return prov
    return {}


def collect(out: Path, *, only: list[str] | None = None, force: bool = False,
            verify_json: list[Path] | None = None) -> list[Artifact]:
    """The artifacts of OUT that may be published; InputError naming every refused one (all of
    them in one line, nothing uploaded) unless ``force``."""
    found = find_artifacts(out)
    prov = _provenance(found)  # any artifact of the run may hold it, picked or not
    if only:
        unknown = [o for o in only if o not in {lb for lb, _ in found}]
        if unknown:
            raise UsageError(f"--only: {', '.join(unknown)} not in {out}; it holds {', '.join(lb for lb, _ in found)}")
        found = [(lb, p) for lb, p in found if lb in only]
    records = _records(out, list(verify_json or []))
    arts: list[Artifact] = []
    for label, path in found:
        try:
            manifest = read_manifest(path)
        except AwqconvError as e:
            raise CorruptFileError(f"{label}: {e}") from None
        assert manifest is not None
        fmt, _, variant = manifest["artifact_format"].partition(":")
        msha = sha256_file(path / MANIFEST)
        rec, entry, why = _match(label, msha, records, out)
        if rec is not None and entry is not None:
            ok = entry.get("ok")
            same = entry.get("same_as")
            twin = next((e for e in rec["artifacts"] if isinstance(e, dict) and e.get("name") == same), None) if same else None
            if ok is False:
                why = f"failed verification: {_first_failure(rec, entry['name'])}"
            elif ok is None:
                why = "not checkable by verify (it does not read back to the canonical integers)"
            elif twin is not None and twin.get("ok") is not True:
                why = f"shares its runtime checks with {same}, which failed verification"
        files, changed = _rehash(path, manifest)
        if not why and changed:
            why = f"changed since verification: {changed}"
        art = Artifact(label, path, fmt, variant or None, manifest, files, refused=why or None, provenance=prov)
        if rec is not None and entry is not None:
            art.verify = _verify_summary(rec, entry)
        arts.append(art)
    by_reason: dict[str, list[str]] = {}
    for a in arts:
        if a.refused:
            by_reason.setdefault(a.refused, []).append(a.label)
    if by_reason and not force:
        reasons = "; ".join(f"{', '.join(labels)}: {why}" for why, labels in by_reason.items())
        raise InputError(f"refusing to publish {reasons}; nothing was uploaded (--force publishes unverified artifacts)")
    return arts
