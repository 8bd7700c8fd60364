"""Every user-facing error through the CLI: one clear line, exit 1 (2 for usage), nothing written."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from awqconv.cli import main
from awqconv.formats import get_format
from tests.tiny_models import tiny_model_dir

TINY = "LlamaForCausalLM"
FAST = ["--method", "rtn", "-g", "32", "-q"]


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _one_error_line(result) -> str:
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir(TINY), dst)
    return dst


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(".awqconv-")], list(parent.iterdir())


def test_missing_model_path(tmp_path: Path) -> None:
    r = _run("quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "out"), *FAST)
    assert r.exit_code == 1
    assert "does not exist" in _one_error_line(r) or "not found" in _one_error_line(r)
    _no_leftovers(tmp_path, "out")


def test_not_a_causal_lm(tmp_path: Path) -> None:
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    r = _run("quantize", str(d), "-o", str(tmp_path / "out"), *FAST)
    assert r.exit_code == 1
    assert "not a causal language model" in _one_error_line(r)


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    d = tmp_path / "neox"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}))
    r = _run("quantize", str(d), "-o", str(tmp_path / "out"), *FAST)
    assert r.exit_code == 1
    line = _one_error_line(r)
    assert "GPTNeoXForCausalLM is not supported" in line and "LlamaForCausalLM" in line and "Qwen3MoeForCausalLM" in line


def test_group_size_that_does_not_divide_names_the_ones_that_do(tiny: Path, tmp_path: Path) -> None:
    r = _run("quantize", str(tiny), "-o", str(tmp_path / "out"), "--method", "rtn", "-g", "96")
    assert r.exit_code == 1
    line = _one_error_line(r)
    assert "not a multiple of group_size=96" in line and "32, 64, 128" in line


def test_nan_weights_are_refused(tiny: Path, tmp_path: Path) -> None:
    f = tiny / "model.safetensors"
    sd = load_file(f)
    key = "model.layers.1.mlp.up_proj.weight"
    sd[key][3, 5] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    r = _run("quantize", str(tiny), "-o", str(tmp_path / "out"), *FAST)
    assert r.exit_code == 1
    assert key in _one_error_line(r) and "NaN" in _one_error_line(r)
    _no_leftovers(tmp_path, "out")


def test_non_empty_output_needs_overwrite(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run("quantize", str(tiny), "-o", str(out), *FAST, "--to", "canonical").exit_code == 0
    r = _run("quantize", str(tiny), "-o", str(out), *FAST, "--to", "hf-awq")
    assert r.exit_code == 1
    assert "--overwrite" in _one_error_line(r)
    assert (out / "canonical" / "awqconv.json").exists()
    r = _run("quantize", str(tiny), "-o", str(out), *FAST, "--overwrite", "--to", "hf-awq")
    assert r.exit_code == 0, r.output
    assert not (out / "canonical").exists() and (out / "hf-awq" / "config.json").exists()


def test_overwrite_never_replaces_a_directory_awqconv_did_not_write(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    for extra in ((), ("--overwrite",)):
        r = _run("quantize", str(tiny), "-o", str(out), *FAST, *extra)
        assert r.exit_code == 1
        line = _one_error_line(r)
        assert "not written by awqconv" in line and "--overwrite" not in line.split(";")[-1]
        assert (out / "keep.txt").read_text() == "user data"


def test_truncated_safetensors_source(tiny: Path, tmp_path: Path) -> None:
    f = tiny / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    r = _run("quantize", str(tiny), "-o", str(tmp_path / "out"), *FAST)
    assert r.exit_code == 1
    line = _one_error_line(r)
    assert "model.safetensors" in line and ("truncated" in line or "corrupt" in line or "readable" in line)


def test_truncated_artifact_on_export(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run("quantize", str(tiny), "-o", str(out), *FAST, "--to", "canonical").exit_code == 0
    shard = next((out / "canonical").glob("model*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    r = _run("export", str(out / "canonical"), "--to", "hf-awq", "-o", str(tmp_path / "out2"))
    assert r.exit_code == 1
    assert shard.name in _one_error_line(r)
    _no_leftovers(tmp_path, "out2")


def test_pickled_bin_is_loaded_weights_only(tiny: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    sd = load_file(tiny / "model.safetensors")
    (tiny / "model.safetensors").unlink()
    with open(tiny / "pytorch_model.bin", "wb") as fh:
        pickle.dump({**sd, "evil": Evil()}, fh)
    r = _run("quantize", str(tiny), "-o", str(tmp_path / "out"), *FAST)
    assert r.exit_code == 1
    assert not marker.exists(), "the pickle's payload ran"
    _one_error_line(r)


def test_usage_errors_exit_2(tiny: Path, tmp_path: Path) -> None:
    assert _run("quantize", str(tiny), "-o", str(tmp_path / "o"), "--w-bit", "9").exit_code == 2
    assert _run("quantize", str(tiny)).exit_code == 2  # -o is required
    assert _run("quantize", str(tiny), "-o", str(tmp_path / "o"), "--search-tokens", "lots").exit_code == 2


def test_hf_awq_refuses_other_bit_widths_before_work(tiny: Path, tmp_path: Path) -> None:
    r = _run("quantize", str(tiny), "-o", str(tmp_path / "out"), *FAST, "--w-bit", "3", "--to", "hf-awq")
    assert r.exit_code == 1
    assert "4-bit" in _one_error_line(r)


def test_unknown_format(tiny: Path, tmp_path: Path) -> None:
    r = _run("quantize", str(tiny), "-o", str(tmp_path / "out"), *FAST, "--to", "onnx")
    assert r.exit_code == 2
    assert "unknown format 'onnx'" in _one_error_line(r)


def test_dry_run_prints_the_plan_and_writes_nothing(tiny: Path, tmp_path: Path) -> None:
    r = _run("quantize", str(tiny), "-o", str(tmp_path / "out"), "-g", "64", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "14 linears" in r.stdout and "AWQ w4 group 64" in r.stdout and "dry run" in r.stdout
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_nothing(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    from awqconv.errors import FormatConstraintError

    mod = get_format("hf-awq")

    def boom(qm, out_dir, variant):
        (out_dir / "partial.safetensors").write_bytes(b"half")
        raise FormatConstraintError("simulated failure while writing")

    monkeypatch.setattr(mod, "write", boom)
    r = _run("quantize", str(tiny), "-o", str(tmp_path / "out"), *FAST, "--to", "canonical,hf-awq")
    assert r.exit_code == 1
    _no_leftovers(tmp_path, "out")


def test_quantize_export_eval_round_trip(tiny: Path, tmp_path: Path) -> None:
    out, out2 = tmp_path / "out", tmp_path / "out2"
    r = _run("quantize", str(tiny), "-o", str(out), "-g", "32", "-q", "--calib-samples", "4",
             "--calib-seq-len", "64", "--search-tokens", "128", "--to", "canonical,hf-awq")
    assert r.exit_code == 0, r.output
    assert "canonical" in r.stdout and "hf-awq" in r.stdout
    r = _run("export", str(out / "canonical"), "--to", "hf-awq", "-o", str(out2))
    assert r.exit_code == 0, r.output
    a = load_file(out / "hf-awq" / "model.safetensors")
    b = load_file(out2 / "hf-awq" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # no re-quantization
    text = tmp_path / "held.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    r = _run("eval", str(out / "hf-awq"), "--text", str(text), "--seq-len", "64", "--max-windows", "2")
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.stdout
