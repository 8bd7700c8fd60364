"""INT4 linear kernels: the kernel layout (layout.py), Triton kernels (triton_w4.py, launched by
ops.py), CPU paths (cpu.py) and the ``Int4Linear`` module (linear.py). Triton is imported only by
``ops``/``triton_w4``, so CPU-only use never needs a working Triton backend."""

from .layout import KernelWeight, supports
from .linear import Int4Linear

__all__ = ["Int4Linear", "KernelWeight", "supports"]
