"""Existing AWQ checkpoints in: made by AutoAWQ 0.2.9's own packer and save_quantized
(autoawq_producer.py), read bit-exactly, exported without the float model, judged by other readers.

- read: every linear's q, z and s are what AutoAWQ was given; modules_to_not_convert stay float;
  sharded safetensors with an index, tied lm_head dropped by AutoAWQ, Mixtral's transformers 4.x
  expert names, ``zero_point`` false, AutoAWQ < 0.2's quant_config.json.
- export judged by llama.cpp (llama-cpp-python runs the GGUF on the AutoAWQ integers), transformers
  (loads the peft layout: weights exactly (q - z) * s) and the ExLlamaV2 layout decoder of
  test_exllamav2.py; ``awqconv verify`` passes on the export.
- a Hub id is downloaded through a local STAND-IN for the Hub (tests/publish/hub_standin.py, the
  publish tests' fixture), never the Hub itself.
- refusals (one error line, nothing written): other layouts, bits, act-order, unknown architecture,
  pickled weights (never unpickled), missing tensors, a manifest that does not match.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import llama_cpp  # noqa: F401 - CI installs llama-cpp-python: the GGUF judgement
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from awqconv import api
from awqconv.formats import detect_format
from awqconv.formats.integrity import record
from tests.formats.autoawq_producer import dequant, import_autoawq, make_checkpoint
from tests.formats.test_exllamav2 import reference_decode
from tests.formats.test_gguf import _hf_logits, _kl, _llama_logits
from tests.publish.conftest import hub  # noqa: F401 - the stand-in Hub fixture
from tests.publish.util import TOKEN, one_error_line, run, tamper
from tests.tiny_models import tiny_model_dir

LLAMA, MIXTRAL = "LlamaForCausalLM", "MixtralForCausalLM"
DOWN = "model.layers.1.mlp.down_proj"
PROBE = [int(i) for i in torch.randint(0, 49152, (40,), generator=torch.Generator().manual_seed(3))]
# llama.cpp on the GGUF vs transformers on the same integers, on PROBE: top-1 agreement measured
# 0.80 (Llama) and 0.725 (Mixtral; routers flip under llama.cpp's 8-bit activations), against
# 0.375-0.4 for the float model; KL to the integers 25-65x smaller than to the float model
DENSE_TOP1, MOE_TOP1 = 0.75, 0.65
# transformers 4.x Mixtral names, as AutoAWQ saved them -> the names awqconv gives the same modules
MIXTRAL_NAMES = ((".block_sparse_moe.experts.", ".mlp.experts."), (".w1", ".gate_proj"), (".w3", ".up_proj"),
                 (".w2", ".down_proj"), (".block_sparse_moe.gate", ".mlp.gate"))


@pytest.fixture(scope="module")
def awq():
    return import_autoawq()


@pytest.fixture(scope="module")
def llama(awq, tmp_path_factory):
    """(dir, given): the tiny Llama by AutoAWQ, g=32, down_proj kept fp16, in 3 shards + index."""
    out = tmp_path_factory.mktemp("autoawq") / "llama-awq"
    given = make_checkpoint(awq, tiny_model_dir(LLAMA), out, skip=("down_proj",), shard_size="4MB")
    return out, given


@pytest.fixture(scope="module")
def exported(llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "out"
    r = run("export", llama[0], "--to", "canonical,gguf,exllamav2,peft,hf-awq", "-o", out)
    assert r.exit_code == 0, r.output
    return out


def _assert_given(qm, given, rename=()) -> None:
    """Every linear AutoAWQ packed is in ``qm`` with exactly the integers and scales it was given."""
    for name, (q, z, s) in given.items():
        for old, new in rename:
            name = name.replace(old, new)
        p = qm.linears[name]
        assert torch.equal(p.unpack().to(torch.int32), q), name
        assert torch.equal(p.zeros.to(torch.int32), z), name
        assert p.scales.dtype == torch.float16 and torch.equal(p.scales, s), name


def _reference_logits(src: Path, given, tmp: Path, tie: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """transformers' logits on PROBE of the AutoAWQ integers (dequantized), and of the float model.
    The checkpoint keeps its own names: transformers converts Mixtral's old ones itself."""
    from transformers import AutoModelForCausalLM

    state = {k: v.half().float() for k, v in load_file(str(src / "model.safetensors")).items()}
    quant = {**state, **{f"{n}.weight": dequant(*qzs) for n, qzs in given.items()}}
    logits = []
    for i, sd in enumerate((quant, state)):
        d = tmp / f"ref{i}"
        d.mkdir()
        cfg = json.loads((src / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "dtype": "float32", "tie_word_embeddings": tie}))
        save_file({k: v for k, v in sd.items() if not (tie and k == "lm_head.weight")}, str(d / "model.safetensors"))
        logits.append(_hf_logits(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), PROBE))
    return logits[0], logits[1]


def _judge_gguf(gguf: Path, ref: np.ndarray, fp: np.ndarray, min_top1: float) -> None:
    got = _llama_logits(gguf, PROBE)
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    assert top1 >= min_top1, top1
    # far closer to the AutoAWQ integers than to the float model: the file holds those integers
    assert _kl(ref, got) * 5 < _kl(ref, fp), (_kl(ref, got), _kl(ref, fp))


# -- read -------------------------------------------------------------------------------------


def test_autoawq_checkpoint_reads_bit_exactly(llama):
    path, given = llama
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("model-*.safetensors"))) == 3
    assert detect_format(path) == "hf-awq"
    qm = api.load(path)  # no awqconv manifest: third-party input
    assert len(given) == 12 and set(qm.linears) == set(given)  # 2 layers x 6 linears; down_proj dense
    _assert_given(qm, given)
    source = load_file(str(tiny_model_dir(LLAMA) / "model.safetensors"))
    assert torch.equal(qm.dense[f"{DOWN}.weight"], source[f"{DOWN}.weight"].half())
    assert qm.provenance["modules_not_converted"] == ["down_proj"]
    assert qm.quant_config.group_size == 32 and qm.quant_config.zero_point


def test_zero_point_false_and_autoawq_before_0_2(llama, tmp_path):
    path, given = llama
    cfg = json.loads((path / "config.json").read_text())
    sym = shutil.copytree(path, tmp_path / "sym", copy_function=os.link)
    (sym / "config.json").unlink()
    (sym / "config.json").write_text(json.dumps({**cfg, "quantization_config": {**cfg["quantization_config"],
                                                                                 "zero_point": False}}))
    qm = api.load(sym)
    _assert_given(qm, given)  # the stored zeros are what every GEMM kernel uses
    assert qm.quant_config.zero_point  # they are not all 8: the model is asymmetric
    # AutoAWQ < 0.2 (TheBloke-era repos): settings in quant_config.json, none in config.json
    old = shutil.copytree(path, tmp_path / "old", copy_function=os.link)
    (old / "config.json").unlink()
    (old / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    (old / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": 32, "w_bit": 4,
                                                       "version": "GEMM"}))
    assert detect_format(old) == "hf-awq"
    _assert_given(api.load(old), given)


# -- export, judged by other readers ----------------------------------------------------------


def test_gguf_export_runs_the_autoawq_integers_in_llama_cpp(llama, exported, tmp_path):
    ref, fp = _reference_logits(tiny_model_dir(LLAMA), llama[1], tmp_path)
    _judge_gguf(next((exported / "gguf").glob("*.gguf")), ref, fp, DENSE_TOP1)


def test_exllamav2_export_decodes_to_the_autoawq_integers(llama, exported):
    tensors = load_file(str(exported / "exllamav2" / "model.safetensors"))
    for name, (q, z, s) in llama[1].items():
        w = reference_decode(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"])
        np.testing.assert_array_equal(w, dequant(q, z, s).numpy().astype(np.float64))
    assert tensors[f"{DOWN}.weight"].dtype == torch.float16  # kept dense, as AutoAWQ kept it
    qcfg = json.loads((exported / "exllamav2" / "config.json").read_text())["quantization_config"]
    assert qcfg["bits"] == 4 and qcfg["group_size"] == 32 and not qcfg["desc_act"]


def test_peft_export_loads_in_transformers_with_the_autoawq_weights(llama, exported):
    from transformers import AutoModelForCausalLM

    sd = AutoModelForCausalLM.from_pretrained(exported / "peft", dtype=torch.float32).state_dict()
    for name, qzs in llama[1].items():
        assert torch.equal(sd[f"{name}.weight"], dequant(*qzs)), name
    source = load_file(str(tiny_model_dir(LLAMA) / "model.safetensors"))
    assert torch.equal(sd[f"{DOWN}.weight"], source[f"{DOWN}.weight"].half().float())


def test_verify_passes_on_the_export(exported):
    r = run("verify", exported, "--no-bench", "--threads", "1")
    assert r.exit_code == 0, r.output
    assert "PASS: 5 artifact(s)" in r.output
    report = json.loads((exported / "verify.json").read_text())
    assert report["ok"] is True


def test_mixtral_with_transformers4_expert_names(awq, tmp_path):
    """AutoAWQ's Mixtral: block_sparse_moe.experts.N.w1/w3/w2 packed, the router ("gate") kept fp16."""
    src = tiny_model_dir(MIXTRAL)
    path = tmp_path / "mixtral-awq"
    given = make_checkpoint(awq, src, path, skip=("gate",))
    assert any(".block_sparse_moe.experts.3.w2" in n for n in given) and len(given) == 2 * (4 + 4 * 3)
    qm = api.load(path)
    _assert_given(qm, given, MIXTRAL_NAMES)
    assert "model.layers.0.mlp.gate.weight" in qm.dense and qm.provenance["modules_not_converted"] == ["gate"]
    out = tmp_path / "out"
    r = run("export", path, "--to", "gguf,hf-awq", "-o", out)
    assert r.exit_code == 0, r.output
    ref, fp = _reference_logits(src, given, tmp_path)
    _judge_gguf(next((out / "gguf").glob("*.gguf")), ref, fp, MOE_TOP1)
    _assert_given(api.load(out / "hf-awq"), given, MIXTRAL_NAMES)


def test_tied_lm_head_dropped_by_autoawq(awq, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tied-awq"
    given = make_checkpoint(awq, tiny_model_dir(LLAMA), path, tie=True)
    stored = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" not in stored  # AutoAWQ's shared_tensors_to_discard
    qm = api.load(path)
    assert "lm_head.weight" not in qm.dense
    _assert_given(qm, given)
    out = tmp_path / "out"
    assert run("export", path, "--to", "peft", "-o", out).exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(out / "peft", dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, stored["model.embed_tokens.weight"].float())


# -- the Hub (a local stand-in) ---------------------------------------------------------------


def test_hub_id_through_the_stand_in_hub(hub, llama, exported, tmp_path, monkeypatch):  # noqa: F811
    import huggingface_hub.constants as hc
    from huggingface_hub import HfApi

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    api_ = HfApi(endpoint=hub.url, token=TOKEN)

    def upload(repo: str, folder: Path) -> None:
        api_.create_repo(repo)
        api_.upload_folder(repo_id=repo, folder_path=folder)

    upload("alice/tiny-autoawq", llama[0])
    r = run("export", "alice/tiny-autoawq", "--to", "canonical", "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    back = api.load(tmp_path / "a" / "canonical")
    _assert_given(back, llama[1])
    assert back.provenance["source_model"] == "alice/tiny-autoawq"

    # an awqconv artifact on the Hub: its manifest's files (the card too) are fetched and checked
    upload("alice/tiny-hf-awq", exported / "hf-awq")
    r = run("export", "alice/tiny-hf-awq", "--to", "gguf", "-o", tmp_path / "b", "--revision", "main")
    assert r.exit_code == 0, r.output
    bad = shutil.copytree(exported / "hf-awq", tmp_path / "bad")
    tamper(bad / "config.json")
    upload("alice/tampered", bad)
    r = run("export", "alice/tampered", "--to", "gguf", "-o", tmp_path / "c")
    assert r.exit_code == 1 and "config.json does not match the sha256" in one_error_line(r)
    # pickles only: refused before any is downloaded
    pk = tmp_path / "pk"
    pk.mkdir()
    shutil.copy(llama[0] / "config.json", pk / "config.json")
    (pk / "pytorch_model.bin").write_bytes(b"not read")
    upload("alice/pickled", pk)
    r = run("export", "alice/pickled", "--to", "gguf", "-o", tmp_path / "d")
    assert r.exit_code == 1 and "no *.safetensors weights on the Hub" in one_error_line(r)
    assert not list((tmp_path / "hub-cache").rglob("pytorch_model.bin"))
    assert not any((tmp_path / x).exists() for x in "cd")


# -- refusals ---------------------------------------------------------------------------------


def _variant(src: Path, dst: Path, qcfg: dict | None = None, **config) -> Path:
    """A hard-linked copy of ``src`` with config.json changed (quantization_config keys ``qcfg``)."""
    shutil.copytree(src, dst, copy_function=os.link)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config)
    cfg["quantization_config"].update(qcfg or {})
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _refused(path: Path, tmp: Path, *words: str) -> None:
    out = tmp / "out"
    r = run("export", path, "--to", "gguf,exllamav2,peft", "-o", out)
    line = one_error_line(r)
    assert r.exit_code == 1 and all(w in line for w in words), line
    assert not out.exists()


@pytest.mark.parametrize(("qcfg", "config", "words"), [
    ({"version": "gemv"}, {}, ("'gemv'", "GEMV layout", "GEMM")),
    ({"version": "gemv_fast"}, {}, ("GEMVFast",)),
    ({"version": "gemm", "backend": "llm-awq"}, {}, ("llm-awq",)),
    ({"version": "marlin"}, {}, ("Marlin",)),
    ({"version": "exllama"}, {}, ("ExLlama",)),
    ({"bits": 8}, {}, ("8-bit", "4-bit weights only")),
    ({"desc_act": True}, {}, ("act-order",)),
    ({}, {"architectures": ["FooForCausalLM"]}, ("FooForCausalLM is not one awqconv knows", "LlamaForCausalLM")),
    ({}, {"num_hidden_layers": 3}, ("model.layers.2.self_attn.q_proj.qweight (or .weight)", "incomplete")),
])
def test_what_cannot_be_read_exactly_is_refused(llama, tmp_path, qcfg, config, words):
    _refused(_variant(llama[0], tmp_path / "v", qcfg, **config), tmp_path, *words)


def _resaved(src: Path, dst: Path, drop: tuple[str, ...] = (), add: dict | None = None) -> Path:
    """``src`` re-saved as one model.safetensors without the keys ending in ``drop``, plus ``add``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model*.safetensors*"))
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("model-*.safetensors")) or [src / "model.safetensors"]:
        tensors.update(load_file(str(f)))
    tensors = {k: v for k, v in tensors.items() if not k.endswith(drop)} | (add or {})
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_act_order_tensors_and_missing_tensors_are_refused(llama, tmp_path):
    q = "model.layers.0.self_attn.q_proj"
    g_idx = {f"{q}.g_idx": torch.arange(64, dtype=torch.int32)}
    _refused(_resaved(llama[0], tmp_path / "a", add=g_idx), tmp_path / "a-out", f"{q}.g_idx", "act-order")
    parts = tuple(f"{q}.{p}" for p in ("qweight", "qzeros", "scales"))
    _refused(_resaved(llama[0], tmp_path / "b", drop=parts), tmp_path / "b-out", f"{q}.qweight (or .weight) is missing")
    _refused(_resaved(llama[0], tmp_path / "c", drop=(f"{q}.qzeros",)), tmp_path / "c-out", f"{q}.qzeros")
    _refused(_resaved(llama[0], tmp_path / "d", drop=("model.norm.weight",)), tmp_path / "d-out",
             "model.norm.weight is missing")


class _Trap:
    """Unpickling this creates ``path``: proof that a file was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickled_weights_are_never_unpickled(llama, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(llama[0] / "config.json", d / "config.json")
    sprung = tmp_path / "unpickled"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(sprung)))
    _refused(d, tmp_path, "pytorch_model.bin", "never loads", "safetensors")
    assert not sprung.exists()


def test_a_manifest_that_does_not_match_still_fails(llama, tmp_path):
    d = shutil.copytree(llama[0], tmp_path / "recorded")
    record(d, "hf-awq", {}, {})
    assert api.load(d).linears  # matching: read
    tamper(d / "model-00002-of-00003.safetensors")
    _refused(d, tmp_path, "model-00002-of-00003.safetensors does not match the sha256")
