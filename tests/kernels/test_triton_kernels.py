"""Every Triton INT4 linear kernel the defaults use (the one-row fp16x2 GEMV, the fp32 CUDA-core
GEMV, the split-K merge, the dequantise kernel; the transposed tile in test_tile_t.py), in the
interpreter, against a float64 reference of (q - z) * s.

Tolerances (written per test) come from the output dtype: the kernels accumulate in fp32 and round
once on store, so ||y - ref|| / ||ref|| sits near the unit roundoff of the output (fp16 2^-11,
bf16 2^-8); we allow 4x fp16 (2e-3) and 4x bf16 (1.6e-2).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from awqconv.kernels.config import KernelConfig
from awqconv.kernels.layout import KernelWeight
from awqconv.kernels.ops import dequantize, w4_matmul
from awqconv.packed import PackedLinear
from tests.kernels.kernel_checks import _check, _reference, _workspace_clean

# (N, K, group): N not a multiple of any block, K = one group, per-channel with a non-power-of-two
# group (576 = 9 * 64), groups of 24 (chunks of 8), and a plain g128 case.
SHAPES = [(72, 256, 64), (40, 64, 64), (24, 576, 576), (48, 96, 24), (136, 256, 128)]


@pytest.mark.parametrize("n,k,g", SHAPES)
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_kernel(make_packed, n, k, g, m):
    """CUDA-core GEMV (M <= 4), auto split-K; tolerance TOL (fp16 output)."""
    p = make_packed(n, k, g, bias=m == 3, seed=n + m)
    kw = KernelWeight.from_packed(p)
    x = torch.randn(m, k).half()
    kc = min(64, k & -k, g & -g)
    cfg = KernelConfig("gemv", block_m=1 if m == 1 else 4, block_n=32, kc=kc, split_k=0)
    _check(w4_matmul(x, kw, cfg), _reference(x, p), torch.float16)
    assert _workspace_clean()


@pytest.mark.parametrize("split", [1, 2, 3])
def test_gemv_split_k_variants_agree(make_packed, split):
    """Each split count gives the same function (TOL, fp16), tickets re-armed."""
    p = make_packed(40, 384, 64, seed=11)
    kw = KernelWeight.from_packed(p)
    x = torch.randn(1, 384).half()
    y = w4_matmul(x, kw, KernelConfig("gemv", block_n=16, kc=32, split_k=split))
    _check(y, _reference(x, p), torch.float16)
    assert _workspace_clean()


@pytest.mark.parametrize("n,k,g", SHAPES)
@pytest.mark.parametrize("split,bias", [(0, True), (2, False), (3, True), (1, False), (16, False)])
def test_gemv_f16x2_kernel(make_packed, n, k, g, split, bias):
    """fp16x2 decode GEMV (inline PTX on the GPU; its fp16-rounding emulation here), split-K parked
    and merged or not (more splits than chunks included): each word's 8 products are summed in fp16
    (two 4-term lanes), the rest in fp32, so allow TOL fp16, as for the fp32 GEMV."""
    p = make_packed(n, k, g, bias=bias, seed=n + k)
    kw = KernelWeight.from_packed(p)
    x = torch.randn(1, k).half()
    kc = min(64, k & -k, g & -g)
    cfg = KernelConfig("gemv_f16x2", block_n=32, kc=kc, split_k=split)
    _check(w4_matmul(x, kw, cfg), _reference(x, p), torch.float16)
    assert _workspace_clean()


@pytest.mark.parametrize("amp", [1e-3, 3e3, 6.5e4])
def test_gemv_f16x2_extreme_activations(make_packed, amp):
    """Activations near fp16's limits: with the 1/64 folded into the weights every fp16 lane stays
    finite (4 products of |q - z|/64 <= 15/64 and |x| <= 65504), and tiny ones keep TOL fp16."""
    p = make_packed(40, 256, 64, seed=5)
    q, z = p.unpack(), p.zeros.clone()
    q[:, :8], z[:, 0] = 0, 15  # one word of q - z = -15 everywhere: the largest lane sums
    scales = torch.full_like(p.scales, min(1e-2, 5 / amp))  # keeps the output inside fp16
    p = PackedLinear.from_ints(q, z, scales, 64)
    kw = KernelWeight.from_packed(p)
    x = (torch.rand(1, 256) * 2 - 1).mul(amp).half()
    x[0, :8] = amp
    y = w4_matmul(x, kw, KernelConfig("gemv_f16x2", block_n=16, kc=64, split_k=1))
    _check(y, _reference(x, p), torch.float16)


@pytest.mark.parametrize("n,k,g", SHAPES)
@pytest.mark.parametrize("split,bias", [(0, True), (2, False)])
def test_gemv_f16x2_bf16_activations(make_packed, n, k, g, split, bias):
    """One bf16 row through the fp16x2 GEMV: x enters as fp16 x / 16 (exact), so the dot keeps fp16's
    precision and only the bf16 store rounds: TOL bf16 against the reference, and an error within
    1.25x the fp32 CUDA-core GEMV's (both are dominated by the one bf16 rounding; bf16 products
    would roughly double it)."""
    p = make_packed(n, k, g, dtype=torch.bfloat16, bias=bias, seed=n + k + 1)
    kw = KernelWeight.from_packed(p)
    x = torch.randn(1, k).bfloat16()
    kc = min(64, k & -k, g & -g)
    y = w4_matmul(x, kw, KernelConfig("gemv_f16x2", block_n=32, kc=kc, split_k=split))
    ref = _reference(x, p)
    _check(y, ref, torch.bfloat16)
    y32 = w4_matmul(x, kw, KernelConfig("gemv", block_n=32, kc=kc, split_k=split))
    err, err32 = ((y.double() - ref).norm() / ref.norm()).item(), ((y32.double() - ref).norm() / ref.norm()).item()
    assert err <= 1.25 * err32 + 1e-5, (err, err32)
    assert _workspace_clean()


@pytest.mark.parametrize("amp", [1e-3, 6.5e4, 5e5])
def test_gemv_f16x2_bf16_activations_beyond_fp16_range(make_packed, amp):
    """bf16 activations past fp16's 65504 (x / 16 is still finite in fp16) keep TOL bf16."""
    p = make_packed(40, 256, 64, dtype=torch.bfloat16, seed=6)
    scales = torch.full_like(p.scales, min(1e-2, 5 / amp))  # keeps the output well inside bf16 steps
    p = PackedLinear.from_ints(p.unpack(), p.zeros.clone(), scales, 64)
    kw = KernelWeight.from_packed(p)
    x = (torch.rand(1, 256) * 2 - 1).mul(amp).bfloat16()
    y = w4_matmul(x, kw, KernelConfig("gemv_f16x2", block_n=16, kc=64, split_k=1))
    _check(y, _reference(x, p), torch.bfloat16)


def test_gemv_f16x2_refuses_other_inputs(make_packed):
    from awqconv.errors import ShapeError
    from awqconv.kernels import ops

    kw = KernelWeight.from_packed(make_packed(16, 64, 32, seed=1))
    with pytest.raises(ShapeError, match="block_m=1"):
        w4_matmul(torch.randn(2, 64).half(), kw, KernelConfig("gemv_f16x2", block_n=16, kc=32))
    with pytest.raises(ShapeError, match="one-row"):
        w4_matmul(torch.randn(2, 64).half(), kw, KernelConfig("gemv_f16x2", block_m=2, block_n=16, kc=32))
    with pytest.raises(ShapeError, match="fp16 or bf16 activations"):
        w4_matmul(torch.randn(1, 64), kw, KernelConfig("gemv_f16x2", block_n=16, kc=32))
    with pytest.raises(ShapeError, match="dequant"):  # dequantise + matmul is w4_matmul's, not a tile launch
        ops.plan_matmul(torch.randn(300, 64).half(), kw, KernelConfig("dequant", block_n=256, kc=32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,g", [(72, 256, 64), (24, 96, 24), (40, 576, 576)])
@pytest.mark.parametrize("kc,bn", [(32, 256), (32, 128), (8, 32), (64, 64)])
def test_dequant_kernel_is_bit_exact(make_packed, dtype, n, k, g, kc, bn):
    """Dequantise kernel (the default tile, kc 32 x 256, and others), both load styles (each word
    once where kc divides the group, g = 24 with kc 32 or 64 the per-element gather): tolerance
    zero, equal to PackedLinear.dequantize(dtype) bit for bit."""
    p = make_packed(n, k, g, dtype=dtype, seed=n)
    cfg = KernelConfig("dequant", block_n=bn, kc=kc)
    w = dequantize(KernelWeight.from_packed(p), dtype, config=cfg)
    assert torch.equal(w, p.dequantize(dtype).t())


@pytest.mark.parametrize("m,cfg", [
    (1, KernelConfig("gemv_f16x2", block_n=32, kc=32, split_k=3, num_warps=1)),
    (1, KernelConfig("gemv_f16x2", block_n=64, kc=64, split_k=-16, num_warps=2)),  # the default's shape
    (5, KernelConfig("tile_t", block_m=16, block_n=64, kc=32, split_k=4, prefetch=2)),
    (20, KernelConfig("tile_t", block_m=16, block_n=64, kc=64, split_k=2, prefetch=1)),
])
@pytest.mark.parametrize("bias", [False, True])
def test_parked_split_k_merge_sums_the_partials_in_split_order(make_packed, m, cfg, bias):
    """Split-K partials of the one-row GEMV and tile_t are parked and summed by w4_merge_kernel:
    the output is bit for bit the fp32 sum of the parked partials in split order, plus the bias,
    rounded once (tolerance zero), and within TOL of the reference; deterministic; tickets unused."""
    from awqconv.kernels import ops
    from awqconv.kernels.workspace import WORKSPACE

    p = make_packed(200, 256, 64, bias=bias, seed=m + bias)
    kw = KernelWeight.from_packed(p)
    x = torch.randn(m, 256).half()
    plan = ops.plan_matmul(x, kw, cfg)
    split = plan.grid[2]
    assert split > 1 and plan.then is not None and plan.meta["PARK"]
    y = plan()
    parts = plan.partials[: split * m * 200].view(split, m, 200)
    want = torch.zeros(m, 200)
    for part in parts:  # the merge kernel's order: split 0 first
        want += part
    if bias:
        want += p.bias.float()
    assert torch.equal(y, want.half())
    assert torch.equal(y, ops.plan_matmul(x, kw, cfg)())
    _check(y, _reference(x, p), torch.float16)
    assert not WORKSPACE.cnt[torch.device("cpu")].any()
    assert ops.plan_matmul(x, kw, replace(cfg, split_k=1)).then is None  # nothing to merge


@pytest.mark.parametrize("m", [1, 4, 9, 40, 130, 600])
def test_default_dispatch(make_packed, m):
    """The default config of every M bucket (fp16x2 GEMV, transposed tile at BM 16/64/128, dequant +
    matmul), and bf16's; TOL fp16."""
    from awqconv.kernels import config

    p = make_packed(48, 128, 32, bias=True, seed=m)
    kw = KernelWeight.from_packed(p)
    x = torch.randn(m, 128).half()
    cfg = config.default_config(m, kw, x.device)
    assert cfg.kind == ("gemv_f16x2" if m == 1 else "tile_t" if m < config.DEQUANT_MIN_M else "dequant")
    assert config.default_config(m, kw, x.device, torch.bfloat16).kind == cfg.kind  # bf16 takes the same kernels
    _check(w4_matmul(x, kw), _reference(x, p), torch.float16)


@pytest.mark.parametrize("m,threshold,kind", [(1, 2, "gemv_f16x2"), (4, 4, "dequant"), (4, 5, "tile_t"),
                                              (300, 257, "dequant"), (300, 301, "tile_t")])
def test_dequant_threshold_is_an_argument(make_packed, m, threshold, kind):
    """``dequant_min_m`` (RuntimeOptions.dequant_min_m) reaches the dispatch: from that many rows
    dequantise + matmul, below it the tile; one row is always the GEMV. Same function either way."""
    from awqconv.kernels import config

    p = make_packed(48, 128, 32, bias=True, seed=m)
    kw = KernelWeight.from_packed(p)
    x = torch.randn(m, 128).half()
    assert config.default_config(m, kw, x.device, dequant_min_m=threshold).kind == kind
    default = config.default_config(m, kw, x.device).kind
    assert default == ("gemv_f16x2" if m == 1 else "tile_t" if m < 257 else "dequant")
    _check(w4_matmul(x, kw, dequant_min_m=threshold), _reference(x, p), torch.float16)


@pytest.mark.parametrize("k,n", [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (576, 72), (64, 40)])
def test_one_row_default_is_one_resident_wave(monkeypatch, k, n):
    """The one-row GEMV's default grid (Llama-2-7B shapes and small ones, 132 SMs) never exceeds 16
    programs per SM, and its register cap lets 16 of its 2-warp programs share an SM's 64K registers:
    the whole grid is resident at once."""
    from types import SimpleNamespace

    from awqconv.kernels import config

    monkeypatch.setattr(config, "_n_sm", lambda device: 132)
    kw = SimpleNamespace(out_features=n, in_features=k, group_size=128 if k % 128 == 0 else 64)
    cfg = config.default_config(1, kw, torch.device("cpu"))
    tiles = -(-n // cfg.block_n)
    split, k_split = config.split_for(cfg, tiles, k, torch.device("cpu"))
    assert cfg.kind == "gemv_f16x2" and split * k_split >= k and (split - 1) * k_split < k
    assert tiles * split <= config.ONE_WAVE_PROGRAMS * 132
    assert config.ONE_WAVE_PROGRAMS * cfg.num_warps * 32 * cfg.maxnreg <= 65536


def test_small_groups_stay_on_cuda_cores(make_packed):
    """Groups of 8 are below a tensor-core K tile: every M under DEQUANT_MIN_M takes the CUDA-core
    GEMV (several row blocks at M = 20); TOL fp16."""
    from awqconv.kernels import config

    p = make_packed(24, 64, 8, seed=4)
    kw = KernelWeight.from_packed(p)
    x = torch.randn(20, 64).half()
    assert config.default_config(20, kw, x.device).kind == "gemv"
    _check(w4_matmul(x, kw), _reference(x, p), torch.float16)


def test_strided_rows_and_repeat_calls(make_packed):
    """A row-strided input view and two calls in a row give identical results (workspace reuse)."""
    p = make_packed(40, 128, 32, seed=2)
    kw = KernelWeight.from_packed(p)
    big = torch.randn(2, 256).half()
    x = big[:, :128]
    cfg = KernelConfig("gemv", block_m=2, block_n=16, kc=32, split_k=2)
    y1, y2 = w4_matmul(x, kw, cfg), w4_matmul(x, kw, cfg)
    assert torch.equal(y1, y2)  # split-K partials are summed in a fixed order: deterministic
    _check(y1, _reference(x, p), torch.float16)
