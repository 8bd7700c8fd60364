"""AWQ checkpoints written by other tools (AutoAWQ, TheBloke-era repos, transformers/gptqmodel):
what can be read exactly, and a refusal with the reason for what cannot.

``hf_awq.read`` calls, in order:

1. :func:`settings`: the ``quantization_config`` of config.json, or AutoAWQ < 0.2's
   ``quant_config.json``; refuses layouts other than GEMM (GEMV, GEMVFast/llm-awq, Marlin,
   ExLlama, IPEX store other bits in other places), bits != 4 and act-order (``desc_act``).
2. :func:`check_architecture`: the ``architectures`` class is a row of ``awqconv/archs.py``.
3. :func:`refuse_pickles`: weights only in ``*.bin``/``*.pt`` are never unpickled.
4. :func:`rename_legacy`: module paths transformers 4.x used (Mixtral's ``block_sparse_moe``,
   ``w1/w3/w2``) become the names awqconv's quantizer gives the same modules.
5. :func:`check_against_model`: every parameter transformers' model of this config has is present,
   with its shape (MoE experts one by one), and nothing else is; AutoAWQ's dropped tied
   ``lm_head.weight`` is fine.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import archs
from ..errors import CorruptFileError, FormatConstraintError, InputError, UnsupportedArchitecture
from ..packed import PackedLinear, bitwise_equal


LEGACY_CONFIG = "quant_config.json"  # AutoAWQ < 0.2 (2024-02) wrote its settings here
GEMM = "gemm"
# layouts AutoAWQ / llm-awq / transformers name in "version" (or "format"), and why they are not GEMM
OTHER_LAYOUTS = {
    "gemv": "AutoAWQ's GEMV layout (qweight [out, in/8] packed along the input, zeros padded per 8 groups)",
    "gemv_fast": "AutoAWQ's GEMVFast / llm-awq v2 layout (int16 qweight interleaved for its kernel, float zeros)",
    "llm-awq": "llm-awq's v2 layout (int16 qweight interleaved for its kernel, float scaled zeros)",
    "marlin": "AutoAWQ's Marlin layout (16x16 tiles permuted for the Marlin kernel, symmetric, no zeros)",
    "exllama": "an ExLlama load-time layout (repacked from GEMM by the loader)",
    "ipex": "an IPEX load-time layout (repacked from GEMM by the loader)",
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# buffers older transformers saved that every current model recomputes
_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")
# module-path renames from transformers 4.x checkpoints (what AutoAWQ saved) to the names the
# quantizer gives transformers 5 modules, per architecture
LEGACY_NAMES: dict[str, tuple[tuple[re.Pattern[str], str], ...]] = {
    "MixtralForCausalLM": (
        (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w1\."), r".mlp.experts.\1.gate_proj."),
        (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w3\."), r".mlp.experts.\1.up_proj."),
        (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w2\."), r".mlp.experts.\1.down_proj."),
        (re.compile(r"\.block_sparse_moe\.gate\."), r".mlp.gate."),
    ),
}
# transformers 5 fused experts -> the per-expert linears they hold (gate rows first in gate_up_proj)
_FUSED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class AwqSettings:
    bits: int
    group_size: int  # -1: one group per row
    zero_point: bool
    modules_to_not_convert: tuple[str, ...]
    source: str  # the file the settings came from


# -- settings ---------------------------------------------------------------------------------


def awq_quant_config(path: Path, config: Any) -> tuple[dict[str, Any], str] | None:
    """``(quantization settings, the file holding them)`` of an AWQ checkpoint, else None."""
    q = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(q, dict):
        method = str(q.get("quant_method", "")).lower()
        return (q, "config.json") if method == "awq" else None
    legacy = Path(path) / LEGACY_CONFIG
    if not legacy.is_file():
        return None
    try:
        q = json.loads(legacy.read_text())
    except (OSError, ValueError):
        return None
    # AutoAWQ's own keys: a GPTQ quantize_config.json or other tools' files do not have these
    if isinstance(q, dict) and {"w_bit", "q_group_size"} <= set(q):
        return q, LEGACY_CONFIG
    return None


def settings(path: Path, config: Any) -> AwqSettings:
    """The AWQ settings of ``path``, or the reason the checkpoint cannot be read exactly."""
    found = awq_quant_config(path, config)
    if found is None:
        raise InputError(f"{path}/config.json has no AWQ quantization_config (quant_method 'awq')")
    q, source = found
    where = f"{path}/{source}"
    layout = str(q.get("version") or q.get("format") or GEMM).lower()
    if str(q.get("backend") or "").lower() == "llm-awq":  # transformers 5 spelling of llm-awq's layout
        layout = "llm-awq"
    if layout != GEMM:
        what = OTHER_LAYOUTS.get(layout, f"an AWQ layout awqconv does not know ({layout!r})")
        raise FormatConstraintError(
            f"{where} declares version {layout!r}: {what}. awqconv reads AutoAWQ's GEMM layout only, "
            "bit for bit; use the GEMM version of this model, or quantize the float model with `awqconv quantize`"
        )
    bits = _int(q, ("bits", "w_bit"), 4, where)
    if bits != 4:
        raise FormatConstraintError(
            f"{where} declares {bits}-bit weights; the AWQ GEMM layout awqconv reads holds 4-bit weights only"
        )
    group_size = _int(q, ("group_size", "q_group_size"), 128, where)
    if group_size != -1 and group_size <= 0:
        raise CorruptFileError(f"{where}: group_size {group_size} is neither positive nor -1; fix the config")
    if q.get("desc_act"):
        raise FormatConstraintError(
            f"{where} sets desc_act (act-order): the input channels are permuted per layer, which the AWQ "
            "GEMM layout cannot express; use a checkpoint without act-order"
        )
    skipped = q.get("modules_to_not_convert") or ()
    if not isinstance(skipped, (list, tuple)) or not all(isinstance(m, str) for m in skipped):
        raise CorruptFileError(f"{where}: modules_to_not_convert must be a list of names, got {skipped!r}")
    return AwqSettings(bits, group_size, bool(q.get("zero_point", True)), tuple(skipped), source)


def _int(q: dict[str, Any], keys: tuple[str, ...], default: int, where: str) -> int:
    v = next((q[k] for k in keys if q.get(k) is not None), default)
    if type(v) is not int:
        raise CorruptFileError(f"{where}: {keys[0]} must be an integer, got {v!r}")
    return v


def check_architecture(config: dict[str, Any], path: Path) -> archs.Arch:
    names = config.get("architectures") or []
    row = archs.first_known(names)
    if row is None:
        raise UnsupportedArchitecture(
            f"{path}: architecture {', '.join(names) or '(none in config.json)'} is not one awqconv knows; "
            f"supported: {', '.join(archs.names())}"
        )
    return row


def refuse_pickles(path: Path) -> None:
    """InputError for a directory whose weights exist only as pickles (never unpickled here)."""
    pickles = sorted(p.name for p in Path(path).iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise InputError(
            f"{path} holds its weights as pickles ({', '.join(pickles[:3])}), which awqconv never loads "
            "(unpickling a file can run code); convert them to safetensors where you trust the file, e.g. "
            "`save_file(torch.load(f, weights_only=True), 'model.safetensors', metadata={'format': 'pt'})` "
            "with safetensors.torch.save_file, then run again"
        )
    raise InputError(f"{path} has no model*.safetensors weights; is the download complete?")


# -- names ------------------------------------------------------------------------------------


def rename_legacy(tensors: dict[str, Tensor], arch: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``tensors`` under the quantizer's module names, and {new module: old module} of what moved."""
    rules = LEGACY_NAMES.get(arch, ())
    if not rules:
        return tensors, {}
    out: dict[str, Tensor] = {}
    moved: dict[str, str] = {}
    for key, t in tensors.items():
        new = key
        for pattern, repl in rules:
            new = pattern.sub(repl, new)
        if new in out:
            raise CorruptFileError(f"{key} and another tensor both name {new}; the checkpoint mixes naming schemes")
        out[new] = t
        if new != key:
            moved[new.rsplit(".", 1)[0]] = key.rsplit(".", 1)[0]
    return out, moved


def dense_linears(dense: dict[str, Tensor], layers_path: str) -> list[str]:
    """Module names of 2-D float weights inside the decoder blocks: linears kept in 16-bit."""
    return sorted(
        k.removesuffix(".weight") for k, t in dense.items()
        if k.startswith(layers_path + ".") and k.endswith(".weight") and t.ndim == 2 and t.is_floating_point()
    )


# -- completeness -----------------------------------------------------------------------------


def check_against_model(path: Path, hf_config: dict[str, Any], linears: dict[str, PackedLinear],
                        dense: dict[str, Tensor]) -> None:
    """CorruptFileError naming the first missing, misshaped or unplaceable tensor (and how many more),
    judged against the parameters transformers' model of ``hf_config`` has. Drops what a loader
    ignores from ``dense``: an ``lm_head.weight`` the config ties (equal to the embedding) and old
    rotary buffers."""
    expected, tied = _expected_shapes(hf_config, path)
    for key in [k for k in dense if _IGNORED.search(k)]:
        del dense[key]
    if tied and "lm_head.weight" in dense:
        embed = dense.get("model.embed_tokens.weight")
        if embed is None or not bitwise_equal(dense["lm_head.weight"], embed):
            raise FormatConstraintError(
                f"{path}: config.json ties lm_head to the input embedding (tie_word_embeddings) but "
                "lm_head.weight differs from it; a loader would use the embedding: fix tie_word_embeddings"
            )
        del dense["lm_head.weight"]
    got: dict[str, tuple[int, ...]] = {k: tuple(t.shape) for k, t in dense.items()}
    for name, p in linears.items():
        got[f"{name}.weight"] = (p.out_features, p.in_features)
        if p.bias is not None:
            got[f"{name}.bias"] = tuple(p.bias.shape)
    # a decoder linear may be stored quantized or, when not converted, dense
    row = archs.first_known(hf_config.get("architectures") or [])
    blocks = (row.awq.layers_path if row else "model.layers") + "."
    missing = [f"{k[:-7]}.qweight (or .weight)" if k.startswith(blocks) and k.endswith(".weight")
               and len(expected[k]) == 2 else k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    wrong = [f"{k} {got[k]} (the model has {expected[k]})" for k in expected if k in got and got[k] != expected[k]]
    arch = (hf_config.get("architectures") or ["?"])[0]
    for what, items, fix in (
        ("is missing", missing, "the checkpoint is incomplete: re-download or re-export it"),
        ("has the wrong shape", wrong, "config.json does not describe these weights"),
        ("has no place in the model", extra, "config.json does not describe these weights"),
    ):
        if items:
            more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
            raise CorruptFileError(f"{path}: {items[0]}{more} {what} for a {arch}; {fix}")


def _expected_shapes(hf_config: dict[str, Any], path: Path) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Parameter name -> shape of the transformers model of ``hf_config`` (fused experts listed per
    expert linear), and whether it ties lm_head to the embedding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    try:
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptFileError(f"transformers cannot build a model from {path}/config.json ({first}); fix the config") from None
    tied = bool(getattr(config, "tie_word_embeddings", False))
    shapes: dict[str, tuple[int, ...]] = {}
    for key, t in model.state_dict().items():
        m = _FUSED.match(key)
        if m is None:
            shapes[key] = tuple(t.shape)
        elif m.group(2) == "gate_up_proj":  # [E, 2I, H]: gate rows, then up rows
            n, rows, cols = t.shape
            for e in range(n):
                shapes[f"{m.group(1)}.{e}.gate_proj.weight"] = shapes[f"{m.group(1)}.{e}.up_proj.weight"] = (rows // 2, cols)
        else:  # down_proj [E, H, I]
            for e in range(t.shape[0]):
                shapes[f"{m.group(1)}.{e}.down_proj.weight"] = tuple(t.shape[1:])
    if tied:
        shapes.pop("lm_head.weight", None)
    return shapes, tied
