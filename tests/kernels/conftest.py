"""Kernel tests run the Triton kernels in the interpreter on the CPU; set it before triton loads."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
