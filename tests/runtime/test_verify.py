"""verify(): a clean export passes every check; a flipped byte in one artifact makes it fail."""

from __future__ import annotations

import json

import pytest

from awqconv.api import write_artifacts
from awqconv.errors import InputError
from awqconv.formats import parse_targets
from awqconv.runtime.verify import verify


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory, make_tiny_llama_qm):
    d = tmp_path_factory.mktemp("verify") / "out"
    write_artifacts(make_tiny_llama_qm(), parse_targets("canonical,hf-awq"), d)
    return d


def test_clean_export_passes(out_dir, tmp_path):
    rep = verify(out_dir, device="cpu", max_new_tokens=8, recheck_identical=True)
    assert rep.ok, rep.table()
    assert {a["format"] for a in rep.artifacts} == {"canonical", "hf-awq"}
    checks = {(r.artifact, r.check): r for r in rep.rows}
    assert checks[("hf-awq", "bit-exact linears")].ok is True
    assert checks[("hf-awq", "greedy vs reference")].ok is True
    assert checks[("canonical", "logits vs reference")].ok is True
    rep.write(tmp_path / "verify.json")
    saved = json.loads((tmp_path / "verify.json").read_text())
    assert saved["ok"] is True and len(saved["rows"]) == len(rep.rows)
    assert "PASS" in rep.table()


def test_tampered_artifact_fails(out_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from awqconv.formats.integrity import record

    bad = tmp_path / "out"
    shutil.copytree(out_dir, bad)
    f = next((bad / "hf-awq").glob("*.safetensors"))
    t = load_file(f)
    key = next(k for k in t if k.endswith("qweight"))
    t[key] = t[key].clone()
    t[key].view(-1)[0] ^= 0x11  # two nibbles change, still a valid checkpoint
    save_file(t, f, metadata={"format": "pt"})
    rep = verify(bad, device="cpu", max_new_tokens=4, bench=False)
    assert not rep.ok
    failed = [(r.artifact, r.check) for r in rep.rows if r.ok is False]
    assert failed == [("hf-awq", "checksums")]  # the recorded sha256 catches it before any reading
    # re-recorded checksums (a tool that wrote wrong integers to begin with): the comparison with
    # the canonical artifact still catches it
    record(bad / "hf-awq", "hf-awq", {}, {})
    rep = verify(bad, device="cpu", max_new_tokens=4, bench=False)
    failed = [(r.artifact, r.check) for r in rep.rows if r.ok is False]
    assert ("hf-awq", "bit-exact linears") in failed
    assert all(a == "hf-awq" for a, _ in failed)


def test_no_artifact_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no awqconv artifact"):
        verify(tmp_path, device="cpu")


def test_identical_artifacts_reuse_canonical_checks(out_dir):
    rep = verify(out_dir, device="cpu", max_new_tokens=4, bench=False, threads=1)
    assert rep.ok
    rows = {(r.artifact, r.check): r for r in rep.rows}
    assert rows[("hf-awq", "runtime checks")].value == "same as canonical"
    assert ("hf-awq", "greedy vs reference") not in rows and rows[("canonical", "greedy vs reference")].ok
