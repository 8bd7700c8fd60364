"""Cross-kernel L2 prefetch for the decode step: a one-row kernel asks the L2 for the first bytes of
the *next* linear's packed words, so the next kernel finds them there.

The decode GEMVs hold the DRAM at ~1.7 of ~3 TB/s (latency-bound: notes/gpu_notes.md), so a bulk
prefetch (``cp.async.bulk.prefetch.L2``, one instruction per program, Hopper and newer) can use the
idle bandwidth for the next kernel's weights; our own weight loads are ``evict_first``, so the
prefetched lines outlive them. It changes no result. ``AWQCONV_L2_PREFETCH`` is the budget as a
fraction of the current linear's packed words (default below; 0 turns it off).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import INTERPRET
from .layout import KernelWeight

RATIO = float(os.environ.get("AWQCONV_L2_PREFETCH", "0.5"))

# thread 0 of the program issues one bulk prefetch of $2 bytes at $1 (16-byte aligned, size % 16 == 0)
_PF_ASM = tl.constexpr("{ .reg .pred p; .reg .b32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0;\n"
                       "@p cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0; }")


@triton.jit
def share_of(pf_bytes):
    """(offset, size) of this program's piece of ``pf_bytes``: equal 16-byte multiples over the whole
    grid in program order (the last pieces may be short or empty, size <= 0)."""
    n = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    share = ((pf_bytes + n - 1) // n + 15) // 16 * 16
    lo = pid * share
    return lo, tl.minimum(share, pf_bytes - lo)


@triton.jit
def l2_prefetch(pf_ptr, pf_bytes, HAS_PF: tl.constexpr):
    """Prefetch this program's share (``share_of``) of [pf_ptr, pf_ptr + pf_bytes) into L2."""
    if HAS_PF:
        lo, size = share_of(pf_bytes)
        if size > 0:
            base = pf_ptr.to(tl.pointer_type(tl.int8)) + lo
            tl.inline_asm_elementwise(_PF_ASM, "=r,l,r", [base + tl.zeros((1,), tl.int32),
                                                          tl.full((1,), 0, tl.int32) + size],
                                      dtype=tl.int32, is_pure=False, pack=1)


def budget(own_bytes: int, next_bytes: int, ratio: float) -> int:
    """Bytes of the next weight to prefetch: ``ratio`` x our own, at most all of it, a multiple of 16."""
    return max(0, min(next_bytes, int(ratio * own_bytes))) // 16 * 16


def prefetch_args(kw: KernelWeight, nxt: KernelWeight | None, device: torch.device) -> dict:
    """Launch keywords ``pf_ptr``, ``pf_bytes``, ``HAS_PF`` for a kernel over ``kw`` that prefetches
    ``budget(.., RATIO)`` bytes of ``nxt``'s words (off without ``nxt``, off the GPU, before sm_90)."""
    nbytes = 0
    if nxt is not None and RATIO > 0 and device.type == "cuda" and not INTERPRET and torch.version.cuda:
        if torch.cuda.get_device_capability(device)[0] >= 9:
            nbytes = budget(kw.qw.numel() * 4, nxt.qw.numel() * 4, RATIO)
    if nbytes == 0:
        return {"pf_ptr": kw.qw, "pf_bytes": 0, "HAS_PF": False}
    return {"pf_ptr": nxt.qw, "pf_bytes": nbytes, "HAS_PF": True}
