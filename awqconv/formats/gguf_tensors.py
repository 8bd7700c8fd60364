"""GGUF tensor naming, the rotary Q/K row permutation, tensor types and block encodings.

HF keys map to llama.cpp names through the GGUF columns of the architecture registry
(``awqconv/archs.py``: ``blk.{bid}.attn_q`` etc.); shapes stay HF
``[out, in]`` (gguf-py reverses them, so blocks run along ``in``); the experts of one MoE layer
stack into one ``[expert, out, in]`` tensor (``gguf_slot`` names the expert). ``permute_rows`` turns HF's
half-split rotary layout into llama.cpp's adjacent-pair layout; it moves output rows only, so it
commutes with every per-row block quantizer. The ``q4_1-awq`` transplant re-blocks canonical groups
into Q4_1 blocks of 32 with ``d = s`` and ``m = -z * s`` (fp16), carrying the integer codes as-is.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gquants
from torch import Tensor

from .. import archs, nibbles
from ..archs import GgufSpec
from ..errors import FormatConstraintError, ShapeError, UnsupportedArchitecture
from ..packed import PackedLinear

T = GGMLQuantizationType
_DEFAULT = GgufSpec("llama")  # the Llama-family names, for callers that name no architecture


def gguf_spec(arch: str | None = None) -> GgufSpec:
    """The GGUF columns of registry row ``arch``; None: the plain Llama layout."""
    if arch is None:
        return _DEFAULT
    row = archs.lookup(arch)
    if row is None or row.gguf is None:
        raise UnsupportedArchitecture(
            f"gguf: architecture {arch} has no GGUF writer in awqconv; supported: {', '.join(archs.gguf_supported())}"
        )
    return row.gguf


def _layers_path(arch: str | None) -> str:
    row = archs.lookup(arch) if arch is not None else None
    return row.awq.layers_path if row is not None else "model.layers"


@functools.lru_cache(maxsize=None)
def _layer_patterns(spec: GgufSpec) -> tuple[tuple[re.Pattern[str], str, bool], ...]:
    """(regex over a layer-relative module path, llama.cpp stem, stacks experts) per row of ``spec``."""
    out = []
    for hf, gg in spec.layer_tensors:
        rx = re.escape(hf).replace(r"\*", r"(\d+)")
        out.append((re.compile(f"^{rx}$"), gg, "*" in hf))
    return tuple(out)


def gguf_slot(hf_key: str, arch: str | None = None) -> tuple[str, int | None] | None:
    """``(llama.cpp tensor name, expert index or None)`` of an HF key; None if llama.cpp has no place for it.

    Experts share one 3-D tensor: ``model.layers.1.mlp.experts.3.up_proj.weight`` is expert 3 of
    ``blk.1.ffn_up_exps.weight``.
    """
    spec = gguf_spec(arch)
    stem, _, suffix = hf_key.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    glob = dict(spec.global_tensors)
    if stem in glob:
        return f"{glob[stem]}.{suffix}", None
    prefix = _layers_path(arch) + "."
    if not stem.startswith(prefix):
        return None
    bid, _, path = stem[len(prefix):].partition(".")
    if not bid.isdigit():
        return None
    for rx, gg, stacked in _layer_patterns(spec):
        m = rx.match(path)
        if m:
            return f"blk.{bid}.{gg}.{suffix}", int(m.group(1)) if stacked else None
    return None


def gguf_name(hf_key: str, arch: str | None = None) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``; None if unknown.

    ``arch``: the HF class whose registry row names the tensors (default: the Llama-family names).
    """
    slot = gguf_slot(hf_key, arch)
    return None if slot is None else slot[0]


def hf_key(name: str, arch: str | None = None) -> str | None:
    """Inverse of :func:`gguf_name` (a stacked expert tensor gives the ``experts.*`` pattern)."""
    spec = gguf_spec(arch)
    stem, _, suffix = name.rpartition(".")
    for hf, gg in spec.global_tensors:
        if stem == gg:
            return f"{hf}.{suffix}"
    m = re.match(r"^blk\.(\d+)\.(.+)$", stem)
    if m:
        for hf, gg in spec.layer_tensors:
            if gg == m.group(2):
                return f"{_layers_path(arch)}.{m.group(1)}.{hf}.{suffix}"
    return None


def is_offset_norm(hf_key: str, arch: str | None = None) -> bool:
    """Whether llama.cpp wants this tensor as ``w + 1`` (a Gemma ``(1 + w)`` norm gain)."""
    return gguf_spec(arch).norm_plus_one and hf_key.endswith("norm.weight")


def rope_heads(hf_key_or_module: str, n_head: int, n_head_kv: int, arch: str | None = None) -> int | None:
    """How many heads to permute for this tensor (q: n_head, k: n_head_kv), None if not permuted.

    Without ``arch`` this answers for the Llama-family q/k paths (callers check the permute flag of
    ``check_arch``); with it, only where that row's ``rope_permute`` says so.
    """
    pair = gguf_spec(arch).rope_permute
    if pair is None:
        return None
    q, k = pair
    if f".{q}" in hf_key_or_module:
        return n_head
    if f".{k}" in hf_key_or_module:
        return n_head_kv
    return None


def _pair_order(rows: int, n_head: int) -> Tensor:
    if rows % (2 * n_head):
        raise ShapeError(f"{rows} rows cannot be split into {n_head} rotary heads of even size")
    half = rows // n_head // 2
    # new row (h, i, j) comes from old row (h, j, i): each head's halves are interleaved
    return torch.arange(rows).reshape(n_head, 2, half).transpose(1, 2).reshape(rows)


def permute_rows(t: Tensor, n_head: int) -> Tensor:
    """HF half-split rotary rows -> llama.cpp adjacent pairs (row r of head h: 0, d/2, 1, d/2+1 ...)."""
    return t[_pair_order(t.shape[0], n_head)]


def unpermute_rows(t: Tensor, n_head: int) -> Tensor:
    """Inverse of :func:`permute_rows`."""
    order = _pair_order(t.shape[0], n_head)
    out = torch.empty_like(t)
    out[order] = t
    return out


# ---------------------------------------------------------------------------------------------
# variants and tensor types

@dataclass(frozen=True)
class Variant:
    name: str
    linear_type: T  # type of the decoder linears (for K-quants: the intermediate float type)
    file_type: LlamaFileType
    kquant: bool = False  # quantized by llama.cpp's own quantizer after a float write
    transplant: bool = False  # the exact q4_1-awq re-blocking of canonical integers


TRANSPLANT = "q4_1-awq"
VARIANTS: dict[str, Variant] = {
    TRANSPLANT: Variant(TRANSPLANT, T.Q4_1, LlamaFileType.MOSTLY_Q4_1, transplant=True),
    "q4_0": Variant("q4_0", T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": Variant("q4_1", T.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q5_0": Variant("q5_0", T.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q5_1": Variant("q5_1", T.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q8_0": Variant("q8_0", T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "f16": Variant("f16", T.F16, LlamaFileType.MOSTLY_F16),
    "bf16": Variant("bf16", T.BF16, LlamaFileType.MOSTLY_BF16),
    "f32": Variant("f32", T.F32, LlamaFileType.ALL_F32),
    "q2_k": Variant("q2_k", T.F32, LlamaFileType.MOSTLY_Q2_K, kquant=True),
    "q3_k_m": Variant("q3_k_m", T.F32, LlamaFileType.MOSTLY_Q3_K_M, kquant=True),
    "q4_k_s": Variant("q4_k_s", T.F32, LlamaFileType.MOSTLY_Q4_K_S, kquant=True),
    "q4_k_m": Variant("q4_k_m", T.F32, LlamaFileType.MOSTLY_Q4_K_M, kquant=True),
    "q5_k_s": Variant("q5_k_s", T.F32, LlamaFileType.MOSTLY_Q5_K_S, kquant=True),
    "q5_k_m": Variant("q5_k_m", T.F32, LlamaFileType.MOSTLY_Q5_K_M, kquant=True),
    "q6_k": Variant("q6_k", T.F32, LlamaFileType.MOSTLY_Q6_K, kquant=True),
}

# what llama.cpp itself falls back to when a row is not a whole number of blocks
# (so a file we write holds the types llama-quantize would have chosen); F16 is the last resort
BLOCK_FALLBACK: dict[T, T] = {
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}
ENCODABLE = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def fitting_type(want: T, ne0: int) -> T:
    """``want`` if a row of ``ne0`` elements is whole blocks of it, else the next type that fits."""
    t = want
    while ne0 % block_size(t):
        t = BLOCK_FALLBACK.get(t, T.F16)
    return t


def nbytes(shape: tuple[int, ...], t: T) -> int:
    blk, size = GGML_QUANT_SIZES[t]
    n = int(np.prod(shape))
    return n // blk * size


def encode(w: Tensor, t: T) -> np.ndarray:
    """Float tensor -> the array gguf-py writes for type ``t`` (uint8 blocks for quantized types)."""
    w = w.detach().cpu()
    if t == T.F16 and w.dtype == torch.float16:  # already in storage form: no fp32 round trip
        return w.contiguous().numpy()
    if t == T.BF16 and w.dtype == torch.bfloat16:
        return w.contiguous().view(torch.int16).numpy()
    arr = w.to(torch.float32).numpy()
    if t == T.F32:
        return np.ascontiguousarray(arr)
    if t == T.F16:
        if arr.size and np.abs(arr).max() > 65504:
            raise FormatConstraintError("a tensor exceeds the fp16 range; write gguf:bf16 or gguf:f32")
        return arr.astype(np.float16)
    if t not in ENCODABLE:
        raise FormatConstraintError(f"awqconv cannot encode GGML type {t.name} itself")
    if not np.isfinite(arr).all():
        raise FormatConstraintError("a tensor holds NaN or inf values; re-run the quantization")
    return gquants.quantize(arr, t)


def decode(data: np.ndarray, t: T, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`encode` (lossy for quantized types): fp32 ``shape``."""
    if t in (T.F32, T.F16):
        return torch.from_numpy(np.asarray(data).astype(np.float32).reshape(shape))
    return torch.from_numpy(gquants.dequantize(np.asarray(data), t).reshape(shape).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# the exact Q4_1 transplant of canonical 4-bit groups

Q4_1_BYTES = 20  # d fp16, m fp16, 16 bytes of nibbles (element j low, element j + 16 high)


def transplant_check(p: PackedLinear, name: str) -> None:
    """Raise unless ``p`` re-blocks exactly into Q4_1 (4 bits, group multiple of 32, fp16 scales)."""
    if p.bits != 4:
        raise FormatConstraintError(f"{name}: gguf:{TRANSPLANT} needs 4-bit weights, got {p.bits}-bit")
    if p.group_size % 32:
        raise FormatConstraintError(
            f"{name}: group_size={p.group_size} is not a multiple of 32, so it cannot become Q4_1 "
            "blocks; quantize with --group-size 32/64/128 or export gguf:q4_0"
        )


def to_q4_1(p: PackedLinear, name: str = "weight") -> np.ndarray:
    """Canonical 4-bit integers -> Q4_1 blocks ``uint8 [out, in/32*20]``, integer codes unchanged."""
    transplant_check(p, name)
    out, n_in, g = p.out_features, p.in_features, p.group_size
    s32 = p.scales.to(torch.float32)
    d = s32.to(torch.float16)
    if not torch.equal(d.to(torch.float32), s32):
        raise FormatConstraintError(
            f"{name}: some scales are not representable in fp16 (bf16 range/underflow); "
            "Q4_1 stores fp16 scales, so export gguf:q4_0 or gguf:q8_0 instead"
        )
    m = (-p.zeros.to(torch.float32) * s32).to(torch.float16)  # rounded once, like any Q4_1 min
    if not torch.isfinite(m).all():
        raise FormatConstraintError(f"{name}: -zero * scale overflows fp16; cannot write Q4_1")
    per = g // 32
    d = d.repeat_interleave(per, dim=1)  # [out, in/32]
    m = m.repeat_interleave(per, dim=1)
    q = p.unpack().reshape(out, n_in // 32, 2, 16)  # the two halves of each block of 32
    qs = nibbles.pack(q, nibbles.PAIR, dim=2, dtype=torch.uint8).squeeze(2)  # [out, nb, 16]
    dm = torch.stack([d, m], dim=-1).view(torch.uint8).reshape(out, n_in // 32, 4)
    return torch.cat([dm, qs], dim=-1).reshape(out, -1).numpy()


def from_q4_1(data: np.ndarray, group_size: int, name: str = "weight") -> tuple[Tensor, Tensor, Tensor]:
    """Q4_1 blocks of a transplant -> ``(q uint8 [out, in], zeros uint8 [out, G], scales fp16 [out, G])``."""
    qweight, z, s = from_q4_1_packed(data, group_size, name)
    q = nibbles.unpack(qweight, nibbles.PAIR)
    return q, z, s


def from_q4_1_packed(data: np.ndarray, group_size: int, name: str = "weight") -> tuple[Tensor, Tensor, Tensor]:
    """Like :func:`from_q4_1` but the codes come back in the canonical packed layout (``qweight``).

    Raises FormatConstraintError when the blocks of one group disagree or ``-m / d`` is not an
    integer zero point in [0, 15], i.e. the tensor is not an awqconv transplant.
    """
    raw = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True))
    out, row_bytes = raw.shape
    nb = row_bytes // Q4_1_BYTES
    if group_size % 32 or (nb * 32) % group_size:
        raise FormatConstraintError(f"{name}: group_size={group_size} does not fit {nb * 32} columns")
    blocks = raw.reshape(out, nb, Q4_1_BYTES)
    dm = blocks[..., :4].contiguous().view(torch.float16).reshape(out, nb, 2)
    d, m = dm[..., 0], dm[..., 1]
    qs = blocks[..., 4:]
    # byte k of a block holds elements k and k + 16; canonical bytes hold adjacent pairs 2k, 2k + 1
    q = nibbles.unpack(qs.unsqueeze(2), nibbles.PAIR, dim=2).reshape(out, nb * 32)
    qweight = nibbles.pack(q, nibbles.PAIR, dtype=torch.uint8)
    per = group_size // 32
    d_g, m_g = d.reshape(out, -1, per), m.reshape(out, -1, per)
    if not (torch.equal(d_g, d_g[..., :1].expand_as(d_g)) and torch.equal(m_g, m_g[..., :1].expand_as(m_g))):
        raise FormatConstraintError(
            f"{name}: Q4_1 blocks within a group of {group_size} carry different scales; "
            f"this file is not an awqconv {TRANSPLANT} transplant"
        )
    s, mm = d_g[..., 0], m_g[..., 0].to(torch.float32)
    sf = s.to(torch.float32)
    zf = torch.where(sf == 0, torch.zeros_like(mm), -mm / sf)
    z = torch.round(zf)
    if (zf - z).abs().max() > 0.05 or z.min() < 0 or z.max() > 15:
        raise FormatConstraintError(
            f"{name}: Q4_1 minimum is not -zero*scale for an integer zero in [0, 15]; "
            f"this file is not an awqconv {TRANSPLANT} transplant"
        )
    return qweight.reshape(out, nb * 16).contiguous(), z.to(torch.uint8), s
