"""GGUF export for llama.cpp / Ollama / LM Studio: one ``<model>-<variant>.gguf`` per target.

``gguf`` (= ``gguf:q4_1-awq``) is the exact transplant: canonical 4-bit groups become Q4_1 blocks
with the same integer codes, and ``read()`` recovers the canonical model bit for bit. Every other
variant re-quantizes the AWQ-prescaled float weights (``qm.prescaled``: in memory when the
quantizer ran in this process, or stored by ``quantize --keep-prescaled``; the dequantized
canonical weights otherwise, logged) with gguf-py (q4_0 ... q8_0, f16, bf16, f32) or llama.cpp's own
quantizer (K-quants, gguf_kquant.py). Tensors are produced and written one at a time.
K-quants use the importance matrix the quantizer collected (``qm.importance``) when there is one,
and save it beside the .gguf as ``<model>.imatrix`` (llama.cpp's imatrix file, gguf_imatrix.py).
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from ..errors import FormatConstraintError, InputError
from ..model import QuantizedModel
from ..packed import PackedLinear
from .base import ExportRequest
from .gguf_imatrix import save_for_kquant
from .gguf_kquant import report_fallbacks, write_kquant
from .gguf_read import detect, read, tensor_types
from .gguf_arch import add_model_metadata, arch_problems, check_arch, llama3_rope_freqs, tied_embeddings
from .gguf_meta import add_tokenizer_metadata, tokenizer_meta
from .gguf_tensors import (
    TRANSPLANT,
    VARIANTS,
    Variant,
    encode,
    fitting_type,
    gguf_name,
    gguf_slot,
    is_offset_norm,
    nbytes,
    permute_rows,
    rope_heads,
    to_q4_1,
    transplant_check,
)

NAME = "gguf"
T = GGMLQuantizationType
log = logging.getLogger(__name__)

_TORCH_TO_GGML = {torch.float16: T.F16, torch.bfloat16: T.BF16, torch.float32: T.F32}
_GGML_TO_TORCH = {v: k for k, v in _TORCH_TO_GGML.items()}
_SKIP_KEYS = re.compile(r"rotary_emb\.inv_freq$")
# llama.cpp takes a model whose general.name holds "phi3"/"phi-3" for Phi-3 and looks these tokens up
_PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)
_PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


@dataclass
class GGUFWriteResult:
    """What write() did: the file, where the float weights came from, and every type fallback."""

    path: Path
    variant: str
    weights_source: str  # "canonical integers" | "prescaled" | "dequantized canonical"
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type name -> tensor count
    fallbacks: list[str] = field(default_factory=list)  # "blk.0.attn_q.weight: q4_k -> q5_0 (576 % 256)"
    warnings: list[str] = field(default_factory=list)
    imatrix: Path | None = None  # the importance matrix a K-quant was made with, saved beside it


@dataclass
class _Job:
    name: str
    shape: tuple[int, ...]  # numpy/HF order
    ggml_type: T
    produce: Callable[[], np.ndarray]


def parse_variant(variant: str | None) -> Variant:
    key = (variant or TRANSPLANT).lower().replace("-", "_").replace("q4_1_awq", TRANSPLANT)
    if key not in VARIANTS:
        raise InputError(f"unknown GGUF variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return VARIANTS[key]


# ---------------------------------------------------------------------------------------------
# plan

def plan(request: ExportRequest) -> list[str]:
    """Problems that would make write() fail for this request; no side effects."""
    try:
        v = parse_variant(request.target.variant)
    except InputError as e:
        return [str(e)]
    problems = arch_problems(request.hf_config)
    if v.transplant:
        if request.bits != 4:
            problems.append(
                f"gguf:{TRANSPLANT} carries 4-bit codes; this model is {request.bits}-bit "
                "(export gguf:q8_0 / gguf:q5_0 instead)"
            )
        for name, (_, n_in) in request.linear_shapes.items():
            g = n_in if request.group_size == -1 else request.group_size
            if g % 32:
                problems.append(
                    f"gguf:{TRANSPLANT}: {name} has group size {g}, not a multiple of 32, so its groups "
                    "cannot become Q4_1 blocks; use --group-size 32/64/128 or export gguf:q4_0"
                )
                break
        if request.scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            problems.append(f"gguf:{TRANSPLANT}: scale dtype {request.scale_dtype} is not a float type")
    if v.kquant and not _have_llama_cpp():
        problems.append(
            f"gguf:{v.name} is quantized by llama.cpp's own K-quant code; install llama-cpp-python "
            "(CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python) or export gguf:q4_0"
        )
    return problems


def uses_prescaled(variant: str | None) -> bool:
    """Every variant but the exact transplant re-quantizes the prescaled float weights."""
    return not parse_variant(variant).transplant


def _have_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# ---------------------------------------------------------------------------------------------
# write

def model_name(qm: QuantizedModel) -> str:
    raw = (
        qm.provenance.get("model_name")
        or qm.provenance.get("source_model")
        or qm.provenance.get("source")
        or qm.hf_config.get("_name_or_path")
        or "model"
    )
    base = str(raw).rstrip("/").split("/")[-1].split(":")[-1]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.")
    return slug or "model"


def output_path(qm: QuantizedModel, out_dir: Path, variant: str | None) -> Path:
    return Path(out_dir) / f"{model_name(qm)}-{parse_variant(variant).name}.gguf"


def write(qm: QuantizedModel, out_dir: Path, variant: str | None = None) -> GGUFWriteResult:
    """Write ``<model>-<variant>.gguf`` into ``out_dir``; return what was written and any fallback."""
    v = parse_variant(variant)
    arch, permute = check_arch(qm.hf_config)
    shapes = _Shapes.of(qm, check_transplant=v.transplant)
    tok = tokenizer_meta(qm.assets, qm.hf_config)
    _check_name(model_name(qm), tok.tokens)
    path = output_path(qm, out_dir, variant)
    if v.kquant:
        inter = VARIANTS["bf16" if shapes.scale_dtype == torch.bfloat16 else "f16"]
        imx = save_for_kquant(qm, out_dir, model_name(qm))  # None without calibration statistics
        try:
            result = write_kquant(path, v, lambda p: _write_file(qm, shapes, p, inter, arch, permute, tok),
                                  imx.weights if imx else None, imx.kv if imx else None)
        except BaseException:
            if imx:
                imx.path.unlink(missing_ok=True)
            raise
        result.imatrix = imx.path if imx else None
        report_fallbacks(v.name, result.fallbacks)
        return result
    return _write_file(qm, shapes, path, v, arch, permute, tok)


def _check_name(name: str, tokens: list[str]) -> None:
    if _PHI3_NAME.search(name):
        lacking = [t for t in _PHI3_TOKENS if t not in set(tokens)]
        if lacking:
            raise FormatConstraintError(
                f"gguf: llama.cpp treats a model named {name!r} as Phi-3 and fails to load it unless the "
                f"vocabulary holds {', '.join(_PHI3_TOKENS)}; this one lacks {', '.join(lacking)}: "
                "give the model a name without 'phi3' (its directory or provenance model_name)"
            )


def _weights_source(qm: QuantizedModel, v: Variant) -> tuple[str, list[str]]:
    if v.transplant:
        return "canonical integers", []
    if qm.prescaled is not None and all(n in qm.prescaled for n in qm.linears):
        return "prescaled", []
    msg = (
        "AWQ-prescaled float weights are not available (the quantizer did not run in this process "
        "and the canonical artifact has no prescaled*.safetensors); quantizing the dequantized "
        f"canonical weights to gguf:{v.name} instead, which re-rounds already-rounded values. "
        f"For the prescaled weights, quantize with --to canonical,gguf:{v.name} in one run, or with "
        "--keep-prescaled to store them in the canonical artifact"
    )
    return "dequantized canonical", [msg]


def _write_file(qm: QuantizedModel, shapes: _Shapes, path: Path, v: Variant, arch: str, permute: bool,
                tok) -> GGUFWriteResult:
    source, warnings = _weights_source(qm, v)
    for w in warnings:
        log.warning(w)
    result = GGUFWriteResult(path=path, variant=v.name, weights_source=source, warnings=warnings)
    jobs = _jobs(qm, shapes, v, permute, result)
    n_vocab = int(qm.hf_config["vocab_size"])

    w = GGUFWriter(str(path), arch)
    w.add_name(model_name(qm))
    w.add_quantized_by("awqconv")
    w.add_file_type(int(v.file_type))
    w.add_quantization_version(2)
    add_model_metadata(w, qm.hf_config, n_vocab)
    add_tokenizer_metadata(w, tok)
    _add_provenance(w, qm, shapes, v, source)
    for j in jobs:
        w.add_tensor_info(j.name, j.shape, np.dtype(np.float32), nbytes(j.shape, j.ggml_type), j.ggml_type)
    counts = Counter(j.ggml_type.name for j in jobs)
    result.tensor_types = dict(counts)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for j in _progress(jobs, path.name):
            arr = j.produce()
            if arr.nbytes != nbytes(j.shape, j.ggml_type):
                raise FormatConstraintError(f"gguf: {j.name} encoded to {arr.nbytes} bytes, expected "
                                            f"{nbytes(j.shape, j.ggml_type)}")
            w.write_tensor_data(arr)
            del arr
    except BaseException:
        w.close()
        path.unlink(missing_ok=True)
        raise
    w.close()
    report_fallbacks(v.name, result.fallbacks)
    return result


def _progress(jobs: list[_Job], label: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        return jobs
    return tqdm(jobs, desc=f"writing {label}", unit="tensor", disable=None, leave=False)


@dataclass
class _Shapes:
    """Shapes and dtypes looked up once (tensors may be generated lazily on each access)."""

    dense: dict[str, tuple[tuple[int, ...], torch.dtype]]
    linears: dict[str, tuple[int, int, int, bool]]  # out, in, group, has bias
    scale_dtype: torch.dtype

    @classmethod
    def of(cls, qm: QuantizedModel, check_transplant: bool = False) -> _Shapes:
        dense = {}
        for k in qm.dense:
            t = qm.dense[k]
            dense[k] = (tuple(t.shape), t.dtype)
            del t
        linears, sdt = {}, torch.float16
        for n in qm.linears:
            p = qm.linears[n]
            if check_transplant:
                transplant_check(p, n)
            linears[n] = (p.out_features, p.in_features, p.group_size, p.bias is not None)
            sdt = p.scales.dtype
            del p
        return cls(dense, linears, sdt)


def _add_provenance(w: GGUFWriter, qm: QuantizedModel, shapes: _Shapes, v: Variant, source: str) -> None:
    try:
        from importlib.metadata import version

        ver = version("awqconv")
    except Exception:  # noqa: BLE001 - not installed as a distribution (source checkout)
        ver = "dev"
    qc = qm.quant_config.to_dict()
    w.add_string("awqconv.version", ver)
    w.add_string("awqconv.variant", v.name)
    w.add_string("awqconv.weights_source", source)
    w.add_string(
        "awqconv.awq",
        f"w_bit={qc['w_bit']} group_size={qc['group_size']} zero_point={qc['zero_point']} "
        f"method={qc['method']}",
    )
    w.add_string("awqconv.quant_config", json.dumps(qc, sort_keys=True))
    w.add_string("awqconv.hf_config", json.dumps(qm.hf_config, sort_keys=True))
    if qm.provenance:
        w.add_string("awqconv.provenance", json.dumps(qm.provenance, sort_keys=True, default=str))
    if v.transplant:  # everything read() needs to rebuild the canonical model
        groups = {n: g for n, (_, _, g, _) in shapes.linears.items()}
        w.add_string("awqconv.linear_groups", json.dumps(groups, sort_keys=True))
        w.add_string("awqconv.scale_dtype", str(shapes.scale_dtype).removeprefix("torch."))
        dtypes = {k: str(dt).removeprefix("torch.") for k, (_, dt) in shapes.dense.items()}
        w.add_string("awqconv.dense_dtypes", json.dumps(dtypes, sort_keys=True))
        assets = {k: base64.b64encode(b).decode("ascii") for k, b in qm.assets.items()}
        w.add_string("awqconv.assets", json.dumps(assets, sort_keys=True))
        # llama.cpp gets w + 1 for (1 + w) norms, which does not round-trip exactly: keep the gains themselves
        offset = {k: base64.b64encode(qm.dense[k].contiguous().view(torch.uint8).numpy().tobytes()).decode("ascii")
                  for k in shapes.dense if is_offset_norm(k, qm.architecture)}
        if offset:
            w.add_string("awqconv.offset_norms", json.dumps(offset, sort_keys=True))


def _jobs(qm: QuantizedModel, shapes: _Shapes, v: Variant, permute: bool, result: GGUFWriteResult) -> list[_Job]:
    """One job per GGUF tensor, in llama.cpp's usual order; nothing is computed yet."""
    cfg, arch = qm.hf_config, qm.architecture
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    tied = tied_embeddings(cfg)
    heads = (lambda key: rope_heads(key, n_head, n_kv, arch) if permute else None)

    dense_keys = [k for k in shapes.dense if not _SKIP_KEYS.search(k)]
    if tied:
        dense_keys = [k for k in dense_keys if k != "lm_head.weight"]
    unknown = [k for k in dense_keys if gguf_name(k, arch) is None]
    unknown += [n for n in shapes.linears if gguf_name(f"{n}.weight", arch) is None]
    if unknown:
        raise FormatConstraintError(
            f"gguf: no llama.cpp tensor name for {unknown[:3]}{' ...' if len(unknown) > 3 else ''}; "
            f"this model has modules llama.cpp's {arch} layout does not hold"
        )

    jobs: list[_Job] = []
    for key in dense_keys:
        shape, dtype = shapes.dense[key]
        jobs.append(_dense_job(qm, key, shape, dtype, v, heads(key), result))
    freqs = llama3_rope_freqs(cfg)
    if freqs is not None:
        jobs.append(_Job("rope_freqs.weight", freqs.shape, T.F32, lambda f=freqs: f))
    for gname, (names, stacked) in _linear_groups(shapes, arch).items():
        out, n_in, _, has_bias = shapes.linears[names[0]]
        shape = (len(names), out, n_in) if stacked else (out, n_in)
        jobs.append(_linear_job(qm, gname, names, shape, v, heads(names[0]), result))
        if has_bias:
            jobs.append(_bias_job(qm, names[0], out, heads(names[0])))
    order = {"token_embd": 0, "rope_freqs": 1, "blk": 2, "output_norm": 3, "output": 4}

    def sort_key(j: _Job) -> tuple:
        parts = j.name.split(".")
        if parts[0] == "blk":
            return (2, int(parts[1]), j.name)
        return (order.get(parts[0], 5), 0, j.name)

    return sorted(jobs, key=sort_key)


def _linear_groups(shapes: _Shapes, arch: str) -> dict[str, tuple[list[str], bool]]:
    """GGUF weight name -> (the HF linears it holds, stacked): one, or every expert of a layer in order."""
    slots: dict[str, dict[int | None, str]] = {}
    for name in shapes.linears:
        gname, expert = gguf_slot(f"{name}.weight", arch)
        if expert in slots.setdefault(gname, {}):
            raise FormatConstraintError(f"gguf: {name} and {slots[gname][expert]} both map to {gname}")
        slots[gname][expert] = name
    groups = {}
    for gname, by_expert in slots.items():
        if None in by_expert:
            groups[gname] = ([by_expert[None]], False)
            continue
        if sorted(by_expert) != list(range(len(by_expert))):
            raise FormatConstraintError(f"gguf: {gname} stacks experts {sorted(by_expert)}; llama.cpp needs 0..n-1")
        names = [by_expert[e] for e in range(len(by_expert))]
        if len({shapes.linears[n] for n in names}) != 1:
            raise FormatConstraintError(f"gguf: the experts stacked into {gname} differ in shape, group or bias")
        if shapes.linears[names[0]][3]:
            raise FormatConstraintError(f"gguf: llama.cpp's stacked expert tensors hold no biases ({gname})")
        groups[gname] = (names, True)
    return groups


def _dense_job(qm, key: str, shape, dtype: torch.dtype, v: Variant, n_rot: int | None, result) -> _Job:
    name = gguf_name(key, qm.architecture)
    offset = is_offset_norm(key, qm.architecture)
    src_type = _TORCH_TO_GGML.get(dtype, T.F32)
    if len(shape) == 1:
        t = T.F32
    elif v.transplant:
        t = src_type  # embeddings/lm_head exactly as the canonical model holds them
    elif name.startswith("blk.") and ".ffn_gate_inp." in name:
        t = T.F32  # MoE routers pick the experts: kept exact, as llama.cpp's converter and quantizer do
    elif v.kquant:
        t = T.F32 if v.linear_type == T.F32 else T.F16
    elif v.linear_type in (T.F32, T.F16, T.BF16):
        t = v.linear_type
    else:
        # embeddings, lm_head and unquantized linears: q8_0 at least (llama-quantize keeps these high)
        want = T.Q8_0 if key in ("model.embed_tokens.weight", "lm_head.weight") else T.F16
        t = fitting_type(want, shape[-1])
        if t != want:
            result.fallbacks.append(f"{name}: {want.name} -> {t.name} ({shape[-1]} % 32 != 0)")

    def produce() -> np.ndarray:
        x = qm.dense[key]
        if offset:  # HF's (1 + w) gain as the plain gain llama.cpp multiplies by
            x = x.to(torch.float32) + 1.0
        if n_rot:
            x = permute_rows(x, n_rot)
        return encode(x, t)

    return _Job(name, shape, t, produce)


def _linear_job(qm, gname: str, names: list[str], shape, v: Variant, n_rot: int | None, result) -> _Job:
    """One GGUF weight from ``names`` (several: experts, stacked along the first axis in this order)."""

    def joined(parts: list[np.ndarray]) -> np.ndarray:
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    if v.transplant:
        def produce_q41() -> np.ndarray:
            blocks = []
            for name in names:  # expert by expert: one expert's codes in memory at a time
                p = qm.linears[name]
                if n_rot:
                    p = _permute_packed(p, n_rot)
                blocks.append(to_q4_1(p, name))
            return joined(blocks)

        return _Job(gname, shape, T.Q4_1, produce_q41)
    want = v.linear_type
    t = fitting_type(want, shape[-1])
    if t != want:
        result.fallbacks.append(
            f"{gname}: {want.name} -> {t.name} (row of {shape[-1]} is not whole {want.name} blocks)"
        )

    def produce() -> np.ndarray:
        parts = []
        for name in names:
            if result.weights_source == "prescaled":
                w = qm.prescaled[name]
            else:
                w = qm.linears[name].dequantize(torch.float32)
            if n_rot:
                w = permute_rows(w, n_rot)
            parts.append(encode(w, t))
        return joined(parts)

    return _Job(gname, shape, t, produce)


def _bias_job(qm, name: str, out: int, n_rot: int | None) -> _Job:
    def produce() -> np.ndarray:
        b = qm.linears[name].bias
        if n_rot:
            b = permute_rows(b, n_rot)
        return encode(b, T.F32)

    return _Job(gguf_name(f"{name}.bias", qm.architecture), (out,), T.F32, produce)


def _permute_packed(p: PackedLinear, n_head: int) -> PackedLinear:
    """Rows are independent in the canonical layout, so the packed bytes permute as they are."""
    return PackedLinear(
        permute_rows(p.qweight, n_head), permute_rows(p.scales, n_head), permute_rows(p.zeros, n_head),
        p.in_features, p.group_size, p.bits, None if p.bias is None else permute_rows(p.bias, n_head),
    )


__all__ = ["NAME", "GGUFWriteResult", "detect", "parse_variant", "plan", "read", "tensor_types", "uses_prescaled",
           "write"]
