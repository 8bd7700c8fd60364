"""INT4 kernels: the kernel layout (layout.py), the Triton INT4 linear kernels (triton_w4.py,
gemv_f16x2.py, tile_t.py) with their config (config.py) and launchers (ops.py), the decode step's
other Triton kernels (norm_act, rope_kv, gemv_fused, decode_attention, decode_prologue, dense_gemv,
argmax, sample), the MoE routing and grouped expert kernels (moe.py) over stacked experts
(experts.py), CPU paths (cpu.py) and the ``Int4Linear`` module (linear.py). Triton is imported
only by the kernel modules, so CPU-only use never needs a working Triton backend."""

from .layout import KernelWeight, supports
from .linear import Int4Linear

__all__ = ["Int4Linear", "KernelWeight", "supports"]
