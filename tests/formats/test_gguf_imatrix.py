"""The importance matrix beside K-quant GGUFs, judged by llama.cpp's own code.

- the file is read with gguf-py (llama.cpp's Python package) and checked against the layout
  llama-imatrix writes and common/imatrix-loader.cpp requires;
- llama.cpp's quantizer (llama-cpp-python) uses it: it refuses an entry whose size does not match
  its tensor (so a stacked MoE entry of the wrong shape fails the write), writes our provenance
  keys, and the K-quant it produces differs from the plain one and has a lower weighted error;
- when a ``llama-quantize`` binary is available (``$AWQCONV_LLAMA_QUANTIZE`` or PATH), the tool
  itself reads the file and must produce the same tensors as our in-process call;
- without statistics nothing changes.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import llama_cpp  # noqa: F401  CI installs llama-cpp-python: the quantizer under test
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM, AutoTokenizer

from awqconv.config import QuantConfig
from awqconv.formats import gguf as G
from awqconv.formats.gguf_imatrix import read_imatrix
from awqconv.model import QuantizedModel
from awqconv.quant.calib import build_blocks, load_calibration_texts
from awqconv.quant.pipeline import quantize_model
from awqconv.sources import collect_assets, load_hf_config
from tests.tiny_models import tiny_model_dir

T = GGMLQuantizationType
CFG = QuantConfig(calib_samples=8, calib_seq_len=64, search_tokens=128, group_size=32, n_grid=5, clip_n_grid=5)


@functools.lru_cache(maxsize=None)
def _awq(arch: str) -> QuantizedModel:
    path = tiny_model_dir(arch)
    tok = AutoTokenizer.from_pretrained(path)
    blocks = build_blocks(load_calibration_texts("builtin"), tok, CFG.calib_samples, CFG.calib_seq_len).ids
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf = load_hf_config(path)
    out = quantize_model(model, hf, CFG, blocks, progress=False)
    out.importance.datasets = ["builtin"]
    return QuantizedModel(hf, CFG, out.linears, out.dense, out.search, {"model_name": f"tiny-{arch[:5].lower()}"},
                          collect_assets(path), out.prescaled, importance=out.importance)


def _without_importance(qm: QuantizedModel) -> QuantizedModel:
    return QuantizedModel(qm.hf_config, qm.quant_config, qm.linears, qm.dense, qm.search, qm.provenance, qm.assets,
                          qm.prescaled)


def _write(qm: QuantizedModel, d: Path, variant: str) -> G.GGUFWriteResult:
    d.mkdir(parents=True)
    return G.write(qm, d, variant)


@functools.lru_cache(maxsize=None)
def _reader(path: Path) -> GGUFReader:
    return GGUFReader(str(path))  # a model file's 49k-token vocabulary takes seconds to parse


def _kv(reader: GGUFReader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    qm = _awq("LlamaForCausalLM")
    root = tmp_path_factory.mktemp("imatrix")
    return qm, {
        "with": _write(qm, root / "with", "q4_k_m"),
        "without": _write(_without_importance(qm), root / "without", "q4_k_m"),
        "f32": _write(_without_importance(qm), root / "f32", "f32"),
    }


def test_file_has_llama_imatrix_layout(llama):
    qm, res = llama
    path = res["with"].imatrix
    assert path == res["with"].path.parent / "tiny-llama.imatrix"
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny-llama-q4_k_m.gguf", "tiny-llama.imatrix"]
    r = GGUFReader(str(path))
    assert _kv(r, "general.type") == "imatrix"
    assert "general.architecture" not in r.fields  # llama-imatrix writes none
    assert r.fields["imatrix.chunk_count"].types == [GGUFValueType.UINT32] and _kv(r, "imatrix.chunk_count") == 8
    assert r.fields["imatrix.chunk_size"].types == [GGUFValueType.UINT32] and _kv(r, "imatrix.chunk_size") == 64
    assert r.fields["imatrix.datasets"].types == [GGUFValueType.ARRAY, GGUFValueType.STRING]
    assert _kv(r, "imatrix.datasets") == ["builtin"]

    names = [t.name for t in r.tensors]
    bases = sorted({n.rsplit(".", 1)[0] for n in names})
    assert names == [f"{b}.{kind}" for b in bases for kind in ("in_sum2", "counts")]  # llama-imatrix's order
    weights = {t.name for t in _reader(res["with"].path).tensors if t.name.startswith("blk.")}
    quantized = {w for w in weights if not w.endswith("_norm.weight")}
    assert {n.rsplit(".", 1)[0] for n in names} == quantized  # one pair per quantized weight, no others
    tensors = {t.name: t for t in r.tensors}
    n_in = {t.name: int(t.shape[0]) for t in _reader(res["f32"].path).tensors}
    for w in quantized:
        s, c = tensors[w + ".in_sum2"], tensors[w + ".counts"]
        assert s.tensor_type == T.F32 and c.tensor_type == T.F32  # the loader refuses anything else
        assert list(s.shape) == [n_in[w], 1]  # ggml ne: [n_in, n_mat]
        assert list(c.shape) == [1, 1] and float(c.data[0][0]) == 8 * 64
    q = tensors["blk.1.attn_q.weight.in_sum2"]
    np.testing.assert_array_equal(np.asarray(q.data).reshape(-1),
                                  qm.importance.sums["model.layers.1.self_attn.q_proj"].numpy())


def test_llama_cpp_quantizes_with_it(llama):
    qm, res = llama
    r = _reader(res["with"].path)
    # llama.cpp wrote the keys we handed it, as llama-quantize --imatrix does
    assert _kv(r, "quantize.imatrix.file") == "tiny-llama.imatrix"
    assert _kv(r, "quantize.imatrix.dataset") == "builtin"
    assert _kv(r, "quantize.imatrix.entries_count") == 14 and _kv(r, "quantize.imatrix.chunks_count") == 8
    assert "quantize.imatrix.file" not in _reader(res["without"].path).fields

    entries, _ = read_imatrix(res["with"].imatrix)
    ref = {t.name: t for t in _reader(res["f32"].path).tensors}
    plain = {t.name: t for t in _reader(res["without"].path).tensors}
    err_with = err_without = 0.0
    better = differ = n = 0
    for t in r.tensors:
        if t.name not in entries or t.tensor_type == T.Q8_0:  # llama.cpp's Q8_0 takes no importance
            continue
        n += 1
        w = np.asarray(ref[t.name].data, dtype=np.float64)
        imp = entries[t.name].weights().astype(np.float64)  # E[x^2] per input column
        e1 = float((imp * (dequantize(t.data, T(t.tensor_type)) - w) ** 2).sum())
        e0 = float((imp * (dequantize(plain[t.name].data, T(plain[t.name].tensor_type)) - w) ** 2).sum())
        err_with, err_without = err_with + e1, err_without + e0
        better += e1 < e0
        differ += not np.array_equal(np.asarray(t.data), np.asarray(plain[t.name].data))
    assert n >= 12 and differ == n
    assert better >= 0.8 * n, (better, n)
    print(f"weighted error with/without imatrix: {err_with / err_without:.3f} ({better}/{n} tensors lower)")
    assert err_with < 0.9 * err_without, (err_with, err_without)


def test_stacked_experts_are_accepted_by_llama_cpp(tmp_path):
    qm = _awq("MixtralForCausalLM")
    res = _write(qm, tmp_path / "moe", "q4_k_m")  # llama.cpp throws on an entry of the wrong size
    entries, _ = read_imatrix(res.imatrix)
    e = entries["blk.0.ffn_down_exps.weight"]
    n_exp = qm.hf_config["num_local_experts"]
    assert e.sums.shape == (n_exp, qm.hf_config["intermediate_size"]) and e.counts.shape == (n_exp,)
    # every token is routed to top_k experts
    assert e.counts.sum() == 8 * 64 * qm.hf_config["num_experts_per_tok"]
    for k in range(n_exp):
        name = f"model.layers.0.mlp.experts.{k}.down_proj"
        np.testing.assert_array_equal(e.sums[k], qm.importance.sums[name].numpy())
    assert _kv(_reader(res.path), "quantize.imatrix.entries_count") == len(entries)


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM"])  # expert names unlike Mixtral's
def test_another_moe_layout_is_accepted_by_llama_cpp(arch, tmp_path):
    """Synthetic statistics on an RTN model: llama.cpp quantizes with an entry for every weight."""
    from awqconv.model import ImportanceMatrix

    path = tiny_model_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf = load_hf_config(path)
    cfg = QuantConfig(method="rtn", group_size=32)
    out = quantize_model(model, hf, cfg, None, progress=False)
    gen = torch.Generator().manual_seed(0)
    imp = ImportanceMatrix({n: torch.rand(p.in_features, generator=gen) + 0.1 for n, p in out.linears.items()},
                           {n: 100 for n in out.linears}, chunk_size=64, chunk_count=2)  # no datasets recorded
    qm = QuantizedModel(hf, cfg, out.linears, out.dense, out.search, {"model_name": "tiny"}, collect_assets(path),
                        out.prescaled, importance=imp)
    res = _write(qm, tmp_path / "k", "q4_k_m")
    blk = {t.name for t in _reader(res.path).tensors if t.name.startswith("blk.") and len(t.shape) >= 2}
    quantized = {n for n in blk if ".ffn_gate_inp." not in n}  # routers stay F32
    entries, _ = read_imatrix(res.imatrix)
    assert set(entries) == quantized
    assert _kv(_reader(res.path), "quantize.imatrix.entries_count") == len(quantized)
    assert "imatrix.datasets" in _reader(res.imatrix).fields  # without it llama-quantize refuses the file


def test_unrouted_expert_is_weighted_evenly():
    from awqconv.formats.gguf_imatrix import ImatrixEntry

    e = ImatrixEntry(np.array([[2.0, 4.0], [5.0, 5.0]], np.float32), np.array([2.0, 0.0], np.float32))
    np.testing.assert_array_equal(e.weights(), [1.0, 2.0, 1.0, 1.0])  # llama-quantize's rule


def test_without_importance_nothing_changes(llama, tmp_path):
    qm, res = llama
    plain = res["without"]
    assert plain.imatrix is None
    assert [p.name for p in plain.path.parent.iterdir()] == [plain.path.name]
    for variant in ("q4_0",):  # writers that never use it ignore it
        a, b = _write(qm, tmp_path / f"a-{variant}", variant), _write(_without_importance(qm), tmp_path / f"b-{variant}", variant)
        assert a.imatrix is None and a.path.read_bytes() == b.path.read_bytes()


def _llama_quantize() -> str | None:
    return os.environ.get("AWQCONV_LLAMA_QUANTIZE") or shutil.which("llama-quantize")


@pytest.mark.skipif(_llama_quantize() is None, reason="no llama-quantize binary (set AWQCONV_LLAMA_QUANTIZE)")
def test_llama_quantize_reads_the_file_and_agrees(llama, tmp_path):
    qm, res = llama
    f16 = _write(_without_importance(qm), tmp_path / "f16", "f16").path
    out = tmp_path / "tool.gguf"
    run = subprocess.run([_llama_quantize(), "--imatrix", str(res["with"].imatrix), "--token-embedding-type", "q8_0",
                          "--output-tensor-type", "q8_0", str(f16), str(out), "Q4_K_M", "1"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "loaded 14 importance matrix entries" in run.stdout + run.stderr
    ours = {t.name: t for t in _reader(res["with"].path).tensors}
    for t in GGUFReader(str(out)).tensors:
        assert t.tensor_type == ours[t.name].tensor_type, t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(ours[t.name].data)), t.name
