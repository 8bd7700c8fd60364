"""Scale and clip search: restores weights exactly, never loses to the identity, handles NaN."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from awqconv.errors import CalibrationError
from awqconv.quant.grid import IntGrid
from awqconv.quant.mappings import LinearSlot, MappingSpec, PrevOp, ResolvedMapping
from awqconv.quant.search import candidate_scales, search_clip, search_scale, weight_magnitude


def _mapping(n_in: int = 64, n_out: int = 48, seed: int = 0) -> tuple[ResolvedMapping, nn.Linear, nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    norm = nn.Parameter(torch.rand(n_in, generator=g) + 0.5)
    lin = nn.Linear(n_in, n_out, bias=False)
    lin.weight.data = torch.randn(n_out, n_in, generator=g)
    m = ResolvedMapping(MappingSpec("norm", ("lin",), None), PrevOp("norm", norm, None), [LinearSlot("lin", lin.weight)])
    return m, lin, norm


def _outlier_inputs(n_in: int, n: int = 256, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    x[:, :4] *= 30.0  # salient channels, as in real LLM activations
    return x


def _loss_fn(lin: nn.Linear, x: torch.Tensor):
    ref = x @ lin.weight.data.T.clone()
    return lambda: float((x @ lin.weight.data.T - ref).pow(2).mean())


def test_candidates_include_identity_and_both_ends() -> None:
    x, w = torch.rand(16) + 0.1, torch.rand(16) + 0.1
    cands = candidate_scales(x, w, n_grid=20, duo=True)
    alphas = [a for a, _ in cands]
    assert alphas[0] == -1.0 and torch.equal(cands[0][1], torch.ones(16))
    assert 0.0 in alphas and 1.0 in alphas and len(alphas) == 22
    for _, s in cands[1:]:
        assert torch.isfinite(s).all()
        assert math.isclose(float(s.max() * s.min()), 1.0, rel_tol=1e-4)  # normalised


def test_search_restores_weights_bit_exactly_and_never_beats_identity_loss() -> None:
    m, lin, _ = _mapping()
    x = _outlier_inputs(64)
    before = lin.weight.data.clone()
    grid = IntGrid(4, 32)
    choice = search_scale(m, x.abs().mean(0), _loss_fn(lin, x), grid, 32, 20, True)
    # no trial leaks into the live weights (AutoAWQ's CPU aliasing bug compounded them)
    assert torch.equal(lin.weight.data, before)
    assert choice.loss_after <= choice.loss_before
    # with salient channels the search must find a real improvement over plain RTN
    assert choice.loss_after < 0.9 * choice.loss_before
    assert choice.alpha != -1.0


def test_search_without_finite_loss_raises_calibration_error() -> None:
    m, lin, _ = _mapping()
    with pytest.raises(CalibrationError, match="no finite loss"):
        search_scale(m, torch.ones(64), lambda: float("nan"), IntGrid(4, 32), 32, 4, True)


def test_weight_magnitude_is_per_input_channel() -> None:
    m, lin, _ = _mapping()
    wm = weight_magnitude(m.layers, 32)
    assert wm.shape == (64,)
    assert float(wm.max()) <= 1.0 and float(wm.min()) >= 0.0


def test_clip_search_never_increases_output_error() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g)
    w[::7, ::13] *= 8.0  # weight outliers that clipping can trade off
    x = torch.randn(200, 128, generator=g)
    grid = IntGrid(4, 32)
    max_val = search_clip(w, x, grid, 32, n_grid=20, max_shrink=0.5)
    absmax = w.reshape(64, 4, 32).abs().amax(-1)
    assert max_val.shape == (64, 4)
    assert bool((max_val <= absmax + 1e-6).all()) and bool((max_val >= 0.5 * absmax - 1e-6).all())
    wc = torch.maximum(torch.minimum(w.reshape(64, 4, 32), max_val[..., None]), -max_val[..., None]).reshape(64, 128)
    err_clip = (x @ grid.fake_quantize(wc).T - x @ w.T).pow(2).mean()
    err_plain = (x @ grid.fake_quantize(w).T - x @ w.T).pow(2).mean()
    assert err_clip <= err_plain
    assert bool((max_val < absmax - 1e-6).any()), "some group should be clipped"
