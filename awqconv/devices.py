"""The compute device a command runs on, checked before any work.

Every command's ``--device`` goes through :func:`resolve_device`: ``None`` picks CUDA when torch
sees a GPU and the CPU otherwise; anything else must name a device this machine has. A bad name
or a missing GPU is a usage error raised up front, not a traceback after the work.
"""

from __future__ import annotations

import torch

from .errors import UsageError

SUPPORTED_TYPES = ("cpu", "cuda")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """A ``torch.device`` for ``spec`` that exists here, or :class:`UsageError` naming the fix."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "auto")):
        return default_device()
    if isinstance(spec, torch.device):
        dev = spec
    else:
        try:
            dev = torch.device(spec.strip())
        except (RuntimeError, ValueError):
            raise UsageError(
                f"--device {spec!r} is not a device name; use cpu, cuda or cuda:N (or leave it out)"
            ) from None
    if dev.type not in SUPPORTED_TYPES:
        raise UsageError(f"--device {spec}: awqconv runs on {' or '.join(SUPPORTED_TYPES)}, not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {spec}: this machine has no CUDA device visible to torch "
                f"(torch {torch.__version__}); use --device cpu or leave --device out"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {spec}: only {n} CUDA device(s) here (cuda:0..cuda:{n - 1})")
    return dev
