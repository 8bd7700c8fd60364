"""The contract every format module meets, and the request types its ``plan()`` sees.

A format is a module (``canonical``, ``hf_awq``, ``gguf``, ``exllamav2``, ``peft``) exposing the
names of :class:`FormatModule` at module level. Modules, not classes: a format is a namespace of
pure functions over a QuantizedModel, imported lazily so one format's optional dependency
(gguf-py, llama-cpp-python) never breaks another. Type checkers accept a module wherever a
Protocol is expected (PEP 544), and ``tests/formats/test_protocol.py`` checks every registered
module against :func:`protocol_problems`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from ..model import QuantizedModel


@dataclass(frozen=True)
class Target:
    """One requested output: ``name`` or ``name:variant`` (``gguf:q4_0``)."""

    name: str
    variant: str | None = None

    @property
    def label(self) -> str:
        return self.name if self.variant is None else f"{self.name}:{self.variant}"

    @property
    def dirname(self) -> str:
        """The sub-directory of the output that holds this artifact."""
        return self.label.replace(":", "-")


@dataclass
class ExportRequest:
    """What a format's plan() may inspect before any work is done."""

    target: Target
    hf_config: dict[str, Any]
    bits: int
    group_size: int  # as configured: -1 (per channel) is NOT replaced by each layer's in_features
    zero_point: bool
    scale_dtype: torch.dtype
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (out, in)


@runtime_checkable
class FormatModule(Protocol):
    """What ``get_format(name)`` returns."""

    NAME: str  # "hf-awq", "gguf", ... (the name --to takes)

    def plan(self, request: ExportRequest) -> list[str]:
        """Problems that would make write() fail, from shapes and settings alone; no side effects."""
        ...

    def write(self, qm: QuantizedModel, out_dir: Path, variant: str | None = None) -> Any:
        """Write ``qm`` into the existing empty directory ``out_dir``."""
        ...

    def read(self, path: Path) -> QuantizedModel:
        """The artifact at ``path`` back as canonical integers (exactly, where the format holds them)."""
        ...

    def detect(self, path: Path) -> bool:
        """Does this directory (or file) hold this format?"""
        ...

    def uses_prescaled(self, variant: str | None) -> bool:
        """Does writing ``variant`` read ``QuantizedModel.prescaled`` (the AWQ-scaled float weights)?

        True only for writers that re-quantize onto another grid; ``convert`` keeps the prescaled
        weights in memory only when a target says so (or ``keep_prescaled`` asks to store them).
        """
        ...


# member -> the positional parameters it takes (a module implements them as plain functions)
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "plan": ("request",),
    "write": ("qm", "out_dir", "variant"),
    "read": ("path",),
    "detect": ("path",),
    "uses_prescaled": ("variant",),
}


def protocol_problems(module: ModuleType) -> list[str]:
    """Why ``module`` does not meet :class:`FormatModule` (empty when it does)."""
    problems = []
    if not isinstance(getattr(module, "NAME", None), str):
        problems.append(f"{module.__name__}.NAME is not a string")
    for member, params in _SIGNATURES.items():
        fn = getattr(module, member, None)
        if not callable(fn):
            problems.append(f"{module.__name__}.{member} is missing")
            continue
        got = tuple(inspect.signature(fn).parameters)
        if got[: len(params)] != params or any(
            p.default is inspect.Parameter.empty for p in list(inspect.signature(fn).parameters.values())[len(params):]
        ):
            problems.append(f"{module.__name__}.{member}{inspect.signature(fn)} does not take {params}")
    if not isinstance(module, FormatModule):
        problems.append(f"{module.__name__} is not a FormatModule")
    return problems
