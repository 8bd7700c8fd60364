"""Capturing decoder-layer inputs and per-module activations during calibration.

``capture_layer_inputs`` runs the model up to its first decoder layer and records, per chunk of
calibration blocks, the hidden states and the keyword arguments the model passes to its layers
(rotary embeddings, masks), so every layer can be run on its own afterwards (AutoAWQ's "Catcher").
``ActivationRecorder`` hooks modules inside one layer: it accumulates the mean absolute input
per channel over every token, and keeps the raw inputs (and call kwargs) of the first chunks,
the search subset, for the loss. For modules in ``gram`` (a linear scored on its own output) it
instead accumulates the Gram matrix ``X^T X`` over every token: the squared output error of any
weight change ``D`` is then ``sum((D @ G) * D)``, all tokens at the cost of one ``[out, in, in]``
product per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


class _Stop(Exception):
    pass


@dataclass
class Chunk:
    hidden: Tensor  # [b, seq, hidden] on the compute device
    kwargs: dict[str, Any]


def _to(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    if isinstance(obj, Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, blocks: Tensor, chunk_blocks: int, device: torch.device
) -> list[Chunk]:
    """Hidden states and kwargs entering ``layers[0]`` for each chunk of ``blocks``, in fp32."""
    first = layers[0]
    captured: list[Chunk] = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        captured.append(Chunk(hidden.to(device, torch.float32), _to(kw, device, torch.float32)))
        raise _Stop

    # only what runs before the first layer needs to be on the device
    base = getattr(model, "model", model)
    pre = [m for n, m in base.named_children() if not isinstance(m, nn.ModuleList)]
    moved = [(m, next(m.parameters(), None)) for m in pre]
    for m in pre:
        m.to(device)
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, blocks.shape[0], chunk_blocks):
            ids = blocks[i : i + chunk_blocks].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        for m, p in moved:
            if p is not None:
                m.to(p.device)
    return captured


def run_module(mod: nn.Module, hidden: Tensor, kwargs: dict[str, Any], as_kw: bool) -> Tensor:
    out = mod(hidden_states=hidden, **kwargs) if as_kw else mod(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def fit_kwargs(kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
    """Slice batch-sized tensors captured for a full chunk down to a smaller batch."""
    def fit(v: Any) -> Any:
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] > batch and v.shape[0] != 1:
            return v[:batch]
        if isinstance(v, tuple):
            return tuple(fit(x) for x in v)
        return v
    return {k: fit(v) for k, v in kwargs.items()}


@dataclass
class Recorded:
    abs_sum: Tensor | None = None
    count: int = 0
    inputs: list[Tensor] = field(default_factory=list)  # search-subset inputs, one per chunk
    gram: Tensor | None = None  # X^T X over every token (modules scored through it)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    as_kw: bool = False

    @property
    def x_mean(self) -> Tensor:
        assert self.abs_sum is not None, "module never ran"
        return self.abs_sum / max(self.count, 1)


class ActivationRecorder:
    """Forward pre-hooks on named modules of one layer (see module docstring)."""

    def __init__(self, layer: nn.Module, paths: list[str], gram: frozenset[str] = frozenset()):
        self.records: dict[str, Recorded] = {p: Recorded() for p in paths}
        self.gram = gram
        self.keep = False
        self._handles = []
        modules = dict(layer.named_modules())
        for p in paths:
            self._handles.append(
                modules[p].register_forward_pre_hook(self._make_hook(p), with_kwargs=True)
            )

    def _make_hook(self, path: str):
        rec = self.records[path]

        def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if args:
                x, rec.as_kw = args[0], False
            else:
                x, rec.as_kw = kwargs["hidden_states"], True
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            s = flat.abs().sum(0)
            rec.abs_sum = s if rec.abs_sum is None else rec.abs_sum + s
            rec.count += flat.shape[0]
            if path in self.gram:
                g = flat.T @ flat
                rec.gram = g if rec.gram is None else rec.gram + g
            elif self.keep:
                rec.inputs.append(x.detach())
                rec.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@torch.no_grad()
def sample_module_inputs(layer: nn.Module, chunks: list[Chunk], names: list[str]) -> dict[str, Tensor]:
    """Flattened ``[tokens, channels]`` inputs of the named modules, run with the current weights."""
    modules = dict(layer.named_modules())
    got: dict[str, list[Tensor]] = {n: [] for n in names}

    def make(n: str):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            got[n].append(x.detach().reshape(-1, x.shape[-1]))
        return hook

    handles = [modules[n].register_forward_pre_hook(make(n), with_kwargs=True) for n in names if n in modules]
    try:
        for c in chunks:
            layer(c.hidden, **fit_kwargs(c.kwargs, c.hidden.shape[0]))
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items() if v}


def subsample(x: Tensor, n: int) -> Tensor:
    step = max(1, x.shape[0] // n)
    return x[::step][:n]
