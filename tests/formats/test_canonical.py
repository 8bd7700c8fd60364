"""The canonical artifact: bit-exact round trips of every QuantizedModel field, the on-disk layout
the manifest promises, and clear CorruptFileErrors for damaged directories."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from awqconv.errors import CorruptFileError, InputError
from awqconv.formats import ExportRequest, Target, canonical, detect_format, hf_awq
from awqconv.model import QuantizedModel, ScaleRecord, SearchResults
from awqconv.packed import bitwise_equal

ASSETS = {
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": b'{"chat_template": "{{ messages }}", "eos_token": "</s>"}\n',
    "generation_config.json": b'{"do_sample": false, "max_new_tokens": 32}',
    "chat_template.jinja": "{% for m in messages %}\u00e9{{ m }}{% endfor %}".encode(),
}


def _rich(qm: QuantizedModel) -> QuantizedModel:
    """``qm`` plus search results, prescaled weights (fp32, kept on disk), assets and nested provenance."""
    gen = torch.Generator().manual_seed(7)
    names = list(qm.linears)
    search = SearchResults(
        scales=[
            ScaleRecord("model.layers.0.input_layernorm", tuple(names[:3]), torch.rand(64, generator=gen),
                        0.35, 1.25, 0.5),
            ScaleRecord("model.layers.0.self_attn.v_proj", (names[3],), torch.rand(64, generator=gen),
                        -1.0, float("inf"), 0.0),
        ],
        clips={n: torch.rand(qm.linears[n].out_features, qm.linears[n].n_groups, generator=gen)
               for n in names[:2]},
    )
    prescaled = {n: torch.randn(p.out_features, p.in_features, generator=gen) for n, p in qm.linears.items()}
    return dataclasses.replace(
        qm,
        search=search,
        prescaled=prescaled,
        keep_prescaled=True,
        assets=dict(ASSETS),
        provenance={**qm.provenance, "command": "awqconv quantize x", "calibration": {"n": 3, "sha": "ab"}},
    )


def _write(qm: QuantizedModel, tmp_path: Path, name: str = "c") -> Path:
    out = tmp_path / name
    out.mkdir()
    canonical.write(qm, out)
    return out


def assert_same_model(a: QuantizedModel, b: QuantizedModel) -> None:
    assert a.hf_config == b.hf_config
    assert a.quant_config == b.quant_config
    assert a.provenance == b.provenance
    assert a.assets == b.assets
    assert list(a.linears) == list(b.linears)
    for name, p in a.linears.items():
        assert p.equal(b.linears[name]), name
    assert list(a.dense) == list(b.dense)
    for key, t in a.dense.items():
        assert bitwise_equal(t, b.dense[key]), key
    assert len(a.search.scales) == len(b.search.scales)
    for r, s in zip(a.search.scales, b.search.scales, strict=True):
        assert (r.prev_op, r.layers, r.alpha, r.loss_before, r.loss_after) == (
            s.prev_op, s.layers, s.alpha, s.loss_before, s.loss_after)
        assert bitwise_equal(r.scales, s.scales)
    assert list(a.search.clips) == list(b.search.clips)
    for name, t in a.search.clips.items():
        assert bitwise_equal(t, b.search.clips[name])


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(group_size=-1, zero_point=False, attention_bias=True),
        dict(bits=3, group_size=16, scale_dtype=torch.bfloat16, tie_word_embeddings=True),
        dict(bits=8, group_size=64),
        dict(bits=2, group_size=32, zero_point=False),
    ],
    ids=["w4g32", "w4-per-channel-sym-bias", "w3g16-bf16-tied", "w8g64", "w2g32-sym"],
)
def test_round_trip_is_bit_exact(make_tiny_llama_qm, tmp_path, kw):
    qm = _rich(make_tiny_llama_qm(**kw))
    out = _write(qm, tmp_path)
    back = canonical.read(out)
    assert_same_model(qm, back)
    # prescaled weights are stored in the scale dtype
    assert back.prescaled is not None and list(back.prescaled) == list(qm.prescaled)
    for name, t in qm.prescaled.items():
        assert bitwise_equal(back.prescaled[name], t.to(qm.dtype))
    # the dequantized model is the same, so no consumer can tell the difference
    for k, v in qm.dequantized_state_dict().items():
        assert bitwise_equal(back.dequantized_state_dict()[k], v), k


def test_layout_on_disk(tiny_qm, tmp_path):
    qm = _rich(tiny_qm)
    out = _write(qm, tmp_path)
    names = {p.name for p in out.iterdir()}
    assert names == {"awqconv.json", "config.json", "model.safetensors", "search.safetensors",
                     "prescaled.safetensors", *ASSETS}
    for fname, data in ASSETS.items():
        assert (out / fname).read_bytes() == data
    assert json.loads((out / "config.json").read_text()) == qm.hf_config

    m = json.loads((out / "awqconv.json").read_text())
    assert (m["format"], m["format_version"], m["scale_dtype"]) == ("awqconv-canonical", 1, "float16")
    assert m["quant_config"] == qm.quant_config.to_dict()
    name = "model.layers.1.mlp.down_proj"
    assert m["linears"][name] == {"out_features": 64, "in_features": 128, "bits": 4,
                                  "group_size": 32, "has_bias": False}
    assert m["dense"] == list(qm.dense)
    assert [r["prev_op"] for r in m["search"]["scales"]] == [r.prev_op for r in qm.search.scales]
    assert m["search"]["scales"][0]["layers"] == list(qm.search.scales[0].layers)
    assert m["search"]["clips"] == list(qm.search.clips)
    assert m["assets"] == sorted(ASSETS) and m["prescaled"] is True
    assert m["provenance"]["calibration"] == {"n": 3, "sha": "ab"}

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
        assert f.get_tensor(f"{name}.qweight").dtype == torch.uint8
        assert tuple(f.get_tensor(f"{name}.qweight").shape) == (64, 64)  # 128 inputs, 2 per byte
        assert f.get_tensor(f"{name}.zeros").dtype == torch.uint8
        assert tuple(f.get_tensor(f"{name}.scales").shape) == (64, 4)
        assert "model.embed_tokens.weight" in f.keys() and f"{name}.weight" not in f.keys()
    search = load_file(str(out / "search.safetensors"))
    assert set(search) == {"scales.0", "scales.1", *(f"clip.{n}" for n in qm.search.clips)}
    assert load_file(str(out / "prescaled.safetensors"))[name].dtype == torch.float16


def test_no_prescaled_file_without_prescaled_weights(tiny_qm, tmp_path):
    out = _write(tiny_qm, tmp_path)
    assert not list(out.glob("prescaled*"))
    back = canonical.read(out)
    assert back.prescaled is None and back.assets == {} and back.search.scales == []


def test_tensors_sharing_storage_are_all_written(tiny_qm, tmp_path):
    emb = tiny_qm.dense["model.embed_tokens.weight"]
    qm = dataclasses.replace(tiny_qm, dense={**tiny_qm.dense, "lm_head.weight": emb})
    back = canonical.read(_write(qm, tmp_path))
    assert bitwise_equal(back.dense["lm_head.weight"], emb)
    assert bitwise_equal(back.dense["model.embed_tokens.weight"], emb)


def test_mixed_bits_and_odd_widths(make_packed, tmp_path, tiny_qm):
    linears = {
        "a": make_packed(8, 40, 8, bits=3, dtype=torch.bfloat16, seed=1),
        "b": make_packed(5, 24, 24, bits=8, dtype=torch.bfloat16, bias=True, seed=2),
        "c": make_packed(3, 7, 7, bits=5, dtype=torch.bfloat16, seed=3),
    }
    qm = QuantizedModel(hf_config={"architectures": ["X"]}, quant_config=tiny_qm.quant_config,
                        linears=linears, dense={"norm.weight": torch.ones(3)})
    back = canonical.read(_write(qm, tmp_path))
    for n, p in linears.items():
        assert back.linears[n].equal(p)


def test_detect_and_plan(tiny_qm, tmp_path):
    out = _write(tiny_qm, tmp_path)
    assert canonical.detect(out) and detect_format(out) == "canonical"
    other = tmp_path / "h"
    other.mkdir()
    hf_awq.write(tiny_qm, other)
    assert not canonical.detect(other) and not canonical.detect(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "awqconv.json").write_text("{not json")
    assert not canonical.detect(tmp_path / "bad")
    req = ExportRequest(Target("canonical"), tiny_qm.hf_config, bits=3, group_size=-1, zero_point=False,
                        scale_dtype=torch.bfloat16, linear_shapes={"x": (7, 13)})
    assert canonical.plan(req) == []


def test_variant_and_reserved_assets_are_refused(tiny_qm, tmp_path):
    with pytest.raises(InputError, match="no variants"):
        canonical.write(tiny_qm, tmp_path, variant="x")
    for bad in ("config.json", "../escape.txt", "model-00001-of-00002.safetensors"):
        d = tmp_path / f"d{len(bad)}"
        d.mkdir()
        with pytest.raises(InputError, match="asset"):
            canonical.write(dataclasses.replace(tiny_qm, assets={bad: b"x"}), d)


# -- corruption -------------------------------------------------------------------------------

TARGET = "model.layers.0.self_attn.k_proj"


def _rewrite(out: Path, edit) -> None:
    f = out / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.pop(f"{TARGET}.scales"), f"{TARGET}.scales listed in awqconv.json is missing"),
        (lambda t: t.pop("model.norm.weight"), "model.norm.weight listed in awqconv.json is missing"),
        (lambda t: t.update({f"{TARGET}.qweight": t[f"{TARGET}.qweight"][:, :-1].clone()}),
         rf"{TARGET}.qweight has shape \(32, 31\)"),
        (lambda t: t.update({f"{TARGET}.zeros": t[f"{TARGET}.zeros"].to(torch.int32)}),
         f"{TARGET}.zeros must be uint8"),
        (lambda t: t.update({f"{TARGET}.scales": t[f"{TARGET}.scales"].to(torch.bfloat16)}),
         f"{TARGET}.scales is torch.bfloat16 but awqconv.json says float16"),
        (lambda t: t.update({"stray.weight": torch.zeros(2)}), "stray.weight"),
    ],
    ids=["missing-linear-tensor", "missing-dense", "wrong-shape", "wrong-dtype", "wrong-scale-dtype",
         "extra"],
)
def test_damaged_tensors_are_named(tiny_qm, tmp_path, edit, match):
    out = _write(tiny_qm, tmp_path)
    _rewrite(out, edit)
    with pytest.raises(CorruptFileError, match=match):
        canonical.read(out)


def test_truncated_files_raise_corrupt_file_error(tiny_qm, tmp_path):
    for fname in ("model.safetensors", "search.safetensors"):
        out = _write(_rich(tiny_qm), tmp_path, name=fname)
        data = (out / fname).read_bytes()
        (out / fname).write_bytes(data[: len(data) // 2])
        with pytest.raises(CorruptFileError, match=f"{fname}.*truncated"):
            canonical.read(out)


def test_missing_files_and_foreign_manifests(tiny_qm, tmp_path):
    out = _write(_rich(tiny_qm), tmp_path)
    (out / "tokenizer.json").unlink()
    with pytest.raises(CorruptFileError, match="asset tokenizer.json"):
        canonical.read(out)
    (out / "tokenizer.json").write_bytes(ASSETS["tokenizer.json"])
    (out / "prescaled.safetensors").unlink()
    with pytest.raises(CorruptFileError, match="prescaled"):
        canonical.read(out)

    out2 = _write(tiny_qm, tmp_path, "c2")
    (out2 / "model.safetensors").unlink()
    with pytest.raises(CorruptFileError, match="no model"):
        canonical.read(out2)

    out3 = _write(tiny_qm, tmp_path, "c3")
    m = json.loads((out3 / "awqconv.json").read_text())
    (out3 / "awqconv.json").write_text(json.dumps({**m, "format_version": 2}))
    with pytest.raises(InputError, match="format_version 2"):
        canonical.read(out3)
    del m["linears"]
    (out3 / "awqconv.json").write_text(json.dumps(m))
    with pytest.raises(CorruptFileError, match="lacks field 'linears'"):
        canonical.read(out3)
