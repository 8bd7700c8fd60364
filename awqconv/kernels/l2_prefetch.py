"""L2 prefetch of the next projection's weights from the decode attention kernel.

At long contexts the one-token attention reads the KV cache at ~2 TB/s (notes, run BQ), below what
the DRAM delivers to a flat read, and the o projection that follows reads its weights from DRAM
after it. Here each attention program asks the L2 for an equal share of the o projection's packed
words (``cp.async.bulk.prefetch.L2``: one instruction per program, Hopper and newer; no registers
held), so the o GEMV finds them there. It changes no result.
"""

from __future__ import annotations

import triton
import triton.language as tl

# thread 0 of the program issues one bulk prefetch of $2 bytes at $1 (16-byte aligned, size % 16 == 0)
_PF_ASM = tl.constexpr("{ .reg .pred p; .reg .b32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0;\n"
                       "@p cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0; }")


@triton.jit
def l2_prefetch_share(pf_ptr, pf_bytes, HAS_PF: tl.constexpr):
    """Prefetch this program's equal share (16-byte multiples, in program order over the whole grid)
    of [pf_ptr, pf_ptr + pf_bytes) into L2."""
    if HAS_PF:
        n = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
        pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
        share = ((pf_bytes + n - 1) // n + 15) // 16 * 16
        lo = pid * share
        size = tl.minimum(share, pf_bytes - lo)
        if size > 0:
            base = pf_ptr.to(tl.pointer_type(tl.int8)) + lo
            tl.inline_asm_elementwise(_PF_ASM, "=r,l,r", [base + tl.zeros((1,), tl.int32),
                                                          tl.full((1,), 0, tl.int32) + size],
                                      dtype=tl.int32, is_pure=False, pack=1)


def prefetch_bytes(nbytes: int, ratio: float) -> int:
    """``ratio`` of ``nbytes`` (at most all of it), a multiple of 16."""
    return max(0, min(nbytes, int(ratio * nbytes))) // 16 * 16

