"""RuntimeOptions: validated on construction, parsed from command lines, handed to build_decoder and
passed down to the kernel launches; the environment plays no part (only the cache location is an
environment variable)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from awqconv.errors import UsageError
from awqconv.runtime.layer_ops import StepPaths
from awqconv.runtime.model import build_decoder
from awqconv.runtime.options import RuntimeOptions

ROOT = Path(__file__).resolve().parents[2]
ENV_SWITCHES = ("AWQCONV_X16", "AWQCONV_PENDING_NORM", "AWQCONV_DECODE_PROLOGUE", "AWQCONV_HEAD_GEMV",
                "AWQCONV_PDL", "AWQCONV_DEQUANT_MIN_M")


def test_defaults_are_the_fast_paths():
    o = RuntimeOptions()
    assert (o.pdl, o.dequant_min_m, o.x16, o.pending_norm, o.decode_prologue, o.head_gemv) == (
        True, 257, True, True, True, True)
    assert o.changed() == {}
    with pytest.raises(AttributeError):
        o.pdl = False  # frozen


@pytest.mark.parametrize("kw,match", [({"pdl": 0}, "pdl must be True or False"),
                                      ({"x16": "no"}, "x16 must be True or False"),
                                      ({"dequant_min_m": 1}, "integer >= 2"),
                                      ({"dequant_min_m": 64.0}, "integer >= 2"),
                                      ({"dequant_min_m": True}, "integer >= 2")])
def test_bad_values_are_refused_clearly(kw, match):
    with pytest.raises(UsageError, match=match):
        RuntimeOptions(**kw)


def test_parse():
    assert RuntimeOptions.parse("") == RuntimeOptions()
    o = RuntimeOptions.parse("pdl=0, head-gemv=off,dequant_min_m=129,x16=true")
    assert o == RuntimeOptions(pdl=False, head_gemv=False, dequant_min_m=129)
    assert o.changed() == {"pdl": False, "dequant_min_m": 129, "head_gemv": False}
    for bad, match in (("pdl", "name=value"), ("speed=1", "name one of"), ("pdl=2", "0/1"),
                       ("dequant_min_m=x", "integer"), ("dequant_min_m=1", ">= 2")):
        with pytest.raises(UsageError, match=match):
            RuntimeOptions.parse(bad)


def test_build_decoder_takes_options_and_resolves_them_per_device(tiny_qm):
    dec = build_decoder(tiny_qm, "cpu")
    assert dec.options == RuntimeOptions() and dec.paths == StepPaths()  # CPU: plain torch
    opts = RuntimeOptions(pdl=False, dequant_min_m=9, head_gemv=False)
    dec = build_decoder(tiny_qm, "cpu", options=opts)
    assert dec.options is opts and not dec.paths.pdl and dec.paths.dequant_min_m == 9
    with pytest.raises(UsageError, match="RuntimeOptions"):
        build_decoder(tiny_qm, "cpu", options={"pdl": False})
    gpu = StepPaths.resolve(RuntimeOptions(), True, torch.bfloat16)
    assert gpu.triton and gpu.x16 and gpu.pending_norm and gpu.prologue and gpu.head_gemv and gpu.pdl
    assert not StepPaths.resolve(RuntimeOptions(), True, torch.float16).x16  # X16 carries bf16 only
    off = StepPaths.resolve(RuntimeOptions(x16=False, pending_norm=False, decode_prologue=False, head_gemv=False),
                            True, torch.bfloat16)
    assert off.triton and not (off.x16 or off.pending_norm or off.prologue or off.head_gemv)


def test_environment_switches_are_not_read(tiny_qm, monkeypatch):
    """The old AWQCONV_* switches change nothing, even set to values that would have broken import."""
    for name in ENV_SWITCHES:
        monkeypatch.setenv(name, "0")
    dec = build_decoder(tiny_qm, "cpu")
    dec.set_options(RuntimeOptions())
    assert StepPaths.resolve(dec.options, True, torch.bfloat16) == StepPaths.resolve(
        RuntimeOptions(), True, torch.bfloat16)
    env = {**os.environ, "AWQCONV_DEQUANT_MIN_M": "not-a-number", "AWQCONV_PDL": "0", "PYTHONPATH": str(ROOT)}
    code = ("import awqconv.runtime.model, awqconv.kernels.ops as ops, awqconv.kernels.launch as launch; "
            "import inspect; assert 'environ' not in inspect.getsource(launch)")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=300)


def test_no_awqconv_switch_in_the_package():
    """Only the cache location (AWQCONV_CACHE, sources.py) is an environment variable."""
    found = []
    for path in (ROOT / "awqconv").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if "AWQCONV_" in line and "AWQCONV_CACHE" not in line:
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, found


def _step(dec, ids):
    T = ids.shape[1]
    dec.allocate_cache(1, 16)
    with torch.no_grad():
        dec(ids[:, :-1], torch.arange(T - 1)[None], torch.tensor(0), T - 1)
        return dec(ids[:, -1:], torch.tensor([[T - 1]]), torch.tensor(T - 1), T)[0, -1].float()


def test_pdl_option_reaches_every_launch(make_tiny_llama_qm, monkeypatch):
    """With pdl=False no kernel launch of a prefill + decode step on the GPU code path (interpreter)
    even asks whether PDL is supported; with the default every launcher asks. Same logits (PDL only
    changes when a kernel may start)."""
    from awqconv.kernels import launch

    asked = []
    monkeypatch.setattr(launch, "pdl_supported", lambda device: asked.append(device) and False)
    qm = make_tiny_llama_qm(head_dim=64)
    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    logits = {}
    for pdl in (True, False):
        dec = build_decoder(qm, "cpu", dtype=torch.float16, mode="triton")
        dec.paths = StepPaths.resolve(RuntimeOptions(pdl=pdl), True, torch.float16)
        asked.clear()
        logits[pdl] = _step(dec, ids)
        assert (len(asked) > 10) if pdl else not asked
    assert torch.equal(logits[True], logits[False])


def test_dequant_threshold_option_reaches_the_prefill_linears(make_tiny_llama_qm, monkeypatch):
    """dequant_min_m=2: a 5-token prefill's INT4 linears dequantise + matmul (4 per layer) instead
    of the tile kernel; the step's logits stay within the fp16 tolerance of the default's (2e-2)."""
    from awqconv.kernels import ops

    calls = []
    real = ops.dequantize
    monkeypatch.setattr(ops, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    qm = make_tiny_llama_qm(head_dim=64)
    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    logits = {}
    for m in (257, 2):
        dec = build_decoder(qm, "cpu", dtype=torch.float16, mode="triton", options=RuntimeOptions(dequant_min_m=m))
        calls.clear()
        logits[m] = _step(dec, ids)
        assert len(calls) == (0 if m == 257 else 4 * qm.hf_config["num_hidden_layers"])
    assert ((logits[2] - logits[257]).abs().max() / logits[257].abs().max()).item() < 2e-2
