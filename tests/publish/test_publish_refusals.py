"""Every way `awqconv publish` refuses: one `error:` line, exit 1 (2 for a bad option), and nothing
created, uploaded or committed on the STAND-IN Hub these tests run (tests/publish/hub_standin.py):
no token, a rejected token, someone else's namespace, a 403 from the server, card metadata the
server rejects, the network down, an unverified, failed or modified artifact, an empty OUT. --force is the explicit override."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.publish.hub_standin import Repo
from tests.publish.util import copy_out, one_error_line, run, tamper


def _nothing_published(hub) -> None:
    st = hub.state
    assert st.repos == {} and st.lfs == {} and st.commits == [] and st.collections == {}
    assert st.writes() == []


def test_no_token(verified_out: Path, hub, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    r = run("publish", verified_out, "--repo", "alice/Tiny")
    assert r.exit_code == 1
    assert "no Hugging Face token" in one_error_line(r)
    _nothing_published(hub)


def test_rejected_token(verified_out: Path, hub, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "tok-expired")
    r = run("publish", verified_out, "--repo", "alice/Tiny")
    assert r.exit_code == 1
    assert "refused the token (401" in one_error_line(r)
    _nothing_published(hub)


def test_read_only_token(verified_out: Path, hub, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "tok-alice-read")
    r = run("publish", verified_out, "--repo", "alice/Tiny")
    assert r.exit_code == 1
    assert "read-only" in one_error_line(r)
    _nothing_published(hub)


def test_someone_elses_repo(verified_out: Path, hub) -> None:
    hub.state.repos["bob/Tiny-AWQ"] = Repo("bob", private=False)  # bob's, public
    hub.state.new_commit(hub.state.repos["bob/Tiny-AWQ"], "main", {})
    r = run("publish", verified_out, "--repo", "bob/Tiny")
    assert r.exit_code == 1
    line = one_error_line(r)
    assert "bob belongs to someone else" in line and "alice" in line
    assert list(hub.state.repos) == ["bob/Tiny-AWQ"] and hub.state.writes() == []


def test_server_403_leaves_nothing(verified_out: Path, hub) -> None:
    # alice is a member of read-org with the read role: the server refuses with 403
    r = run("publish", verified_out, "--repo", "read-org/Tiny")
    assert r.exit_code == 1
    line = one_error_line(r)
    assert "403 Forbidden" in line and "read-org/Tiny" in line
    assert hub.state.repos == {} and hub.state.lfs == {} and hub.state.commits == []


def test_card_metadata_the_hub_rejects(verified_out: Path, hub) -> None:
    r = run("publish", verified_out, "--repo", "alice/Tiny", "--license", "not-a-license")
    assert r.exit_code == 1
    line = one_error_line(r)
    assert "rejects the card metadata of alice/" in line and '"license" must be one of' in line
    _nothing_published(hub)


def test_network_down(verified_out: Path, hub, monkeypatch) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    r = run("publish", verified_out, "--repo", "alice/Tiny")
    assert r.exit_code == 1
    assert f"cannot reach the Hub at http://127.0.0.1:{port}" in one_error_line(r)
    _nothing_published(hub)


def test_unverified_artifact(verified_out: Path, hub, tmp_path: Path) -> None:
    out = copy_out(verified_out, tmp_path / "out")
    (out / "verify.json").unlink()
    r = run("publish", out, "--repo", "alice/Tiny")
    assert r.exit_code == 1
    line = one_error_line(r)
    assert "never verified" in line and "awqconv verify" in line and "nothing was uploaded" in line
    _nothing_published(hub)


def test_modified_artifact(verified_out: Path, hub, tmp_path: Path) -> None:
    out = copy_out(verified_out, tmp_path / "out")
    tamper(out / "hf-awq" / "model.safetensors")
    r = run("publish", out, "--repo", "alice/Tiny")
    assert r.exit_code == 1
    line = one_error_line(r)
    assert "hf-awq: changed since verification: model.safetensors does not match" in line
    _nothing_published(hub)


def test_re_exported_artifact_needs_a_new_verify(verified_out: Path, hub, tmp_path: Path) -> None:
    out = copy_out(verified_out, tmp_path / "out")
    m = json.loads((out / "gguf" / "awqconv-manifest.json").read_text())
    m["created"] = "2030-01-01T00:00:00+0000"  # a later export: same files, another manifest
    (out / "gguf" / "awqconv-manifest.json").unlink()
    (out / "gguf" / "awqconv-manifest.json").write_text(json.dumps(m))
    r = run("publish", out, "--repo", "alice/Tiny")
    assert r.exit_code == 1
    assert "gguf: changed since verification" in one_error_line(r)
    _nothing_published(hub)


def test_failed_verification(verified_out: Path, hub, tmp_path: Path) -> None:
    out = copy_out(verified_out, tmp_path / "out")
    rec = json.loads((out / "verify.json").read_text())
    for a in rec["artifacts"]:
        if a["name"] == "canonical":
            a["ok"] = False
    for row in rec["rows"]:
        if row["artifact"] == "canonical" and row["check"] == "perplexity":
            row["ok"] = False
    (out / "verify.json").unlink()
    (out / "verify.json").write_text(json.dumps(rec))
    r = run("publish", out, "--repo", "alice/Tiny")
    assert r.exit_code == 1
    line = one_error_line(r)
    assert "canonical: failed verification: check 'perplexity' failed" in line
    assert "which failed verification" in line  # artifacts whose runtime checks were canonical's
    _nothing_published(hub)


def test_empty_out(hub, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    r = run("publish", tmp_path / "out", "--repo", "alice/Tiny")
    assert r.exit_code == 1
    assert "holds no awqconv artifact" in one_error_line(r)
    r = run("publish", tmp_path / "missing", "--repo", "alice/Tiny")
    assert r.exit_code == 1 and "does not exist" in one_error_line(r)
    _nothing_published(hub)


@pytest.mark.parametrize("args, words", [
    (["--repo", "no-namespace"], "NAMESPACE/NAME"),
    (["--repo", "alice/bad--name"], "not a valid Hub name"),
    (["--repo", "alice/Tiny", "--only", "nope"], "--only: nope not in"),
    (["--repo", "alice/Tiny", "--name-template", "gguf"], "LABEL=TEMPLATE"),
    (["--repo", "alice/Tiny", "--name-template", "gguf={nam}-GGUF"], "--name-template"),
    (["--repo", "alice/Tiny", "--name-template", "gguf=x", "--name-template", "hf-awq=x"], "two artifacts would go to"),
    (["--repo", "alice/Tiny", "--overwrite"], "--local-dir only"),
])
def test_bad_options_exit_2(verified_out: Path, hub, args: list[str], words: str) -> None:
    r = run("publish", verified_out, *args)
    assert r.exit_code == 2, r.output
    assert words in one_error_line(r)
    _nothing_published(hub)


def test_force_publishes_unverified_and_says_so(verified_out: Path, hub, tmp_path: Path) -> None:
    out = copy_out(verified_out, tmp_path / "out")
    (out / "verify.json").unlink()
    r = run("publish", out, "--repo", "alice/Tiny", "--only", "gguf", "--force", "-q")
    assert r.exit_code == 0, r.output
    assert "WARNING gguf: never verified" in r.stdout
    files = hub.state.files("alice/Tiny-GGUF")
    assert "**Not verified.**" in files["README.md"].decode()
    assert json.loads(files["awqconv-manifest.json"])["verify"]["published_unverified"].startswith("never verified")
