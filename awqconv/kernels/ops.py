"""Launchers for the Triton INT4 kernels: split-K workspace and dispatch by M (config.py).

``w4_matmul(x [M, K], kw) -> y [M, N]`` runs, by M (``default_config``): the fp16x2 GEMV (M = 1,
gemv_f16x2.py; the fp32 CUDA-core GEMV for fp32 rows, without inline PTX and when groups are too small
for a tensor-core K tile), the transposed split-K tensor-core tile (tile_t.py, 2 <= M <
``dequant_min_m``), else dequantise once (Triton) + ``torch.matmul`` (cuBLAS). A ``KernelConfig``
may be passed to force a kernel and tile (the tests cover many). The split-K partials and tile
tickets live in workspace.py: the one-row GEMV and tile_t park their partials for
``w4_merge_kernel``, a second launch; the fp32 GEMV merges in each tile's last program. ``pdl``:
programmatic dependent launch where the GPU supports it (launch.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from ..errors import ShapeError
from .config import DEQUANT, DEQUANT_MIN_M, KernelConfig, default_config, split_for
from .config import INTERPRET as _INTERPRET
from .config import PTX as _PTX
from .gemv_f16x2 import w4_gemv_f16x2_kernel
from .launch import pdl_launch
from .layout import KernelWeight
from .tile_t import w4_tile_t_kernel
from .triton_w4 import w4_dequant_kernel, w4_gemv_kernel, w4_merge_kernel
from .workspace import WORKSPACE
from .x16 import X16

MERGE_BLOCK = 256  # columns per program of w4_merge_kernel


def dequantize(kw: KernelWeight, dtype: torch.dtype, out: Tensor | None = None,
               config: KernelConfig | None = None) -> Tensor:
    """Dense ``W [K, N]`` in ``dtype`` (bit-equal to ``PackedLinear.dequantize(dtype).t()``).
    ``config`` (kind "dequant"): tile ``kc`` x ``block_n`` (each word loaded once where ``kc``
    divides the group, else one load per element), warps; default ``config.DEQUANT``."""
    K, N = kw.in_features, kw.out_features
    if out is None:
        out = torch.empty(K, N, dtype=dtype, device=kw.qw.device)
    cfg = config or DEQUANT
    bk, bn = cfg.kc, cfg.block_n
    expand = kw.group_size % bk == 0 and bk % 8 == 0
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


def plan_matmul(x: Tensor, kw: KernelWeight, cfg: KernelConfig, x16: bool = False, merge: bool = True,
                pdl: bool = True) -> MatmulLaunch:
    """The launch ``w4_matmul`` makes for a GEMV or tile kind (not "dequant"): kernel, grid,
    arguments, constexprs, and the output it writes. ``x16``: ``x`` is an ``X16``'s fp16 x / 16 (one
    row, the fp16x2 GEMV), the output bf16. ``merge=False`` (one-row fp16x2 GEMV): every program
    parks its fp32 partial sums (no bias) as ``partials [split, N]`` and nothing else runs: the
    caller's own kernel merges them (gemv_fused.py)."""
    M, K = x.shape
    if cfg.kind not in ("gemv", "gemv_f16x2", "tile_t"):
        raise ShapeError(f"plan_matmul launches the gemv, gemv_f16x2 and tile_t kernels, not {cfg.kind!r}")
    if not merge and cfg.kind != "gemv_f16x2":
        raise ShapeError(f"a caller-merged launch takes the one-row fp16x2 GEMV, not {cfg.kind}")
    if x16 and (cfg.kind != "gemv_f16x2" or x.dtype != torch.float16):
        raise ShapeError(f"X16 activations take the one-row fp16x2 GEMV, not {cfg.kind}")
    N = kw.out_features
    g = kw.group_size
    kc = cfg.kc
    if g % kc or kc % 8 or (cfg.kind == "tile_t" and kc < 16):
        raise ShapeError(f"chunk kc={kc} must divide group_size={g} (and be >= 16 for the tensor-core tile)")
    if cfg.kind == "tile_t" and cfg.block_m < 16:
        raise ShapeError(f"the transposed tile needs block_m >= 16 (the MMA's N), got {cfg.block_m}")
    if cfg.kind == "gemv_f16x2":
        if cfg.block_m != 1 or M != 1:
            raise ShapeError(f"the fp16x2 GEMV is one-row (block_m=1, M=1), got block_m={cfg.block_m}, M={M}")
        if x.dtype not in (torch.float16, torch.bfloat16):
            raise ShapeError(f"the fp16x2 GEMV takes fp16 or bf16 activations, got {x.dtype}")
        if x.data_ptr() % 16 or x.stride(0) % 8:  # read as aligned int32 pairs: odd views get a copy
            x = x.clone(memory_format=torch.contiguous_format)
    bm = cfg.block_m
    n_tiles_n = triton.cdiv(N, cfg.block_n)
    n_tiles_m = triton.cdiv(M, bm)
    split, k_split = split_for(cfg, n_tiles_n * n_tiles_m, K, x.device)
    y = torch.empty(M, N, dtype=torch.bfloat16 if x16 else x.dtype, device=x.device)
    ws, cnt = WORKSPACE.get(x.device, split * M * N if split > 1 or not merge else 0, n_tiles_n * n_tiles_m)
    kernel = {"gemv": w4_gemv_kernel, "tile_t": w4_tile_t_kernel, "gemv_f16x2": w4_gemv_f16x2_kernel}[cfg.kind]
    if cfg.kind == "tile_t":
        extra = {"GROUP": g, "PREFETCH": max(1, int(cfg.prefetch)), "USE_ASM": _PTX and not _INTERPRET}
        if _INTERPRET:
            extra["DOT_F32"] = True
    elif cfg.kind == "gemv_f16x2":
        extra = {"USE_ASM": _PTX and not _INTERPRET}  # else its Triton emulation
        if x16:
            extra["X16"] = True
    else:
        extra = {}
    extra.update(pdl_launch(x.device, pdl))
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
    elif split > 1 and cfg.kind in ("tile_t", "gemv_f16x2"):  # parked, summed by the merge kernel
        meta["PARK"] = True
        then = MatmulLaunch(w4_merge_kernel, (triton.cdiv(N, MERGE_BLOCK), M, 1),
                            (ws, bias, y, M, N, split, y.stride(0)),
                            dict(SPLIT_P2=meta["SPLIT_P2"], HAS_BIAS=meta["HAS_BIAS"], BLOCK=MERGE_BLOCK, num_warps=4,
                                 **pdl_launch(x.device, pdl)), y)
    return MatmulLaunch(kernel, (n_tiles_n, n_tiles_m, split), args, meta, y, then)


def w4_matmul(x: Tensor | X16, kw: KernelWeight, config: KernelConfig | None = None, pdl: bool = True,
              dequant_min_m: int = DEQUANT_MIN_M) -> Tensor:
    """``y = x @ W + b`` for 2-D ``x [M, K]`` (fp16 or bf16; or one ``X16`` row, giving bf16), W the
    INT4 weight in kernel layout. ``config``: the kernel and tile (default ``default_config`` with
    ``dequant_min_m``); ``pdl``: programmatic dependent launch where supported."""
    x16 = isinstance(x, X16)
    if x16:
        x = x.t
    if x.dim() != 2 or x.shape[1] != kw.in_features:
        raise ShapeError(f"w4_matmul: x must be [M, {kw.in_features}], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or default_config(x.shape[0], kw, x.device, x.dtype, dequant_min_m)
    if x16:
        return plan_matmul(x, kw, cfg, x16=True, pdl=pdl)()
    if cfg.kind == "dequant":
        w = dequantize(kw, x.dtype, config=cfg)
        y = torch.matmul(x, w)
        return y if kw.bias is None else y.add_(kw.bias)
    return plan_matmul(x, kw, cfg, pdl=pdl)()
