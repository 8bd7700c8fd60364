"""Launchers for the Triton INT4 kernels: config choice per M bucket, split-K workspace, dispatch.

``w4_matmul(x [M, K], kw) -> y [M, N]`` picks, by M: the fp16x2 GEMV (M = 1, fp16 or bf16; the fp32
CUDA-core GEMV without inline PTX and when groups are too small for a tensor-core K tile), the transposed split-K
tensor-core tile (tile_t.py, 2 <= M < DEQUANT_MIN_M = 257), else dequantise once (Triton) + ``torch.matmul``
(cuBLAS). The plain tile kernel and the fp16x2 rows kernel stay as variants: a ``KernelConfig`` may be
passed to force one (the benchmarks sweep them). The split-K partials and tile tickets
live in workspace.py; the one-row GEMV and tile_t park their partials for ``w4_merge_kernel``, a
second launch (``KernelConfig.park``), the other kernels merge in each tile's last program. The
kernels use programmatic dependent launch where supported (launch.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
from torch import Tensor

from ..errors import ShapeError
from .launch import INTERPRET as _INTERPRET
from .launch import pdl_launch
from .layout import KernelWeight
from .tile_t import w4_tile_t_kernel
from .triton_w4 import (
    w4_dequant_kernel,
    w4_gemm_kernel,
    w4_gemv_f16x2_kernel,
    w4_gemv_f16x2_rows_kernel,
    w4_gemv_kernel,
    w4_merge_kernel,
)
from .workspace import WORKSPACE
from .x16 import X16

DEQUANT_MIN_M = int(os.environ.get("AWQCONV_DEQUANT_MIN_M", "257"))  # tile_t up to 256 rows (run AM)
# the fp16x2 kernels' inner loop is inline PTX: NVIDIA only (ROCm builds keep the plain-Triton kernels)
_PTX = torch.version.cuda is not None or _INTERPRET


@dataclass(frozen=True)
class KernelConfig:
    kind: str  # "gemv" | "gemv_f16x2" (fp16; block_m 1: one row, > 1: the rows kernel) | "gemm" | "tile_t" | "dequant"
    block_m: int = 1
    block_n: int = 128
    kc: int = 128  # K rows per chunk; divides the group size
    split_k: int = 1  # requested; 0 or -p = choose to reach ~p programs per SM (0: 4)
    num_warps: int = 4
    num_stages: int = 2
    expand: bool = True  # gemm: load each packed word once and expand in registers
    late_reduce: bool = False  # gemv, M = 1: one cross-thread reduction per program, not per chunk
    prefetch: int = 1  # gemv_f16x2: 1 = next chunk's loads into registers first; n >= 2: n-stage smem pipeline
    # (tile_t: stages of its cp.async ring, 1 = none)
    pdl: bool | None = None  # programmatic dependent launch (launch.py); None = where supported
    maxnreg: int | None = None  # register cap per thread (more resident programs), GPU only
    park: bool = True  # split-K of the one-row fp16x2 GEMV and tile_t: partials summed by w4_merge_kernel
    # (False: by each tile's last program after a ticket; notes, run BJ)


def _pow2_divisor(g: int, cap: int) -> int:
    kc = 1
    while kc * 2 <= cap and g % (kc * 2) == 0:
        kc *= 2
    return kc


def _n_sm(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


_DEQUANT = KernelConfig("dequant", block_n=256, kc=32)  # dequantize()'s tile (run AJ, notes)


def cuda_core_gemv_config(m: int, kw: KernelWeight) -> KernelConfig:
    """The fp32 CUDA-core GEMV for ``m`` rows (up to 4 per program): the fallback without inline PTX or
    with groups too small for a tensor-core K tile (H100 run 3: 128 x 4 warps for gate_up, 64 x 2 elsewhere)."""
    wide = kw.out_features > 16384
    return KernelConfig("gemv", block_m=1 if m == 1 else min(4, 1 << (m - 1).bit_length()),
                        block_n=128 if wide else 64, kc=_pow2_divisor(kw.group_size, 128), split_k=-8,
                        num_warps=4 if wide else 2, num_stages=2)


ONE_WAVE_PROGRAMS = 16  # one-row GEMV programs per SM, all resident at once (64 registers x 64 threads each)


def one_wave_split(n_out: int, block_n: int, per_sm: int, device: torch.device) -> int:
    """The split-K count that keeps a grid of column tiles x splits at or below ``per_sm`` programs
    per SM (at least one split)."""
    return max(1, per_sm * _n_sm(device) // triton.cdiv(n_out, block_n))


def one_row_config(kw: KernelWeight, device: torch.device, per_sm: int = ONE_WAVE_PROGRAMS,
                   maxnreg: int | None = 64, block_n: int = 64, num_warps: int = 2, kc: int = 64) -> KernelConfig:
    """The fp16x2 one-row GEMV with register prefetch, split-K into at most ``per_sm`` programs per
    SM, registers capped at ``maxnreg`` so that all of them are resident at once: one wave. The
    defaults (64 columns x 2 warps, 64-row chunks, 16 per SM, 64 registers: 16 x 64 threads x 64 =
    an SM's 64K registers) won the H100 sweeps (BENCHMARKS.md §2; a cp.async ring and wide, shallow
    tiles were slower). The programs are short (2-6 chunks), so the weights stream as fast as
    programs are in flight: one capped wave of 16 per SM beat ~32 per SM uncapped (80 registers, 12
    resident) by 3 % per layer and 4-5 % in decode (runs BY-CA); caps of 68-72 (14 resident), other
    tile shapes and 128-row chunks lost (runs CC, CG). The other arguments are for the sweeps."""
    return KernelConfig("gemv_f16x2", block_n=block_n, kc=_pow2_divisor(kw.group_size, kc),
                        split_k=one_wave_split(kw.out_features, block_n, per_sm, device), num_warps=num_warps,
                        num_stages=2, maxnreg=maxnreg)


def default_config(m: int, kw: KernelWeight, device: torch.device,
                   dtype: torch.dtype = torch.float16) -> KernelConfig:
    """Heuristic per M bucket, from the H100 sweeps in notes/gpu_notes.md (runs N-AE).

    M = 1: the fp16x2 GEMV (``one_row_config``: one wave of 16 programs per SM; bf16 activations
    enter it as exact fp16 x / 16: 69 us against 93 on the fp32 CUDA-core GEMV, run AQ),
    else (no inline PTX) the fp32 GEMV. 2 <= M < DEQUANT_MIN_M with groups of >= 16: the transposed
    tensor-core tile (tile_t.py; a cp.async ring: 80-83 us per layer at M = 2..16 against 97-150 for
    the rows kernel and the old tiles; BM 64 at M = 64: 132 us, 1.3x faster than cuBLAS).
    Smaller groups stay on the CUDA-core GEMV. From DEQUANT_MIN_M: dequantise once + cuBLAS.
    """
    g = kw.group_size
    kc = _pow2_divisor(g, 128)
    if m == 1 and dtype in (torch.float16, torch.bfloat16) and _PTX:
        return one_row_config(kw, device)
    if m == 1 or (m < DEQUANT_MIN_M and kc < 16):  # no inline PTX / groups too small for a tensor-core K tile
        return cuda_core_gemv_config(m, kw)
    if m <= 16:  # H100 run BL (merge kernel): 64 columns x 4 warps, one wave of <= 6 programs per SM
        # (80 registers, 3 stages); with the ticket merge, ~6 per SM over more than a wave won (run AE)
        split = one_wave_split(kw.out_features, 64, 6, device)
        return KernelConfig("tile_t", block_m=16, block_n=64, kc=kc, split_k=split, num_warps=4, prefetch=3,
                            maxnreg=80)
    if m < DEQUANT_MIN_M:  # runs AE/AM: BM 64 at M = 64 (141 us/layer), BM 128 at M = 192-256 (350-354
        # against 383-389 for dequantise + cuBLAS); at M = 320 the tile loses (509 against 426)
        return KernelConfig("tile_t", block_m=64 if m <= 64 else 128, block_n=64, kc=kc, split_k=-4, num_warps=4,
                            prefetch=3)
    return _DEQUANT


def _split_for(cfg: KernelConfig, n_tiles: int, K: int, device: torch.device) -> tuple[int, int]:
    """(splits, K rows per split) of a split-K launch over ``n_tiles`` output tiles: ``cfg.split_k``,
    or for split_k <= 0 about -split_k (default 4) programs per SM; every split whole chunks."""
    n_chunks = K // cfg.kc
    split = cfg.split_k
    if split <= 0:
        split = max(1, min(n_chunks, triton.cdiv((-split or 4) * _n_sm(device), n_tiles)))
    k_split = triton.cdiv(n_chunks, split) * cfg.kc
    return triton.cdiv(K, k_split), k_split


def dequantize(kw: KernelWeight, dtype: torch.dtype, out: Tensor | None = None,
               config: KernelConfig | None = None) -> Tensor:
    """Dense ``W [K, N]`` in ``dtype`` (bit-equal to ``PackedLinear.dequantize(dtype).t()``).
    ``config`` (kind "dequant"): tile ``kc`` x ``block_n`` (``expand``: each word loaded once, when
    ``kc`` divides the group), warps; default ``default_config``'s."""
    K, N = kw.in_features, kw.out_features
    if out is None:
        out = torch.empty(K, N, dtype=dtype, device=kw.qw.device)
    cfg = config or _DEQUANT
    bk, bn = cfg.kc, cfg.block_n
    expand = cfg.expand and kw.group_size % bk == 0 and bk % 8 == 0
    grid = (triton.cdiv(K, bk), triton.cdiv(N, bn))
    w4_dequant_kernel[grid](kw.qw, kw.scales, kw.zeros, out, N, K, kw.group_size, BLOCK_K=bk, BLOCK_N=bn,
                            EXPAND=expand, num_warps=cfg.num_warps)
    return out


@dataclass
class MatmulLaunch:
    """The Triton launch of ``w4_matmul``: ``kernel[grid](*args, **meta)`` writes ``y`` (with ``then``,
    the split-K merge launch that follows a parking kernel, it writes the partials)."""

    kernel: object  # a triton.JITFunction
    grid: tuple[int, int, int]
    args: tuple  # the kernel's runtime arguments, in order
    meta: dict  # constexprs and launch options (num_warps, num_stages, launch_pdl, maxnreg)
    y: Tensor
    then: MatmulLaunch | None = None

    @property
    def partials(self) -> Tensor:
        """The split-K scratch: [split, M, N] fp32 partials where the launch parks them."""
        return self.args[6]

    def __call__(self) -> Tensor:
        self.kernel[self.grid](*self.args, **self.meta)
        if self.then is not None:
            self.then()
        return self.y


def plan_matmul(x: Tensor, kw: KernelWeight, cfg: KernelConfig, x16: bool = False,
                merge: bool = True) -> MatmulLaunch:
    """The launch ``w4_matmul`` makes for a tile kind (not "dequant"): kernel, grid, arguments,
    constexprs, and the output it writes. Benchmarks reuse it to launch the same kernel otherwise
    compiled (benchmarks/gpu_aot_triton.py). ``x16``: ``x`` is an ``X16``'s fp16 x / 16 (one row,
    the fp16x2 GEMV), the output bf16. ``merge=False`` (one-row GEMV): every program parks its fp32
    partial sums (no bias) as ``partials [split, N]`` and nothing else runs: the caller's own
    kernel merges them (gemv_fused.py)."""
    M, K = x.shape
    if not merge and (cfg.kind != "gemv_f16x2" or cfg.block_m != 1):
        raise ShapeError(f"a caller-merged launch takes the one-row fp16x2 GEMV, not {cfg.kind}")
    if x16 and (cfg.kind != "gemv_f16x2" or cfg.block_m != 1 or x.dtype != torch.float16):
        raise ShapeError(f"X16 activations take the one-row fp16x2 GEMV, not {cfg.kind} x {cfg.block_m} rows")
    N = kw.out_features
    g = kw.group_size
    kc = cfg.kc
    if g % kc or kc % 8 or (cfg.kind in ("gemm", "tile_t") and kc < 16):
        raise ShapeError(f"chunk kc={kc} must divide group_size={g} (and be >= 16 for the tensor-core tiles)")
    if cfg.kind == "tile_t" and cfg.block_m < 16:
        raise ShapeError(f"the transposed tile needs block_m >= 16 (the MMA's N), got {cfg.block_m}")
    if cfg.kind == "gemv_f16x2":
        if x.dtype != torch.float16 and (cfg.block_m != 1 or x.dtype != torch.bfloat16):
            raise ShapeError(f"the fp16x2 GEMV takes fp16 activations (one-row: fp16 or bf16), got {x.dtype}")
        if cfg.block_m == 1 and M != 1:
            raise ShapeError(f"the one-row fp16x2 GEMV (block_m=1) takes M=1, got M={M}")
        if x.data_ptr() % 16 or x.stride(0) % 8:  # read as aligned int32 pairs: odd views get a copy
            x = x.clone(memory_format=torch.contiguous_format)
    bm = cfg.block_m
    n_tiles_n = triton.cdiv(N, cfg.block_n)
    n_tiles_m = triton.cdiv(M, bm)
    split, k_split = _split_for(cfg, n_tiles_n * n_tiles_m, K, x.device)
    y = torch.empty(M, N, dtype=torch.bfloat16 if x16 else x.dtype, device=x.device)
    ws, cnt = WORKSPACE.get(x.device, split * M * N if split > 1 or not merge else 0, n_tiles_n * n_tiles_m)
    kernel = {"gemv": w4_gemv_kernel, "gemm": w4_gemm_kernel, "tile_t": w4_tile_t_kernel,
              "gemv_f16x2": w4_gemv_f16x2_kernel if bm == 1 else w4_gemv_f16x2_rows_kernel}[cfg.kind]
    if cfg.kind == "tile_t":
        extra = {"GROUP": g, "PREFETCH": max(1, int(cfg.prefetch)), "USE_ASM": _PTX and not _INTERPRET}
    elif cfg.kind == "gemm":
        extra = {"EXPAND": cfg.expand}
    elif cfg.kind == "gemv_f16x2":
        extra = {"PREFETCH": int(cfg.prefetch), "USE_ASM": _PTX and not _INTERPRET}  # else its Triton emulation
        if x16:
            extra["X16"] = True
    else:
        extra = {"LATE_REDUCE": cfg.late_reduce and bm == 1}
    if _INTERPRET and cfg.kind in ("gemm", "tile_t"):
        extra["DOT_F32"] = True
    extra.update(pdl_launch(x.device, cfg.pdl))
    if cfg.maxnreg and not _INTERPRET:
        extra["maxnreg"] = cfg.maxnreg
    bias = kw.bias if kw.bias is not None else kw.scales  # dummy pointer when absent
    k_args = (M, N, K) if cfg.kind == "tile_t" else (M, N, K, g)  # the transposed tile takes G as GROUP
    args = (x, kw.qw, kw.scales, kw.zeros, bias, y, ws, cnt, *k_args, k_split, split, x.stride(0), y.stride(0))
    meta = dict(BLOCK_M=bm, BLOCK_N=cfg.block_n, KC=kc, SPLIT_P2=triton.next_power_of_2(split),
                HAS_BIAS=kw.bias is not None and merge, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra)
    then = None
    if not merge:
        meta["PARK"] = True
    elif split > 1 and cfg.park and (cfg.kind == "tile_t" or (cfg.kind == "gemv_f16x2" and bm == 1)):
        meta["PARK"] = True
        block = 256
        then = MatmulLaunch(w4_merge_kernel, (triton.cdiv(N, block), M, 1),
                            (ws, bias, y, M, N, split, y.stride(0)),
                            dict(SPLIT_P2=meta["SPLIT_P2"], HAS_BIAS=meta["HAS_BIAS"], BLOCK=block, num_warps=4,
                                 **pdl_launch(x.device, cfg.pdl)), y)
    return MatmulLaunch(kernel, (n_tiles_n, n_tiles_m, split), args, meta, y, then)


def w4_matmul(x: Tensor | X16, kw: KernelWeight, config: KernelConfig | None = None) -> Tensor:
    """``y = x @ W + b`` for 2-D ``x [M, K]`` (fp16 or bf16; or one ``X16`` row, giving bf16), W the
    INT4 weight in kernel layout."""
    x16 = isinstance(x, X16)
    if x16:
        x = x.t
    if x.dim() != 2 or x.shape[1] != kw.in_features:
        raise ShapeError(f"w4_matmul: x must be [M, {kw.in_features}], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or default_config(x.shape[0], kw, x.device, x.dtype)
    if x16:
        return plan_matmul(x, kw, cfg, x16=True)()
    if cfg.kind == "dequant":
        w = dequantize(kw, x.dtype, config=cfg)
        y = torch.matmul(x, w)
        return y if kw.bias is None else y.add_(kw.bias)
    return plan_matmul(x, kw, cfg)()


def with_split(cfg: KernelConfig, split_k: int) -> KernelConfig:
    return replace(cfg, split_k=split_k)
