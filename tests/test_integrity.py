"""Integrity recorded at write time and checked on every read: each corruption makes ``verify`` and
``export`` fail, naming the artifact and the file that is actually wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from awqconv.cli import main
from awqconv.formats.integrity import MANIFEST, check, record
from tests.tiny_models import tiny_model_dir

FAST = ["--method", "rtn", "-g", "32", "-q"]


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _error(result) -> str:
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    src = root / "tiny"
    shutil.copytree(tiny_model_dir("LlamaForCausalLM"), src)
    out = root / "out"
    r = _run("quantize", str(src), "-o", str(out), *FAST, "--to", "canonical,hf-awq,gguf")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def out(pristine: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "out"
    shutil.copytree(pristine, dst)
    return dst


def _shard(art: Path) -> Path:
    return next(art.glob("model*.safetensors"))


def _flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-7] ^= 0x10  # inside the tensor data, past the header
    f.write_bytes(bytes(data))


def test_every_artifact_records_its_files(pristine: Path) -> None:
    for art in ("canonical", "hf-awq", "gguf"):
        m = json.loads((pristine / art / MANIFEST).read_text())
        assert m["artifact_format"] == art and m["quantization"]["group_size"] == 32
        names = {e["path"] for e in m["files"]}
        on_disk = {p.relative_to(pristine / art).as_posix() for p in (pristine / art).rglob("*") if p.is_file()}
        assert names == on_disk - {MANIFEST}
        assert check(pristine / art) is not None


# (artifact, what is done to it, file the message must name)
def _corrupt_weight(out: Path, art: str) -> str:
    f = _shard(out / art)
    _flip_byte(f)
    return f.name


def _truncate(out: Path, art: str) -> str:
    f = _shard(out / art)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f.name


def _delete_gguf(out: Path, art: str) -> str:
    f = next((out / art).glob("*.gguf"))
    f.unlink()
    return f.name


def _bad_json(out: Path, art: str) -> str:
    name = "awqconv.json" if art == "canonical" else "config.json"
    (out / art / name).write_text("{not json")
    return name


CORRUPTIONS = [
    ("canonical", _corrupt_weight),
    ("hf-awq", _corrupt_weight),
    ("hf-awq", _truncate),
    ("gguf", _delete_gguf),
    ("hf-awq", _bad_json),
    ("canonical", _bad_json),
]


@pytest.mark.parametrize(("art", "corrupt"), CORRUPTIONS, ids=[f"{a}-{f.__name__[1:]}" for a, f in CORRUPTIONS])
def test_corruption_fails_verify_and_export_naming_artifact_and_file(out: Path, tmp_path: Path, art, corrupt) -> None:
    fname = corrupt(out, art)
    r = _run("verify", str(out), "--no-bench")
    assert r.exit_code == 1
    failed = [l for l in r.stdout.splitlines() if " FAIL " in f" {l} "]
    assert failed and all(l.split()[0] == art for l in failed), r.stdout  # only the damaged one is blamed
    assert any(fname in l for l in failed), r.stdout
    if art != "gguf":
        r = _run("export", str(out / art), "--to", "exllamav2", "-o", str(tmp_path / "re"))
        assert r.exit_code == 1
        assert fname in _error(r)
        assert not (tmp_path / "re").exists()
    r = _run("verify", str(out / art), "--no-bench")  # the artifact alone fails as well
    assert r.exit_code == 1


def test_added_weight_file_is_named(out: Path) -> None:
    shutil.copy(_shard(out / "canonical"), out / "canonical" / "model-extra.safetensors")
    r = _run("export", str(out / "canonical"), "--to", "hf-awq", "-o", str(out.parent / "re"))
    assert r.exit_code == 1 and "model-extra.safetensors" in _error(r) and "not listed" in _error(r)


def test_a_whole_artifact_missing_from_the_output_fails_verify(out: Path) -> None:
    shutil.rmtree(out / "gguf")
    r = _run("verify", str(out), "--no-bench")
    assert r.exit_code == 1
    assert any(l.startswith("gguf") and "FAIL" in l for l in r.stdout.splitlines()), r.stdout


def _rerecord(art_dir: Path, fmt: str) -> None:
    """Re-hash after tampering: a manifest that was wrong when written (another tool, an old bug)."""
    record(art_dir, fmt, {}, {})


def test_wrong_typed_manifest_field_is_refused(out: Path) -> None:
    art = out / "canonical"
    m = json.loads((art / "awqconv.json").read_text())
    m["quant_config"]["zero_point"] = "false"  # a string: bool("false") is True
    (art / "awqconv.json").write_text(json.dumps(m))
    _rerecord(art, "canonical")
    r = _run("export", str(art), "--to", "hf-awq", "-o", str(out.parent / "re"))
    assert r.exit_code == 1
    assert "zero_point" in _error(r) and "wrong type" in _error(r)


def test_nan_scale_and_inf_dense_tensor_are_refused(out: Path) -> None:
    art = out / "canonical"
    f = _shard(art)
    sd = load_file(f)
    key = next(k for k in sd if k.endswith(".scales"))
    sd[key][0, 0] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    _rerecord(art, "canonical")
    r = _run("export", str(art), "--to", "hf-awq", "-o", str(out.parent / "re"))
    assert r.exit_code == 1 and "NaN" in _error(r) and key.removesuffix(".scales") in _error(r)
    r = _run("verify", str(art), "--no-bench")
    assert r.exit_code == 1 and "NaN" in r.stdout

    sd[key][0, 0] = 1e-3
    emb = next(k for k in sd if "embed_tokens" in k)
    sd[emb][1, 1] = float("inf")
    save_file(sd, f, metadata={"format": "pt"})
    _rerecord(art, "canonical")
    r = _run("export", str(art), "--to", "hf-awq", "-o", str(out.parent / "re"))
    assert r.exit_code == 1 and emb in _error(r) and "NaN/inf" in _error(r)


def test_corrupt_config_json_is_named_not_called_foreign(out: Path) -> None:
    (out / "hf-awq" / "config.json").write_text("{")
    r = _run("export", str(out / "hf-awq"), "--to", "canonical", "-o", str(out.parent / "re"))
    assert r.exit_code == 1
    assert "config.json" in _error(r) and "not an awqconv artifact" not in _error(r)


def test_intact_output_passes_and_verify_json_does_not_break_checksums(pristine: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    shutil.copytree(pristine, out)
    r = _run("verify", str(out / "hf-awq"), "--no-bench")
    assert r.exit_code == 0, r.output
    assert (out / "hf-awq" / "verify.json").is_file()
    assert check(out / "hf-awq") is not None  # verify's own report is not an added file
    report = json.loads((out / "hf-awq" / "verify.json").read_text())
    assert any(row["check"] == "checksums" and row["ok"] for row in report["rows"])
