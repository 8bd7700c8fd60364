"""`awqconv publish --local-dir DIR` (no network), checked by a reader written here from the Hub's
and awqconv's documented formats only, without awqconv's code: each folder's README.md front matter
parsed with yaml, each file's sha256 recomputed against the folder's awqconv-manifest.json, and a
tampered artifact refused with nothing written."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml

from tests.publish.util import copy_out, one_error_line, run, tamper

LIBRARY = {"hf-awq": "transformers", "gguf": "gguf", "exllamav2": "transformers", "peft": "transformers"}


def read_folder(folder: Path) -> tuple[dict, dict, dict[str, str]]:
    """(card metadata, manifest, {path: sha256 recomputed}) of one target folder."""
    card = (folder / "README.md").read_text(encoding="utf-8")
    m = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert m, f"{folder}: README.md has no YAML front matter"
    meta = yaml.safe_load(m.group(1))
    manifest = json.loads((folder / "awqconv-manifest.json").read_text())
    hashes = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in folder.rglob("*") if p.is_file() and p.name != "awqconv-manifest.json"}
    return meta, manifest, hashes


def test_local_dir_layout_read_independently(verified_out: Path, tmp_path: Path) -> None:
    ld = tmp_path / "upload"
    r = run("publish", verified_out, "--repo", "me/SmolTiny", "--local-dir", ld, "--base-model", "org/base",
            "--license", "apache-2.0")
    assert r.exit_code == 0, r.output
    index = json.loads((ld / "awqconv-publish.json").read_text())
    folders = {t["folder"]: t for t in index["targets"]}
    assert set(folders) == {"SmolTiny-AWQ", "SmolTiny-GGUF", "SmolTiny-GPTQ", "SmolTiny-AWQ-PEFT", "SmolTiny-AWQ-canonical"}
    for name, t in folders.items():
        meta, manifest, hashes = read_folder(ld / name)
        fmt = manifest["artifact_format"]
        assert t["repo"] == f"me/{name}" and t["artifact"] == fmt
        assert meta["base_model"] == "org/base" and meta["base_model_relation"] == "quantized"
        assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
        assert meta["quantized_by"] == "me" and "awq" in meta["tags"]
        assert meta.get("library_name") == LIBRARY.get(fmt)
        # the manifest lists exactly the folder's files, with their true sha256
        assert {e["path"]: e["sha256"] for e in manifest["files"]} == hashes
        assert all(e["size"] == (ld / name / e["path"]).stat().st_size for e in manifest["files"])
        # and the artifact's own files are the verified bytes
        art = json.loads((verified_out / fmt / "awqconv-manifest.json").read_text())
        for e in art["files"]:
            if e["path"] != "README.md":
                assert hashes[e["path"]] == e["sha256"], (name, e["path"])
        v = manifest["verify"]
        assert v["ok"] is True and v["machine"]["cpu"] and any(r["check"] == "perplexity" for r in v["rows"])
        assert manifest["quantization"]["w_bit"] == 4 and manifest["source"]["model"]
        card = (ld / name / "README.md").read_text()
        for section in ("## Quantization", "## Verification", "## Files", "## Usage"):
            assert section in card, (name, section)
        assert "tok/s" in card and "perplexity" in card
        assert ("bit-identical to the canonical integers" in card) == (fmt != "canonical")


def test_branches_local_dir_has_an_index_card(verified_out: Path, tmp_path: Path) -> None:
    ld = tmp_path / "upload"
    assert run("publish", verified_out, "--repo", "me/Tiny", "--layout", "branches", "--local-dir", ld).exit_code == 0
    index = json.loads((ld / "awqconv-publish.json").read_text())
    assert {t["revision"] for t in index["targets"]} == {"main", "canonical", "hf-awq", "gguf", "exllamav2", "peft"}
    assert all(t["repo"] == "me/Tiny" for t in index["targets"])
    main_card = (ld / "Tiny@main" / "README.md").read_text()
    assert yaml.safe_load(main_card.split("---\n")[1])["pipeline_tag"] == "text-generation"
    assert 'revision="gguf"' in main_card and "MiB" in main_card
    assert sorted(p.name for p in (ld / "Tiny@main").iterdir()) == ["README.md"]


def test_tampered_artifact_is_refused_and_nothing_written(verified_out: Path, tmp_path: Path) -> None:
    out = copy_out(verified_out, tmp_path / "out")
    tamper(out / "gguf" / next(p.name for p in (out / "gguf").glob("*.gguf")))
    r = run("publish", out, "--repo", "me/Tiny", "--local-dir", tmp_path / "upload")
    assert r.exit_code == 1
    assert "gguf: changed since verification" in one_error_line(r)
    assert not (tmp_path / "upload").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".awqconv-")]


def test_local_dir_needs_overwrite_and_never_overlaps_out(verified_out: Path, tmp_path: Path) -> None:
    ld = tmp_path / "upload"
    assert run("publish", verified_out, "--repo", "me/Tiny", "--only", "gguf", "--local-dir", ld).exit_code == 0
    again = run("publish", verified_out, "--repo", "me/Tiny", "--only", "gguf", "--local-dir", ld)
    assert again.exit_code == 1 and "--overwrite" in one_error_line(again)
    assert run("publish", verified_out, "--repo", "me/Tiny", "--only", "gguf", "--local-dir", ld, "--overwrite").exit_code == 0
    inside = run("publish", verified_out, "--repo", "me/Tiny", "--local-dir", verified_out / "upload")
    assert inside.exit_code == 1 and "never writes over its inputs" in one_error_line(inside)


def test_one_artifact_directory_verified_through_its_parent(verified_out: Path, tmp_path: Path) -> None:
    r = run("publish", verified_out / "gguf", "--repo", "me/Tiny", "--local-dir", tmp_path / "upload")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "upload").iterdir()) == ["Tiny-GGUF", "awqconv-output.json",
                                                                       "awqconv-publish.json"]
