"""Streaming sources, per-layer checkpoints, --resume and spilled activations.

The interrupted runs are real processes killed with SIGKILL (no cleanup runs) at a chosen point:
just after a layer is committed, and between a layer's files and the state that would name them.
Outputs are compared byte for byte with an uninterrupted run (SOURCE_DATE_EPOCH fixes the one
timestamp the artifacts record).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from awqconv import api
from awqconv.errors import UsageError
from awqconv.outdir import OUTPUT_MARKER, work_path
from awqconv.quant.spill import ActivationBudget, ChunkStore
from awqconv.sources import collect_assets, load_causal_lm, load_hf_config
from awqconv.streaming import open_streamed
from tests.tiny_models import tiny_model_dir

N_LAYERS = 5
ARGS = ["--method", "awq", "-g", "32", "--calib-samples", "6", "--calib-seq-len", "64", "--search-tokens", "128",
        "--to", "canonical,hf-awq", "-q"]
KW = dict(method="awq", group_size=32, calib_samples=6, calib_seq_len=64, search_tokens=128)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 5-layer tiny Llama (bf16, as most checkpoints are) with SmolLM2's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = tiny_model_dir("LlamaForCausalLM")
    cfg = AutoConfig.from_pretrained(src)
    cfg.num_hidden_layers = N_LAYERS
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = tmp_path_factory.mktemp("llama5") / "model"
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    for name, data in collect_assets(src).items():
        (out / name).write_bytes(data)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    """Byte-equal trees; a failure names the files and shows the first differing lines of text ones."""
    import difflib

    assert got.keys() == want.keys()
    bad = [k for k in want if got[k] != want[k]]
    shown = []
    for k in bad:
        if k.endswith(".json"):
            shown += list(difflib.unified_diff(want[k].decode().splitlines(), got[k].decode().splitlines(), k, k,
                                               lineterm="", n=0))[:12]
    assert not bad, f"differing files {bad}:\n" + "\n".join(shown)


_KILLER = """
import os, signal, sys
import awqconv.quant.resume as r
K, WHERE = int(sys.argv[1]), sys.argv[2]
if WHERE == "after-commit":
    orig = r.LayerCheckpoints.save
    def save(self, i, *a):
        orig(self, i, *a)
        if i == K:
            os.kill(os.getpid(), signal.SIGKILL)
    r.LayerCheckpoints.save = save
else:  # the layer's files are written, the state that would name them is not
    orig = r.LayerCheckpoints._commit
    def commit(self, n):
        if n == K + 1:
            os.kill(os.getpid(), signal.SIGKILL)
        orig(self, n)
    r.LayerCheckpoints._commit = commit
from awqconv.cli import main
sys.argv = ["awqconv"] + sys.argv[3:]
main()
"""


def _run(args: list[str], env: dict, kill: tuple[int, str] | None = None, tmp: Path | None = None):
    if kill is None:
        cmd = [sys.executable, "-m", "awqconv.cli", *args]
    else:
        script = tmp / "killer.py"
        script.write_text(_KILLER)
        cmd = [sys.executable, str(script), str(kill[0]), kill[1], *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference_run(model_dir, tmp_path_factory):
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    out = tmp_path_factory.mktemp("ref") / "out"
    r = _run(["quantize", str(model_dir), "-o", str(out), *ARGS], env)
    assert r.returncode == 0, r.stderr[-2000:]
    return env, _files(out)


@pytest.mark.parametrize("where", ["after-commit", "before-commit"])
def test_a_killed_run_resumes_to_the_same_bytes(model_dir, reference_run, tmp_path, where) -> None:
    env, want = reference_run
    k = 1 if where == "after-commit" else 2  # killed after layer k is committed / before it is
    out = tmp_path / "out"
    r = _run(["quantize", str(model_dir), "-o", str(out), *ARGS], env, kill=(k, where), tmp=tmp_path)
    assert r.returncode == -signal.SIGKILL
    work = work_path(out)
    assert not out.exists()  # nothing that looks finished
    assert not any(p.name == OUTPUT_MARKER for p in tmp_path.rglob("*"))
    state = json.loads((work / "state.json").read_text())
    assert state["layers_done"] == (k + 1 if where == "after-commit" else k)


    r = _run(["quantize", str(model_dir), "-o", str(out), *ARGS, "--resume"], env)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same(_files(out), want)
    assert not work.exists()  # checkpoints go once the outputs are in place


def test_resume_with_other_settings_is_refused(model_dir, tmp_path) -> None:
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    out = tmp_path / "out"
    r = _run(["quantize", str(model_dir), "-o", str(out), *ARGS], env, kill=(0, "after-commit"), tmp=tmp_path)
    assert r.returncode == -signal.SIGKILL
    other = [a if a != "32" else "64" for a in ARGS]  # another group size
    r = _run(["quantize", str(model_dir), "-o", str(out), *other, "--resume"], env)
    assert r.returncode != 0 and "different settings" in r.stderr and "config" in r.stderr
    assert work_path(out).exists()  # the interrupted run's work is not thrown away


def test_spilled_activations_give_the_same_bytes(model_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a = api.convert(model_dir, ["canonical"], tmp_path / "mem", progress=False, **KW)
    b = api.convert(model_dir, ["canonical"], tmp_path / "disk", progress=False, activation_memory=0, **KW)
    assert a.report["activations_spilled_bytes"] == 0
    # every chunk of both stores alive at once went to disk: 6 blocks x 64 tokens x 128 wide x 4 bytes, per layer
    assert b.report["activations_spilled_bytes"] >= N_LAYERS * 6 * 64 * 128 * 4
    _assert_same(_files(tmp_path / "disk"), _files(tmp_path / "mem"))
    assert b.report["streamed"] is True


def test_chunk_store_round_trips_spilled_chunks_exactly(tmp_path) -> None:
    budget = ActivationBudget(3 * 4 * 8 * 4, tmp_path / "spill")  # room for one chunk of three
    store = ChunkStore(torch.device("cpu"), budget)
    hs = [torch.randn(3, 4, 8) for _ in range(3)]
    for h in hs:
        store.append(h, {"i": h.shape[0]})
    assert store.spilled == 2 and budget.used == hs[0].numel() * 4
    assert all(torch.equal(c.hidden, h) for c, h in zip(store, hs))
    assert [len(list(store.head(n))) for n in (0, 2, 9)] == [0, 2, 3]
    store.release()
    assert budget.used == 0 and not list((tmp_path / "spill").iterdir())


def test_streamed_source_equals_the_whole_model(model_dir) -> None:
    cfg = load_hf_config(model_dir)
    src = open_streamed(model_dir, cfg, "model.layers")
    assert src is not None
    layers = src.model.model.layers
    assert all(p.is_meta for p in layers.parameters())  # nothing of the layers is read up front
    assert not src.model.model.embed_tokens.weight.is_meta
    for i in range(N_LAYERS):
        src.load_layer(i)
    whole, _ = load_causal_lm(model_dir)
    got, want = src.model.state_dict(), whole.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.randint(0, 1000, (1, 12))
    assert torch.equal(src.model(ids).logits, whole(ids).logits)


def test_checkpoints_under_other_names_load_whole() -> None:
    """transformers 5 stacks MoE experts that checkpoints store one by one: no streaming, same result."""
    d = tiny_model_dir("Qwen3MoeForCausalLM")
    assert open_streamed(d, load_hf_config(d), "model.layers") is None


def test_a_run_that_fails_before_any_layer_leaves_no_work_directory(model_dir, tmp_path, monkeypatch) -> None:
    import awqconv.quant.pipeline as pl

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(pl, "_quantize_layer", boom)
    with pytest.raises(RuntimeError, match="injected"):
        api.convert(model_dir, ["canonical"], tmp_path / "out", progress=False, method="rtn", group_size=32)
    assert list(tmp_path.iterdir()) == []


def test_resume_without_checkpoints_starts_from_the_beginning(model_dir, tmp_path) -> None:
    res = api.convert(model_dir, ["canonical"], tmp_path / "out", progress=False, resume=True, method="rtn",
                      group_size=32)
    assert res.report["resumed_from_layer"] == 0 and (tmp_path / "out" / "canonical").is_dir()


def test_same_run_without_resume_is_refused(model_dir, tmp_path) -> None:
    env = {**os.environ}
    out = tmp_path / "out"
    r = _run(["quantize", str(model_dir), "-o", str(out), "--method", "rtn", "-g", "32", "-q"], env,
             kill=(2, "after-commit"), tmp=tmp_path)
    assert r.returncode == -signal.SIGKILL
    with pytest.raises(UsageError, match="add --resume"):
        api.convert(model_dir, ["canonical", "hf-awq"], out, progress=False, method="rtn", group_size=32)
