"""GGUF tensor naming, the rotary Q/K row permutation, tensor types and block encodings.

HF keys map to llama.cpp names through one table (``blk.{bid}.attn_q`` etc.); shapes stay HF
``[out, in]`` (gguf-py reverses them, so blocks run along ``in``). ``permute_rows`` turns HF's
half-split rotary layout into llama.cpp's adjacent-pair layout; it moves output rows only, so it
commutes with every per-row block quantizer. The ``q4_1-awq`` transplant re-blocks canonical groups
into Q4_1 blocks of 32 with ``d = s`` and ``m = -z * s`` (fp16), carrying the integer codes as-is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gquants
from torch import Tensor

from ..errors import FormatConstraintError, ShapeError
from ..packed import PackedLinear

T = GGMLQuantizationType

# HF architectures[0] -> (gguf architecture, permute q/k rows for llama.cpp's adjacent-pair rope)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),  # llama.cpp runs qwen2 with NEOX (half-split) rope
}

# HF module path inside a decoder layer -> llama.cpp tensor stem (llama.cpp:gguf-py constants.py)
LAYER_NAMES: dict[str, str] = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES: dict[str, str] = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_name(hf_key: str) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``; None if unknown."""
    stem, _, suffix = hf_key.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{suffix}"
    m = _LAYER_RE.match(stem)
    if m and m.group(2) in LAYER_NAMES:
        return f"blk.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{suffix}"
    return None


def hf_key(name: str) -> str | None:
    """Inverse of :func:`gguf_name`."""
    stem, _, suffix = name.rpartition(".")
    for hf, gg in GLOBAL_NAMES.items():
        if stem == gg:
            return f"{hf}.{suffix}"
    m = re.match(r"^blk\.(\d+)\.(.+)$", stem)
    if m:
        for hf, gg in LAYER_NAMES.items():
            if gg == m.group(2):
                return f"model.layers.{m.group(1)}.{hf}.{suffix}"
    return None


def rope_heads(hf_key_or_module: str, n_head: int, n_head_kv: int) -> int | None:
    """How many heads to permute for this tensor (q: n_head, k: n_head_kv), None if not q/k."""
    if ".self_attn.q_proj" in hf_key_or_module:
        return n_head
    if ".self_attn.k_proj" in hf_key_or_module:
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
# (llama.cpp:src/llama-quant.cpp tensor_type_fallback); F16 is the last resort
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
    q = p.unpack().reshape(out, n_in // 32, 2, 16)
    qs = q[:, :, 0, :] | (q[:, :, 1, :] << 4)  # [out, nb, 16]
    dm = torch.stack([d, m], dim=-1).view(torch.uint8).reshape(out, n_in // 32, 4)
    return torch.cat([dm, qs], dim=-1).reshape(out, -1).numpy()


def from_q4_1(data: np.ndarray, group_size: int, name: str = "weight") -> tuple[Tensor, Tensor, Tensor]:
    """Q4_1 blocks of a transplant -> ``(q uint8 [out, in], zeros uint8 [out, G], scales fp16 [out, G])``."""
    qweight, z, s = from_q4_1_packed(data, group_size, name)
    q = torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)
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
    lo, hi = qs & 0x0F, qs >> 4  # elements 0..15 and 16..31 of each block
    # canonical bytes hold adjacent pairs: byte k = q[2k] | q[2k + 1] << 4
    qweight = torch.cat([lo[..., 0::2] | (lo[..., 1::2] << 4), hi[..., 0::2] | (hi[..., 1::2] << 4)], dim=-1)
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
