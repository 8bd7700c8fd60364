"""The activation-aware scale search and the clip search (pure tensor math, fp32).

Scale search (as AutoAWQ computes it): for a mapping whose linears see activations with per-channel
mean magnitude ``x`` and normalised weight magnitude ``w``, try
``s = x^a / (w^(1-a) + 1e-4)`` (duo scaling) or ``s = x^a`` for ``a`` on ``0, 1/n, ..., 1`` plus the
identity ``s = 1``, normalise by ``sqrt(max(s) min(s))``, fake-quantize ``W * s`` and divide back,
and keep the ``s`` whose output (of the parent module, or of the linears themselves) is closest to
the float output. Because the identity is a candidate, the chosen ``s`` never does worse than
plain round-to-nearest on the search data. Weights are snapshotted with explicit clones: AutoAWQ's
``.cpu()`` "copy" aliases the live tensor on CPU and silently compounds every trial.

Clip search: per (output row, group), shrink the clamp range from max|w| down to
``(1 - max_shrink) * max|w|`` and keep the value minimising the group's output error on a sample
of tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..errors import CalibrationError
from .grid import Grid
from .mappings import LinearSlot, ResolvedMapping

LossFn = Callable[[], float]


@dataclass
class ScaleChoice:
    scales: Tensor  # fp32, one per prev-op channel (kv channel for v->o)
    alpha: float  # -1.0 = identity
    loss_before: float
    loss_after: float


def weight_magnitude(slots: list[LinearSlot], group_size: int) -> Tensor:
    """Mean over output rows of |W| normalised by its group's max |W|, per input channel."""
    w = torch.cat([s.weight.to(torch.float32) for s in slots], dim=0)
    n_in = w.shape[1]
    g = n_in if group_size == -1 or n_in % group_size else group_size
    wg = w.abs().reshape(-1, g)
    wg = wg / (wg.amax(dim=1, keepdim=True) + 1e-6)
    return wg.reshape(-1, n_in).mean(0)


def reduce_to_kv(v: Tensor, kv_index: Tensor) -> Tensor:
    """Average per-column statistics of o_proj's input over the query heads that share a kv channel."""
    n_kv = int(kv_index.max()) + 1
    total = torch.zeros(n_kv, dtype=v.dtype, device=v.device).index_add_(0, kv_index.to(v.device), v)
    count = torch.bincount(kv_index, minlength=n_kv).to(v)
    return total / count


def candidate_scales(x_mean: Tensor, w_mean: Tensor, n_grid: int, duo: bool) -> list[tuple[float, Tensor]]:
    """(alpha, s) pairs: the identity first, then alpha = 0, 1/n, ..., 1."""
    x = x_mean.to(torch.float32).clamp(min=0)
    w = w_mean.to(torch.float32)
    out = [(-1.0, torch.ones_like(x))]
    for k in range(n_grid + 1):
        a = k / n_grid
        s = x.pow(a) / (w.pow(1 - a) + 1e-4) if duo else x.pow(a)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
        out.append((a, s))
    return out


def input_scale(m: ResolvedMapping, s: Tensor) -> Tensor:
    """The per-input-column scale of the mapping's linears (expanded over heads for v->o)."""
    return s[m.kv_index.to(s.device)] if m.kv_index is not None else s


def apply_scale(m: ResolvedMapping, s: Tensor) -> None:
    """Fold ``s`` into the live layer: prev /= s, linears (and extra consumers) *= s."""
    m.prev.divide(s.to(m.prev.weight.device))
    s_in = input_scale(m, s)
    for slot in m.layers + m.extra:
        w = slot.weight
        w.mul_(s_in.to(w.device, w.dtype)[None, :])


def search_scale(
    m: ResolvedMapping,
    x_mean: Tensor,
    loss_of_current_weights: LossFn,
    grid: Grid,
    group_size: int,
    n_grid: int,
    duo: bool,
) -> ScaleChoice:
    """Try every candidate ``s`` and return the best; the layer's weights are left untouched."""
    w_mean = weight_magnitude(m.layers, group_size)
    if m.kv_index is not None:
        x_mean, w_mean = reduce_to_kv(x_mean, m.kv_index), reduce_to_kv(w_mean, m.kv_index)
    originals = [slot.weight.clone() for slot in m.layers]  # explicit copies, never aliases
    best: tuple[float, float, Tensor] | None = None
    identity_loss = math.inf
    try:
        for alpha, s in candidate_scales(x_mean, w_mean, n_grid, duo):
            s_in = input_scale(m, s)
            for slot, w0 in zip(m.layers, originals):
                w32 = w0.to(torch.float32)
                sc = s_in.to(w32.device)[None, :]
                slot.set_weight((grid.fake_quantize(w32 * sc) / sc).to(w0.dtype))
            loss = loss_of_current_weights()
            if alpha == -1.0:
                identity_loss = loss
            if math.isfinite(loss) and (best is None or loss < best[0]):
                best = (loss, alpha, s)
    finally:
        for slot, w0 in zip(m.layers, originals):
            slot.set_weight(w0)
    if best is None:
        raise CalibrationError(
            f"scale search for {m.prev.name} -> {', '.join(sl.name for sl in m.layers)} found no "
            "finite loss: the layer's outputs overflow; check the model for inf/NaN weights"
        )
    loss, alpha, s = best
    return ScaleChoice(s.detach().cpu(), alpha, identity_loss, loss)


def search_clip(
    w: Tensor,
    x: Tensor,
    grid: Grid,
    group_size: int,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    row_batch: int = 256,
) -> Tensor:
    """Best clamp value per (row, group) of ``w [out, in]`` given input samples ``x [n, in]``."""
    out_f, n_in = w.shape
    g = n_in if group_size == -1 else group_size
    n_groups = n_in // g
    xg = x.to(torch.float32).reshape(-1, n_groups, g)  # [n, G, g]
    best_max = torch.empty(out_f, n_groups, dtype=torch.float32, device=w.device)
    steps = int(max_shrink * n_grid)
    for r0 in range(0, out_f, row_batch):
        wb = w[r0 : r0 + row_batch].to(torch.float32)  # [o, in]
        wbg = wb.reshape(-1, n_groups, g)
        ref = torch.einsum("ngk,ogk->ong", xg, wbg)  # [o, n, G]
        absmax = wbg.abs().amax(-1)  # [o, G]
        best_err = torch.full_like(absmax, math.inf)
        chosen = absmax.clone()
        for i in range(steps + 1):
            max_val = absmax * (1 - i / n_grid)
            wc = torch.maximum(torch.minimum(wbg, max_val[..., None]), -max_val[..., None])
            wq = grid.fake_quantize(wc.reshape(-1, n_in)).reshape(-1, n_groups, g)
            err = (torch.einsum("ngk,ogk->ong", xg, wq) - ref).pow(2).mean(1)  # [o, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            chosen = torch.where(better, max_val, chosen)
        best_max[r0 : r0 + row_batch] = chosen
    return best_max


def apply_clip(slot: LinearSlot, max_val: Tensor) -> None:
    w = slot.weight
    out_f, n_in = w.shape
    n_groups = max_val.shape[1]
    mv = max_val.to(w.device, torch.float32)[..., None]
    wg = w.to(torch.float32).reshape(out_f, n_groups, -1)
    slot.set_weight(torch.maximum(torch.minimum(wg, mv), -mv).reshape(out_f, n_in).to(w.dtype))
