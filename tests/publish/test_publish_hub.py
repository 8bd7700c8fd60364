"""`awqconv publish` through the real huggingface_hub client, against a STAND-IN for the Hub (a
local HTTP server these tests start and stop, tests/publish/hub_standin.py), never the Hub itself:
what arrives is byte-identical to the artifacts, a second run sends nothing, an interrupted upload
completes on a re-run, and the branches layout, --revision, --private and --collection work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import hf_hub_download

from awqconv.formats.integrity import MANIFEST, sha256_file
from tests.publish.util import TOKEN, run

REPOS = {"canonical": "alice/Tiny-AWQ-canonical", "hf-awq": "alice/Tiny-AWQ", "gguf": "alice/Tiny-GGUF",
         "exllamav2": "alice/Tiny-GPTQ", "peft": "alice/Tiny-AWQ-PEFT"}
ROOT = Path(__file__).resolve().parents[2]


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def _artifact_files(art: Path) -> dict[str, bytes]:
    m = json.loads((art / MANIFEST).read_text())
    return {e["path"]: (art / e["path"]).read_bytes() for e in m["files"]}


def _download(hub, repo: str, path: str, tmp: Path, revision: str = "main") -> bytes:
    p = hf_hub_download(repo, path, revision=revision, cache_dir=tmp / "dl", endpoint=hub.url, token=TOKEN)
    return Path(p).read_bytes()


def test_what_arrives_is_the_artifacts_and_a_second_run_sends_nothing(verified_out: Path, hub, tmp_path: Path) -> None:
    r = run("publish", verified_out, "--repo", "alice/Tiny", "--base-model", "test-org/tiny-llama",
            "--license", "apache-2.0", "-q", "--json", tmp_path / "pub.json")
    assert r.exit_code == 0, r.output
    st = hub.state
    assert sorted(st.repos) == sorted(REPOS.values())
    assert len(st.commits) == len(REPOS)  # one commit per repo
    for label, repo in REPOS.items():
        art = verified_out / label
        want = _artifact_files(art)
        remote = st.files(repo)
        assert set(remote) == (set(want) | {"README.md", MANIFEST, ".gitattributes"})
        for path, data in want.items():
            if path != "README.md":  # the publish card replaces an artifact's own README
                assert _download(hub, repo, path, tmp_path) == data, (repo, path)
        manifest = json.loads(_download(hub, repo, MANIFEST, tmp_path))
        assert manifest["artifact_format"] == label and manifest["verify"]["ok"] is True
        for e in manifest["files"]:  # the published manifest describes the published bytes
            assert sha256_file(Path(hf_hub_download(repo, e["path"], cache_dir=tmp_path / "dl", endpoint=hub.url,
                                                    token=TOKEN))) == e["sha256"]
        meta = _front_matter(_download(hub, repo, "README.md", tmp_path).decode())
        assert meta["base_model"] == "test-org/tiny-llama" and meta["base_model_relation"] == "quantized"
        assert meta["license"] == "apache-2.0" and meta["quantized_by"] == "alice"
    report = json.loads((tmp_path / "pub.json").read_text())
    assert {t["repo"] for t in report["targets"]} == set(REPOS.values())
    assert all(t["commit"] for t in report["targets"])

    puts, commits, n_req = sum(st.puts.values()), len(st.commits), len(st.requests)
    again = run("publish", verified_out, "--repo", "alice/Tiny", "--base-model", "test-org/tiny-llama",
                "--license", "apache-2.0", "-q")
    assert again.exit_code == 0, again.output
    assert "nothing sent" in again.stdout
    assert sum(st.puts.values()) == puts and len(st.commits) == commits
    assert [(m, p) for m, p in st.requests[n_req:] if m == "PUT" or "/commit/" in p or "/lfs/" in p] == []
    assert all(n == 1 for n in st.puts.values())  # every LFS object went up once


def test_an_interrupted_upload_completes_on_rerun(verified_out: Path, hub, tmp_path: Path) -> None:
    st = hub.state
    st.hold_after_puts = 1  # the PUT after the first completed one hangs until the client is killed
    env = {**os.environ, "HF_HUB_DISABLE_XET": "1", "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "awqconv.cli", "publish", str(verified_out), "--repo", "alice/Tiny",
                             "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert st.held.wait(180), "the upload never reached the second LFS object"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert st.commits == []  # large files go up before any commit: nothing half-published
    first = dict(st.puts)
    assert first
    st.hold_after_puts = None
    st.release.set()
    r = run("publish", verified_out, "--repo", "alice/Tiny", "-q")
    assert r.exit_code == 0, r.output
    for label, repo in REPOS.items():
        want = _artifact_files(verified_out / label)
        got = st.files(repo)
        assert all(got[p] == d for p, d in want.items() if p != "README.md"), repo
    assert all(st.puts[oid] == 1 for oid in first)  # what the killed run sent was not sent again
    assert all(n == 1 for n in st.puts.values())


def test_branches_layout_one_repo_a_branch_per_format(verified_out: Path, hub, tmp_path: Path) -> None:
    r = run("publish", verified_out, "--repo", "alice/Tiny-AWQ-all", "--layout", "branches", "--private",
            "--collection", "Tiny quants", "-q")
    assert r.exit_code == 0, r.output
    st = hub.state
    repo = st.repos["alice/Tiny-AWQ-all"]
    assert list(st.repos) == ["alice/Tiny-AWQ-all"] and repo.private
    assert set(repo.branches) == {"main", *REPOS}
    index = st.files("alice/Tiny-AWQ-all")["README.md"].decode()
    assert _front_matter(index)["pipeline_tag"] == "text-generation"
    for label in REPOS:
        files = st.files("alice/Tiny-AWQ-all", label)
        assert f"/alice/Tiny-AWQ-all/tree/{label}" in index
        want = _artifact_files(verified_out / label)
        assert all(files[p] == d for p, d in want.items() if p != "README.md"), label
        assert json.loads(files[MANIFEST])["published"]["revision"] == label
    (col,) = st.collections.values()
    assert col["title"] == "Tiny quants" and col["private"] and [i["id"] for i in col["items"]] == ["alice/Tiny-AWQ-all"]
    again = run("publish", verified_out, "--repo", "alice/Tiny-AWQ-all", "--layout", "branches", "--private",
                "--collection", "Tiny quants", "-q")
    assert again.exit_code == 0 and "nothing sent" in again.stdout, again.output
    assert len(col["items"]) == 1


def test_revision_and_only(verified_out: Path, hub, tmp_path: Path) -> None:
    r = run("publish", verified_out, "--repo", "alice/Tiny", "--only", "hf-awq,gguf", "--revision", "v1", "-q")
    assert r.exit_code == 0, r.output
    st = hub.state
    assert sorted(st.repos) == ["alice/Tiny-AWQ", "alice/Tiny-GGUF"]
    for repo in ("alice/Tiny-AWQ", "alice/Tiny-GGUF"):
        assert set(st.repos[repo].branches) == {"main", "v1"}
        assert set(st.files(repo, "main")) == {".gitattributes"}  # main untouched
        assert MANIFEST in st.files(repo, "v1")
    assert 'revision="v1"' in st.files("alice/Tiny-AWQ", "v1")["README.md"].decode()


def test_dry_run_prints_the_plan_and_touches_nothing(verified_out: Path, hub) -> None:
    r = run("publish", verified_out, "--repo", "alice/Tiny", "--dry-run")
    assert r.exit_code == 0, r.output
    for repo in REPOS.values():
        assert f"{repo}@main  create repo" in r.stdout
    assert "model.safetensors" in r.stdout and "MiB" in r.stdout and "dry run" in r.stdout
    assert hub.state.writes() == [] and hub.state.repos == {}


def test_a_changed_card_replaces_only_the_card_and_manifest(verified_out: Path, hub) -> None:
    assert run("publish", verified_out, "--repo", "alice/Tiny", "--only", "gguf", "-q").exit_code == 0
    st = hub.state
    puts = sum(st.puts.values())
    dry = run("publish", verified_out, "--repo", "alice/Tiny", "--only", "gguf", "--license", "mit", "--dry-run")
    assert "replace  README.md" in dry.stdout and "same     " in dry.stdout, dry.output
    r = run("publish", verified_out, "--repo", "alice/Tiny", "--only", "gguf", "--license", "mit", "-q")
    assert r.exit_code == 0, r.output
    assert sum(st.puts.values()) == puts  # the GGUF itself is not sent again
    assert sorted(st.commits[-1][2]) == ["README.md", MANIFEST]
    assert _front_matter(st.files("alice/Tiny-GGUF")["README.md"].decode())["license"] == "mit"


@pytest.mark.parametrize("layout", ["repos", "branches"])
def test_local_dir_is_exactly_what_is_uploaded(verified_out: Path, hub, tmp_path: Path, layout: str) -> None:
    args = ["--repo", "alice/Tiny", "--layout", layout, "-q"]
    assert run("publish", verified_out, *args, "--local-dir", tmp_path / "ld").exit_code == 0
    assert run("publish", verified_out, *args).exit_code == 0
    index = json.loads((tmp_path / "ld" / "awqconv-publish.json").read_text())
    for t in index["targets"]:
        remote = hub.state.files(t["repo"], t["revision"])
        local = {p.relative_to(tmp_path / "ld" / t["folder"]).as_posix(): p.read_bytes()
                 for p in (tmp_path / "ld" / t["folder"]).rglob("*") if p.is_file()}
        assert local == {p: d for p, d in remote.items() if p != ".gitattributes"}, t["folder"]


def test_files_an_earlier_publish_put_there_are_deleted_others_kept(verified_out: Path, hub, tmp_path: Path) -> None:
    from tests.publish.util import copy_out

    old = copy_out(verified_out, tmp_path / "old")
    (old / "gguf" / "notes.txt").write_text("an extra file of an earlier export\n")
    m = json.loads((old / "gguf" / MANIFEST).read_text())
    m["files"].append({"path": "notes.txt", "size": (old / "gguf" / "notes.txt").stat().st_size,
                       "sha256": sha256_file(old / "gguf" / "notes.txt")})
    (old / "gguf" / MANIFEST).unlink()
    (old / "gguf" / MANIFEST).write_text(json.dumps(m))
    assert run("publish", old, "--repo", "alice/Tiny", "--only", "gguf", "--force", "-q").exit_code == 0
    st = hub.state
    assert "notes.txt" in st.files("alice/Tiny-GGUF")
    r = st.repos["alice/Tiny-GGUF"]  # someone adds a file of their own on the Hub
    tree = dict(r.trees[r.branches["main"]])
    from tests.publish.hub_standin import Entry, git_sha1

    tree["USER_NOTES.md"] = Entry(3, git_sha1(b"hi\n"), b"hi\n")
    st.new_commit(r, "main", tree)
    dry = run("publish", verified_out, "--repo", "alice/Tiny", "--only", "gguf", "--dry-run")
    assert "delete   notes.txt" in dry.stdout, dry.output
    assert run("publish", verified_out, "--repo", "alice/Tiny", "--only", "gguf", "-q").exit_code == 0
    files = st.files("alice/Tiny-GGUF")
    assert "notes.txt" not in files and "USER_NOTES.md" in files


def test_verify_records_what_publish_needs(verified_out: Path) -> None:
    rec = json.loads((verified_out / "verify.json").read_text())
    assert rec["created"] and rec["machine"]["cpu"] and rec["machine"]["torch"] and rec["awqconv_version"]
    by = {a["name"]: a for a in rec["artifacts"]}
    for label, a in by.items():
        assert a["ok"] is True
        assert a["manifest_sha256"] == sha256_file(verified_out / label / MANIFEST)
        assert a["files"] == json.loads((verified_out / label / MANIFEST).read_text())["files"]
    assert by["gguf"]["same_as"] == "canonical"
    assert {"ppl", "decode_tok_s"} <= set(rec["metrics"]["canonical"])
