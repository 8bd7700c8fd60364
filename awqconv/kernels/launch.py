"""Programmatic dependent launch (PDL) for the Triton kernels: when it may be used, and the two
in-kernel calls.

A kernel launched with ``launch_pdl`` may start while the previous kernel on the stream is still
running. Each of our kernels calls ``pdl_start`` first (the next kernel may be scheduled now) and
``pdl_wait`` before it reads anything the previous kernel wrote or writes anything at all; the code
between the two only reads constants (quantised weights). Chains of such kernels (norm -> GEMV ->
RoPE/KV -> ...) then overlap each launch and prologue with the tail of the kernel before.
Hopper (sm_90) and newer; every launcher takes ``pdl`` (default on) to turn it off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import INTERPRET

try:  # grid dependency control; absent from some Triton builds
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - then pdl_supported() is False and the calls are never traced
    gdc_launch_dependents = gdc_wait = None

_CAPABLE: dict[torch.device, bool] = {}


def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` may use programmatic dependent launch."""
    if device.type != "cuda" or INTERPRET or gdc_wait is None or torch.version.cuda is None:
        return False
    if device not in _CAPABLE:
        _CAPABLE[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return _CAPABLE[device]


def pdl_launch(device: torch.device, pdl: bool = True) -> dict:
    """Launch keywords for a kernel taking ``USE_PDL``: PDL on where asked (``pdl``) and supported;
    empty otherwise (the kernel's default is off)."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl and pdl_supported(device) else {}


@triton.jit
def pdl_start(USE_PDL: tl.constexpr):
    """Let the next PDL-launched kernel be scheduled now (it waits for us before using our outputs)."""
    if USE_PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait until the previous kernel has finished and its writes are visible."""
    if USE_PDL:
        gdc_wait()
