"""The Triton RMSNorm / add+RMSNorm / SiLU-mul kernels (interpreter) against the runtime's torch
functions, which define the rounding. Tolerances: the residual sum is exact (one rounding in both);
the normalised output may differ by one fp16 ulp where rsqrt rounds differently (max 1e-3 relative
of the row scale); fp32 inputs agree to 1e-5."""

from __future__ import annotations

import pytest
import torch

from awqconv.kernels.launch import pdl_launch, pdl_supported
from awqconv.kernels.norm_act import add_rms_norm, rms_norm, silu_mul
from awqconv.runtime.layer_ops import add_rms_norm as _add_rms_norm
from awqconv.runtime.layer_ops import rms_norm as _rms_norm
from awqconv.runtime.layer_ops import silu_mul as _silu_mul

TOL = {torch.float16: 1e-3, torch.float32: 1e-5}


def _close(a, b, dtype):
    assert a.dtype == b.dtype and a.shape == b.shape
    err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    assert err <= TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 3, 96), (5, 200)])  # H not a power of two: masked tail
def test_rms_norm_and_add_rms_norm_match_torch(dtype, shape):
    torch.manual_seed(sum(shape))
    x = (torch.randn(shape) * 3).to(dtype)
    r = torch.randn(shape).to(dtype)
    w = (torch.rand(shape[-1]) + 0.5).to(dtype)
    _close(rms_norm(x, w, 1e-6), _rms_norm(x, w, 1e-6), dtype)
    s, y = add_rms_norm(x, r, w, 1e-5)
    s_ref, y_ref = _add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(s, s_ref)
    _close(y, y_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("lead,n", [((1,), 64), ((2, 3), 1500), ((4,), 2049)])
def test_silu_mul_on_fused_slices_matches_torch(dtype, lead, n):
    torch.manual_seed(n)
    gu = (torch.randn(*lead, 2 * n) * 4).to(dtype)
    g, u = gu.split([n, n], -1)  # strided rows, as the runtime passes them
    y = silu_mul(g, u)
    assert y.shape == (*lead, n) and y.is_contiguous()
    _close(y, _silu_mul(g, u), dtype)


def test_pdl_is_off_on_the_cpu_and_under_the_interpreter():
    assert not pdl_supported(torch.device("cpu"))
    assert pdl_launch(torch.device("cpu")) == {} and pdl_launch(torch.device("cpu"), True) == {}


def test_pdl_follows_its_argument_where_supported(monkeypatch):
    """Where the GPU supports PDL, ``pdl`` (RuntimeOptions.pdl) decides: on by default, off when
    asked, whatever the environment says."""
    from awqconv.kernels import launch

    monkeypatch.setattr(launch, "pdl_supported", lambda device: True)
    monkeypatch.setenv("AWQCONV_PDL", "0")  # no longer read
    dev = torch.device("cpu")
    assert launch.pdl_launch(dev) == {"USE_PDL": True, "launch_pdl": True} == launch.pdl_launch(dev, True)
    assert launch.pdl_launch(dev, False) == {}
