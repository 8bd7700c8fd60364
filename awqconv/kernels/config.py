"""Which Triton INT4 kernel runs a linear of M rows, with which tile: ``KernelConfig`` and the
default per M bucket (``default_config``), from the H100 sweeps (docs/design.md).

No Triton import here: the CPU-only runtime reads ``DEQUANT_MIN_M`` from this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Triton chooses its CPU interpreter when a kernel is decorated, from TRITON_INTERPRET; this mirrors it
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# the fp16x2 GEMV's inner loop is inline PTX: NVIDIA only (ROCm builds take the fp32 CUDA-core GEMV)
PTX = torch.version.cuda is not None or INTERPRET

# From 257 rows on, dequantise once + cuBLAS beats the transposed tile (H100, Llama-2-7B layer:
# 350-354 us for the tile against 383-389 at M = 192-256; at M = 320 the tile loses, 509 against 426).
DEQUANT_MIN_M = 257
# One-row GEMV programs per SM, all resident at once (64 registers x 64 threads each): one capped
# wave beat ~32 uncapped programs per SM by 3 % per layer and 4-5 % in decode.
ONE_WAVE_PROGRAMS = 16


@dataclass(frozen=True)
class KernelConfig:
    kind: str  # "gemv_f16x2" (one row) | "gemv" (fp32 CUDA cores, up to 4 rows a program) | "tile_t" | "dequant"
    block_m: int = 1
    block_n: int = 128
    kc: int = 128  # K rows per chunk; divides the group size
    split_k: int = 1  # requested; 0 or -p = choose to reach ~p programs per SM (0: 4)
    num_warps: int = 4
    num_stages: int = 2
    prefetch: int = 1  # tile_t: stages of its cp.async ring (1 = none)
    maxnreg: int | None = None  # register cap per thread (more resident programs), GPU only


def pow2_divisor(g: int, cap: int) -> int:
    """The largest power of two <= ``cap`` dividing ``g``."""
    kc = 1
    while kc * 2 <= cap and g % (kc * 2) == 0:
        kc *= 2
    return kc


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _n_sm(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


DEQUANT = KernelConfig("dequant", block_n=256, kc=32)  # dequantize()'s tile (H100 sweep of 7 tiles)


def cuda_core_gemv_config(m: int, kw) -> KernelConfig:
    """The fp32 CUDA-core GEMV for ``m`` rows (up to 4 per program): the path without inline PTX, for
    fp32 rows, and for groups too small for a tensor-core K tile (H100: 128 columns x 4 warps for
    outputs over 16384 columns, 64 x 2 elsewhere)."""
    wide = kw.out_features > 16384
    return KernelConfig("gemv", block_m=1 if m == 1 else min(4, 1 << (m - 1).bit_length()),
                        block_n=128 if wide else 64, kc=pow2_divisor(kw.group_size, 128), split_k=-8,
                        num_warps=4 if wide else 2, num_stages=2)


def one_wave_split(n_out: int, block_n: int, per_sm: int, device: torch.device) -> int:
    """The split-K count that keeps a grid of column tiles x splits at or below ``per_sm`` programs
    per SM (at least one split)."""
    return max(1, per_sm * _n_sm(device) // cdiv(n_out, block_n))


def one_row_config(kw, device: torch.device) -> KernelConfig:
    """The fp16x2 one-row GEMV: 64 columns x 2 warps, 64-row chunks, split-K into one wave of at most
    ``ONE_WAVE_PROGRAMS`` programs per SM, registers capped at 64 so that all of them are resident
    (16 x 64 threads x 64 = an SM's 64K registers). The programs are short (2-6 chunks), so the
    weights stream as fast as programs are in flight; caps of 68-72 (14 resident), other tile
    shapes, 128-row chunks and a cp.async ring all measured slower on the H100."""
    return KernelConfig("gemv_f16x2", block_n=64, kc=pow2_divisor(kw.group_size, 64),
                        split_k=one_wave_split(kw.out_features, 64, ONE_WAVE_PROGRAMS, device), num_warps=2,
                        num_stages=2, maxnreg=64)


def default_config(m: int, kw, device: torch.device, dtype: torch.dtype = torch.float16,
                   dequant_min_m: int = DEQUANT_MIN_M) -> KernelConfig:
    """The kernel and tile for ``m`` rows of ``kw`` (a KernelWeight) on ``device``.

    M = 1, fp16 or bf16: the fp16x2 GEMV (``one_row_config``; bf16 enters as exact fp16 x / 16: 69 us
    per 7B layer against 93 on the fp32 GEMV); else (fp32, no inline PTX) the fp32 GEMV.
    2 <= M < ``dequant_min_m`` with groups of >= 16: the transposed tensor-core tile (tile_t.py;
    80-83 us per 7B layer at M = 2..16, 132 us at M = 64, 1.3x faster than cuBLAS); smaller groups
    stay on the fp32 GEMV. From ``dequant_min_m`` rows: dequantise once + cuBLAS.
    """
    kc = pow2_divisor(kw.group_size, 128)
    if m == 1 and dtype in (torch.float16, torch.bfloat16) and PTX:
        return one_row_config(kw, device)
    if m == 1:  # fp32 rows, or no inline PTX
        return cuda_core_gemv_config(m, kw)
    if m >= dequant_min_m:
        return DEQUANT
    if kc < 16:  # groups too small for a tensor-core K tile
        return cuda_core_gemv_config(m, kw)
    if m <= 16:  # 64 columns x 4 warps, one wave of <= 6 programs per SM (80 registers, a 3-stage ring)
        split = one_wave_split(kw.out_features, 64, 6, device)
        return KernelConfig("tile_t", block_m=16, block_n=64, kc=kc, split_k=split, num_warps=4, prefetch=3,
                            maxnreg=80)
    # BM 64 up to M = 64 (141 us per 7B layer), BM 128 above (350-354 us at M = 192-256)
    return KernelConfig("tile_t", block_m=64 if m <= 64 else 128, block_n=64, kc=kc, split_k=-4, num_warps=4,
                        prefetch=3)


def split_for(cfg: KernelConfig, n_tiles: int, K: int, device: torch.device) -> tuple[int, int]:
    """(splits, K rows per split) of a split-K launch over ``n_tiles`` output tiles: ``cfg.split_k``,
    or for split_k <= 0 about -split_k (default 4) programs per SM; every split whole chunks."""
    n_chunks = K // cfg.kc
    split = cfg.split_k
    if split <= 0:
        split = max(1, min(n_chunks, cdiv((-split or 4) * _n_sm(device), n_tiles)))
    k_split = cdiv(n_chunks, split) * cfg.kc
    return cdiv(K, k_split), k_split
