"""Output safety through the CLI: inputs survive every overlapping -o, --overwrite replaces only what
awqconv wrote, one writer per output, dry-run catches what would fail at the end, nothing is left
behind by a failure, a kill or a full disk."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from awqconv.cli import main
from awqconv.outdir import OUTPUT_MARKER, OutputLock, fmt_bytes, lock_path, old_prefix, temp_prefix, work_path
from tests.tiny_models import tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
FAST = ["--method", "rtn", "-g", "32", "-q"]


def _run(*args: str, **kw):
    return CliRunner().invoke(main, list(args), catch_exceptions=False, **kw)


def _one_error_line(result) -> str:
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _strays(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".awqconv-"))


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    dst = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model_dir("LlamaForCausalLM"), dst)
    return dst


@pytest.fixture
def out_ok(tiny: Path, tmp_path: Path) -> Path:
    """An awqconv output with a canonical and an hf-awq artifact."""
    out = tmp_path / "out"
    r = _run("quantize", str(tiny), "-o", str(out), *FAST, "--to", "canonical,hf-awq")
    assert r.exit_code == 0, r.output
    return out


# -- never delete what is not ours ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["model", "parent", "inside"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_quantize_never_writes_over_its_source_model(tiny: Path, where: str, overwrite: bool) -> None:
    before = _tree_digest(tiny.parent)
    out = {"model": tiny, "parent": tiny.parent, "inside": tiny / "awq"}[where]
    r = _run("quantize", str(tiny), "-o", str(out), *FAST, *(["--overwrite"] if overwrite else []))
    assert r.exit_code == 1
    line = _one_error_line(r)
    assert "never writes over its inputs" in line and str(tiny) in line
    assert "--overwrite" not in line
    assert _tree_digest(tiny.parent) == before
    assert _strays(tiny.parent) == [] and _strays(tiny.parent.parent) == []


def test_quantize_never_writes_over_its_calibration_file(tiny: Path, tmp_path: Path) -> None:
    data = tmp_path / "calib" / "text.txt"
    data.parent.mkdir()
    data.write_text("Some calibration text. " * 200)
    r = _run("quantize", str(tiny), "-o", str(data.parent), "-g", "32", "--calib", str(data), "--overwrite")
    assert r.exit_code == 1
    assert "never writes over its inputs" in _one_error_line(r)
    assert data.read_text().startswith("Some calibration text.")


@pytest.mark.parametrize("target", ["artifact", "output", "inside"])
def test_export_never_writes_over_its_input(out_ok: Path, target: str) -> None:
    before = _tree_digest(out_ok)
    art = out_ok / "canonical"
    dest = {"artifact": art, "output": out_ok, "inside": art / "again"}[target]
    r = _run("export", str(art), "--to", "hf-awq", "-o", str(dest), "--overwrite")
    assert r.exit_code == 1
    assert "never writes over its inputs" in _one_error_line(r)
    assert _tree_digest(out_ok) == before


def test_overwrite_refuses_an_awqconv_output_holding_user_files(out_ok: Path, tiny: Path) -> None:
    (out_ok / "notes.txt").write_text("mine")
    r = _run("quantize", str(tiny), "-o", str(out_ok), *FAST, "--overwrite")
    assert r.exit_code == 1
    assert "notes.txt" in _one_error_line(r)
    assert (out_ok / "notes.txt").read_text() == "mine" and (out_ok / "hf-awq").is_dir()


def test_output_marker_lists_what_was_written(out_ok: Path) -> None:
    import json

    marker = json.loads((out_ok / OUTPUT_MARKER).read_text())
    assert marker["format"] == "awqconv-output" and marker["entries"] == ["canonical", "hf-awq"]


# -- one writer per output --------------------------------------------------------------------------


def test_a_held_lock_refuses_a_second_run_at_once_naming_the_holder(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    lock = OutputLock(out.resolve()).acquire()  # a real flock, as a running awqconv holds it
    try:
        t0 = time.monotonic()
        r = _run("quantize", str(tiny), "-o", str(out), *FAST)
        assert time.monotonic() - t0 < 30
        assert r.exit_code == 1
        line = _one_error_line(r)
        assert "being written by another awqconv run" in line and f"pid {os.getpid()}" in line
        r = _run("quantize", str(tiny), "-o", str(out), *FAST, "--dry-run")
        assert r.exit_code == 1 and "another awqconv run" in _one_error_line(r)
    finally:
        lock.release()
    assert not out.exists() and not lock_path(out.resolve()).exists()


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "awqconv.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_two_concurrent_runs_give_one_success_and_one_clear_refusal(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    procs = [_cli("quantize", str(tiny), "-o", str(out), *FAST, "--to", "canonical") for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 1], results
    err = next(e for rc, e in results if rc == 1)
    assert "Traceback" not in err
    assert "another awqconv run" in err or "holds an earlier awqconv output" in err
    assert (out / "canonical" / "awqconv.json").is_file() and _strays(tmp_path) == []


# -- checked up front, so --dry-run reports it ----------------------------------------------------


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}); needs root with CAP_SYS_ADMIN")


def _umount(where: Path) -> None:
    # lazy: a tensor still memory-mapped from a checkpoint file there must not keep it mounted
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_dry_run_catches_a_read_only_parent(tiny: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "ro,size=1m")
    try:
        r = _run("quantize", str(tiny), "-o", str(ro / "out"), *FAST, "--dry-run")
        assert r.exit_code == 1
        assert "read-only file system" in _one_error_line(r)
    finally:
        _umount(ro)


def test_dry_run_catches_a_mount_point_as_output(tiny: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "size=64m")
    try:
        r = _run("quantize", str(tiny), "-o", str(mnt), *FAST, "--dry-run")
        assert r.exit_code == 1
        assert "mount point" in _one_error_line(r)
        r = _run("quantize", str(tiny), "-o", str(mnt / "awq"), *FAST, "--to", "canonical")  # the suggested fix
        assert r.exit_code == 0, r.output
    finally:
        _umount(mnt)


def test_longest_names_work_and_longer_ones_are_caught_by_dry_run(tiny: Path, tmp_path: Path) -> None:
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    r = _run("quantize", str(tiny), "-o", str(tmp_path / ("n" * (limit + 1))), *FAST, "--dry-run")
    assert r.exit_code == 1 and "choose a shorter name" in _one_error_line(r)
    longest = tmp_path / ("n" * limit)  # its temporary and lock siblings have names of fixed length
    r = _run("quantize", str(tiny), "-o", str(longest), *FAST, "--to", "canonical")
    assert r.exit_code == 0, r.output
    assert (longest / "canonical" / "awqconv.json").is_file() and _strays(tmp_path) == []


def test_dry_run_catches_a_missing_or_unknown_device(tiny: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for dev, words in (("cuda", "no CUDA device"), ("meta", "not meta"), ("gpu!", "not a device name")):
        r = _run("quantize", str(tiny), "-o", str(tmp_path / "out"), *FAST, "--device", dev, "--dry-run")
        assert r.exit_code == 2, (dev, r.output)
        assert words in _one_error_line(r)


def test_dry_run_catches_an_output_below_a_file_and_a_symlink_loop(tiny: Path, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    r = _run("quantize", str(tiny), "-o", str(f / "out"), *FAST, "--dry-run")
    assert r.exit_code == 1 and "is a file" in _one_error_line(r)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    r = _run("quantize", str(tiny), "-o", str(loop / "out"), *FAST, "--dry-run")
    assert r.exit_code == 1 and "symlink loop" in _one_error_line(r)
    r = _run("verify", str(loop))
    assert r.exit_code == 1 and "symbolic link loop" in _one_error_line(r)


def test_dry_run_checks_the_calibration_data(tiny: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    r = _run("quantize", str(tiny), "-o", str(tmp_path / "out"), "-g", "32", "--calib", str(short), "--dry-run")
    assert r.exit_code == 1 and "calib" in _one_error_line(r).lower()
    r = _run("quantize", str(tiny), "-o", str(tmp_path / "out"), "-g", "32", "--calib", str(tmp_path / "nope.txt"),
             "--dry-run")
    assert r.exit_code == 1 and "does not exist" in _one_error_line(r)
    r = _run("quantize", str(tiny), "-o", str(tmp_path / "out"), "-g", "32", "--calib-seq-len", "4096", "--dry-run")
    assert r.exit_code == 2 and "context of 2048" in _one_error_line(r)
    assert not (tmp_path / "out").exists()


def test_heads_not_dividing_the_hidden_size_is_one_line(tiny: Path, tmp_path: Path) -> None:
    import json

    cfg = json.loads((tiny / "config.json").read_text())
    cfg.pop("head_dim")
    cfg["num_attention_heads"] = 3
    (tiny / "config.json").write_text(json.dumps(cfg))
    r = _run("quantize", str(tiny), "-o", str(tmp_path / "out"), *FAST, "--dry-run")
    assert r.exit_code == 1 and "not divisible by num_attention_heads=3" in _one_error_line(r)


def test_an_empty_architectures_list_uses_the_model_type(tiny: Path, tmp_path: Path) -> None:
    import json

    cfg = json.loads((tiny / "config.json").read_text())
    cfg["architectures"] = []
    (tiny / "config.json").write_text(json.dumps(cfg))
    r = _run("quantize", str(tiny), "-o", str(tmp_path / "out"), *FAST, "--to", "canonical")
    assert r.exit_code == 0, r.output
    written = json.loads((tmp_path / "out" / "canonical" / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"]


# -- what fails late still fails cleanly ---------------------------------------------------------------


def test_disk_full_while_writing_gives_one_line_and_leaves_nothing_finished(tiny: Path, tmp_path: Path,
                                                                           monkeypatch) -> None:
    from awqconv import api

    small = tmp_path / "small"
    _mount_tmpfs(small, "size=256k")
    try:
        monkeypatch.setattr(api, "estimate_bytes", lambda *a, **k: 0)  # the disk fills up after the plan
        r = _run("quantize", str(tiny), "-o", str(small / "out"), *FAST, "--to", "canonical,hf-awq")
        assert r.exit_code == 1
        assert "disk is full" in _one_error_line(r)
        # no output, no staging directory: only the finished layers' checkpoints, for --resume once
        # there is room (they hold no output marker, so nothing looks finished)
        assert [p.name for p in small.iterdir()] == [work_path(small / "out").name]
        assert not any(p.name == OUTPUT_MARKER for p in small.rglob("*"))
        r = _run("export", str(tiny), "--to", "hf-awq", "-o", str(small / "out"))  # not an artifact
        assert r.exit_code == 1
    finally:
        _umount(small)


def test_export_on_a_full_disk(out_ok: Path, tmp_path: Path, monkeypatch) -> None:
    from awqconv import api

    small = tmp_path / "small"
    _mount_tmpfs(small, "size=256k")
    try:
        monkeypatch.setattr(api, "estimate_bytes", lambda *a, **k: 0)
        r = _run("export", str(out_ok / "canonical"), "--to", "hf-awq,exllamav2", "-o", str(small / "x" / "out"))
        assert r.exit_code == 1
        assert "disk is full" in _one_error_line(r)
        assert list(small.iterdir()) == []  # not even the parent it created
    finally:
        _umount(small)


def test_free_space_is_checked_up_front_in_readable_units(tiny: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    _mount_tmpfs(small, "size=20m")
    try:
        big = small / "filler"
        with open(big, "wb") as fh:
            fh.truncate(0)
            fh.write(b"\0" * (20 * 2**20 - 64 * 1024))
        r = _run("quantize", str(tiny), "-o", str(small / "out"), *FAST, "--dry-run")
        assert r.exit_code == 1
        line = _one_error_line(r)
        assert "not enough free disk" in line and "0.0 GiB" not in line and "KiB free" in line
    finally:
        _umount(small)
    assert fmt_bytes(20 * 2**20) == "20.0 MiB" and fmt_bytes(3 * 2**30) == "3.0 GiB"


_WRITER = textwrap.dedent("""
    import signal, sys, time
    from awqconv.cli import _on_sigterm
    from awqconv.outdir import staged_output
    if sys.argv[2] == "cli":  # the handler every awqconv command installs
        signal.signal(signal.SIGTERM, _on_sigterm)
    with staged_output(sys.argv[1], overwrite=False) as tmp:
        (tmp / "big.bin").write_bytes(b"x" * 1_000_000)
        print("writing", flush=True)
        time.sleep(60)
""")


def _writer(out: Path, cli_signals: bool = False) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(out), "cli" if cli_signals else "bare"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout.readline().strip() == "writing"
    return p


def test_sigterm_while_writing_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = _writer(out, cli_signals=True)
    assert [n for n in _strays(tmp_path) if n.startswith(temp_prefix(out.resolve()))]
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
    assert not out.exists() and _strays(tmp_path) == []


def test_cli_sigterm_during_a_run_leaves_no_stray(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = _cli("quantize", str(tiny), "-o", str(out), "-g", "32", "--calib-samples", "64", "--calib-seq-len", "256", "-q")
    deadline = time.monotonic() + 120
    while not lock_path(out.resolve()).exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=120)
    err = p.stderr.read()
    assert rc == 143, err
    assert "terminated; nothing was written" in err and "Traceback" not in err
    assert not out.exists() and _strays(tmp_path) == []


def test_kill_9_while_writing_then_a_rerun_leaves_no_stray(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = _writer(out)
    p.kill()
    p.wait(timeout=30)
    assert _strays(tmp_path), "kill -9 cannot clean up: the temporary directory is still there"
    assert not out.exists()  # ...but nothing looks finished
    r = _run("quantize", str(tiny), "-o", str(out), *FAST, "--to", "canonical")
    assert r.exit_code == 0, r.output
    assert _strays(tmp_path) == []


def test_a_swap_cut_between_its_renames_is_recovered(out_ok: Path, tiny: Path) -> None:
    before = _tree_digest(out_ok)
    old = out_ok.parent / f"{old_prefix(out_ok.resolve())}4242"
    os.rename(out_ok, old)  # as a run killed after moving the old output aside
    r = _run("quantize", str(tiny), "-o", str(out_ok), *FAST, "--to", "canonical")
    assert r.exit_code == 1 and "--overwrite" in _one_error_line(r)  # the previous output is back
    assert _tree_digest(out_ok) == before and not old.exists()


def test_files_get_the_umask_mode(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        r = _run("quantize", str(tiny), "-o", str(out), *FAST, "--to", "canonical,hf-awq,gguf")
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert {m for n, m in modes.items() if (out / n).is_file()} == {0o644}, modes
    assert {m for n, m in modes.items() if (out / n).is_dir()} == {0o755}, modes
