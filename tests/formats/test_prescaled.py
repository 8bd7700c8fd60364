"""The AWQ-prescaled float weights: stored in the canonical artifact only when asked
(``keep_prescaled`` / ``quantize --keep-prescaled``), handed in memory to a same-run re-quantizing
GGUF target, and replaced (with a log line saying so) by the dequantized integers otherwise.

Like test_gguf.py's ``test_f32_gguf_matches_prescaled_model_in_llama_cpp`` and
``test_missing_prescaled_falls_back_and_reports``, the GGUF file's ``awqconv.weights_source`` and
its tensor bytes tell which weights a re-quantizing variant used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from awqconv import api
from awqconv.formats import canonical, needs_prescaled, parse_targets, read_artifact
from awqconv.formats.gguf_read import GGUFFile

TINY = "LlamaForCausalLM"


def _gguf(directory: Path) -> GGUFFile:
    (f,) = sorted(directory.glob("*.gguf"))
    return GGUFFile(f)


def _tensor_bytes(g: GGUFFile) -> dict[str, bytes]:
    return {n: np.asarray(g.data(n)).tobytes() for n in g.tensors}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One RTN quantization of a tiny Llama per setting, with a same-run gguf:q4_0 target."""
    from tests.tiny_models import tiny_model_dir

    src = tiny_model_dir(TINY)
    root = tmp_path_factory.mktemp("prescaled")
    out = {}
    for label, keep in (("default", False), ("kept", True)):
        res = api.convert(src, ["canonical", "gguf:q4_0"], root / label, method="rtn", group_size=32,
                          progress=False, keep_prescaled=keep)
        out[label] = res.out_dir
    return out


def test_default_canonical_artifact_has_no_prescaled_file(runs):
    c = runs["default"] / "canonical"
    assert not list(c.glob("prescaled*"))
    assert json.loads((c / canonical.MANIFEST).read_text())["prescaled"] is False
    qm, fmt = read_artifact(c)
    assert fmt == "canonical" and qm.prescaled is None and not qm.keep_prescaled


def test_keep_prescaled_stores_them(runs):
    c = runs["kept"] / "canonical"
    assert [p.name for p in c.glob("prescaled*")] == ["prescaled.safetensors"]
    assert json.loads((c / canonical.MANIFEST).read_text())["prescaled"] is True
    qm, _ = read_artifact(c)
    assert qm.prescaled is not None and set(qm.prescaled) == set(qm.linears)
    assert qm.keep_prescaled  # a canonical re-export keeps what the artifact stored


def test_the_option_changes_nothing_else(runs):
    """Same integers, same same-run GGUF: the flag only adds the prescaled file."""
    a, b = runs["default"], runs["kept"]
    for name in ("model.safetensors", "search.safetensors", "config.json"):
        assert (a / "canonical" / name).read_bytes() == (b / "canonical" / name).read_bytes(), name
    assert _tensor_bytes(_gguf(a / "gguf-q4_0")) == _tensor_bytes(_gguf(b / "gguf-q4_0"))


def test_same_run_gguf_uses_prescaled_weights_without_storing_them(runs):
    g = _gguf(runs["default"] / "gguf-q4_0")
    assert g.fields["awqconv.weights_source"] == "prescaled"


def test_export_without_prescaled_falls_back_and_says_so(runs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="awqconv.formats.gguf"):
        api.export(runs["default"] / "canonical", "gguf:q4_0", tmp_path / "x")
    g = _gguf(tmp_path / "x" / "gguf-q4_0")
    assert g.fields["awqconv.weights_source"] == "dequantized canonical"
    assert "prescaled" in caplog.text and "--keep-prescaled" in caplog.text
    # the dequantized integers are not the prescaled floats: the linears differ from the same-run file
    same_run = _tensor_bytes(_gguf(runs["default"] / "gguf-q4_0"))
    assert _tensor_bytes(g) != same_run


def test_export_with_stored_prescaled_matches_the_same_run_file(runs, tmp_path):
    api.export(runs["kept"] / "canonical", "gguf:q4_0", tmp_path / "y")
    g = _gguf(tmp_path / "y" / "gguf-q4_0")
    assert g.fields["awqconv.weights_source"] == "prescaled"
    assert _tensor_bytes(g) == _tensor_bytes(_gguf(runs["kept"] / "gguf-q4_0"))


def test_writer_honours_the_flag(tiny_qm, tmp_path):
    pre = {n: torch.randn(p.out_features, p.in_features) for n, p in tiny_qm.linears.items()}
    for keep in (False, True):
        out = tmp_path / str(keep)
        out.mkdir()
        qm = dataclasses.replace(tiny_qm, prescaled=pre, keep_prescaled=keep)
        canonical.write(qm, out)
        assert bool(list(out.glob("prescaled*"))) is keep


def test_which_targets_need_prescaled_weights():
    assert not needs_prescaled(parse_targets("canonical,hf-awq,exllamav2,peft,gguf"))
    assert not needs_prescaled(parse_targets("gguf:q4_1-awq"))
    assert needs_prescaled(parse_targets("canonical,gguf:q4_0"))
    assert needs_prescaled(parse_targets("gguf:f16"))
