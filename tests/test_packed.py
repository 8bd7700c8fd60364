"""Properties of the canonical packed weight (awqconv/packed.py) and the integer grid that fills it.

Bit layouts are checked against a Python-int reference (a row's bytes read as one little-endian
integer), dequantization against an elementwise float64 evaluation of the formula.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from awqconv.errors import ShapeError
from awqconv.packed import PackedLinear, bitwise_equal, pack_bits, packed_width, unpack_bits
from awqconv.quant.grid import IntGrid

SETTINGS = settings(max_examples=60, deadline=None)


def _rand_ints(shape, bits, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.int64).to(torch.uint8)


def _reference_unpack(row: bytes, bits: int, n: int) -> list[int]:
    """Element i sits at bits [i*bits, (i+1)*bits) of the row read as a little-endian integer."""
    word = int.from_bytes(row, "little")
    return [(word >> (i * bits)) & ((1 << bits) - 1) for i in range(n)]


@SETTINGS
@given(
    bits=st.integers(1, 8),
    rows=st.integers(0, 3),
    n=st.integers(0, 41),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_round_trip_and_layout(bits, rows, n, seed):
    q = _rand_ints((rows, n), bits, seed)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (rows, packed_width(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n), q)
    for r in range(rows):
        assert _reference_unpack(bytes(packed[r].tolist()), bits, n) == q[r].tolist()


def test_pack_bits_extra_leading_dims():
    q = _rand_ints((2, 3, 10), 3, seed=1)
    assert torch.equal(unpack_bits(pack_bits(q, 3), 3, 10), q)


def test_four_bit_byte_layout_matches_docstring():
    q = torch.tensor([[1, 2, 15, 0, 7]], dtype=torch.uint8)
    assert pack_bits(q, 4).tolist() == [[1 | 2 << 4, 15, 7]]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: pack_bits(torch.zeros(1, 4, dtype=torch.uint8), 0), "bits=0"),
        (lambda: pack_bits(torch.zeros(1, 4, dtype=torch.uint8), 9), "bits=9"),
        (lambda: unpack_bits(torch.zeros(1, 2, dtype=torch.int32), 4, 4), "uint8"),
        (lambda: unpack_bits(torch.zeros(1, 3, dtype=torch.uint8), 4, 4), "3 bytes"),
    ],
)
def test_pack_bits_errors(call, match):
    with pytest.raises(ShapeError, match=match):
        call()


@SETTINGS
@given(
    bits=st.integers(1, 8),
    out=st.integers(1, 9),
    groups=st.integers(1, 3),
    g=st.sampled_from([1, 3, 8, 16]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_from_ints_unpack_and_dequantize_formula(bits, out, groups, g, dtype, seed):
    n_in = groups * g
    q = _rand_ints((out, n_in), bits, seed)
    z = _rand_ints((out, groups), bits, seed + 1)
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(out, groups, generator=gen) * 0.05).to(dtype)
    p = PackedLinear.from_ints(q, z, s, g, bits)
    assert torch.equal(p.unpack(), q)
    w = p.dequantize(torch.float32)
    ql, zl, sl = q.tolist(), z.tolist(), s.to(torch.float64).tolist()
    expect = [[(ql[o][i] - zl[o][i // g]) * sl[o][i // g] for i in range(n_in)] for o in range(out)]
    assert torch.equal(w, torch.tensor(expect, dtype=torch.float64).to(torch.float32))
    assert bitwise_equal(p.dequantize(torch.float16), w.to(torch.float16))


def test_from_ints_rejects_bad_integers():
    z = torch.zeros(2, 1, dtype=torch.uint8)
    s = torch.ones(2, 1, dtype=torch.float16)
    with pytest.raises(ShapeError, match="q values"):
        PackedLinear.from_ints(torch.full((2, 8), 16), z, s, 8, 4)
    with pytest.raises(ShapeError, match="q values"):
        PackedLinear.from_ints(torch.full((2, 8), -1), z, s, 8, 4)
    with pytest.raises(ShapeError, match="zero points"):
        PackedLinear.from_ints(torch.zeros(2, 8, dtype=torch.int64), z + 16, s, 8, 4)
    with pytest.raises(ShapeError, match="integer"):
        PackedLinear.from_ints(torch.zeros(2, 8), z, s, 8, 4)
    with pytest.raises(ShapeError, match="2-D"):
        PackedLinear.from_ints(torch.zeros(8, dtype=torch.int64), z, s, 8, 4)


def _valid(**over):
    base = dict(
        qweight=torch.zeros(8, 16, dtype=torch.uint8),  # 8 outputs x 32 inputs at 4 bits
        scales=torch.ones(8, 2, dtype=torch.float16),
        zeros=torch.zeros(8, 2, dtype=torch.uint8),
        in_features=32,
        group_size=16,
        bits=4,
        bias=None,
    )
    base.update(over)
    return PackedLinear(**base)


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(bits=9), "bits=9"),
        (dict(group_size=12), "not a multiple of group_size=12"),
        (dict(group_size=0), "group_size=0"),
        (dict(qweight=torch.zeros(8, 16, dtype=torch.int32)), r"L\.qweight must be uint8"),
        (dict(qweight=torch.zeros(8, 15, dtype=torch.uint8)), r"L\.qweight has shape \(8, 15\)"),
        (dict(scales=torch.ones(8, 3, dtype=torch.float16)), r"L\.scales has shape"),
        (dict(zeros=torch.zeros(7, 2, dtype=torch.uint8)), r"L\.zeros has shape"),
        (dict(scales=torch.ones(8, 2, dtype=torch.float64)), r"L\.scales must be"),
        (dict(zeros=torch.zeros(8, 2, dtype=torch.int32)), r"L\.zeros must be uint8"),
        (dict(bias=torch.zeros(9, dtype=torch.float16)), r"L\.bias has shape"),
    ],
)
def test_validate_names_the_broken_tensor(over, match):
    _valid().validate("L")  # the base is valid
    with pytest.raises(ShapeError, match=match):
        _valid(**over).validate("L")


def test_equal_is_bitwise():
    p = _valid(scales=torch.zeros(8, 2, dtype=torch.float16))
    assert p.equal(_valid(scales=torch.zeros(8, 2, dtype=torch.float16)))
    assert not p.equal(_valid(scales=-torch.zeros(8, 2, dtype=torch.float16)))  # signed zero
    assert not p.equal(_valid(scales=torch.zeros(8, 2, dtype=torch.bfloat16)))
    assert not p.equal(_valid(bias=torch.zeros(8, dtype=torch.float16)))


@SETTINGS
@given(
    bits=st.integers(2, 8),
    out=st.sampled_from([8, 16, 24]),
    shape=st.sampled_from([(32, 32), (64, 32), (64, -1), (96, 32), (128, 64), (128, 128)]),
    zero_point=st.booleans(),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_intgrid_pack_dequantize_equals_fake_quantize(bits, out, shape, zero_point, dtype, seed):
    n_in, g = shape
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=gen) * torch.rand(out, 1, generator=gen)
    grid = IntGrid(bits=bits, group_size=g, zero_point=zero_point, scale_dtype=dtype)
    p = grid.pack(w)
    assert p.scales.dtype == dtype and p.bits == bits
    assert p.group_size == (n_in if g == -1 else g)
    assert bitwise_equal(p.dequantize(torch.float32), grid.fake_quantize(w))
    if not zero_point:
        assert bool((p.zeros == 1 << (bits - 1)).all())
    # the grid is a real quantizer: half a step of rounding error, plus up to ~1 step where
    # rounding the scale down to fp16/bf16 pushes a group's extremes past the clamp
    step = p.scales.to(torch.float32).repeat_interleave(p.group_size, dim=1)
    assert bool(((p.dequantize() - w).abs() <= 2.0 * step + 1e-6).all())  # measured max 1.46


@pytest.mark.parametrize(
    "out, n_in, g",
    [(8, 32, 32), (8, 64, -1), (8, 128, 128), (16, 40, -1), (8, 8, 8)],
    ids=["in==g", "per-channel", "in==g=128", "per-channel-odd-in", "tiny"],
)
def test_edge_shapes(out, n_in, g):
    w = torch.randn(out, n_in, generator=torch.Generator().manual_seed(3))
    b = torch.randn(out)
    grid = IntGrid(bits=4, group_size=g)
    p = grid.pack(w, b)
    groups = 1 if g in (-1, n_in) else n_in // g
    assert p.n_groups == groups and tuple(p.scales.shape) == tuple(p.zeros.shape) == (out, groups)
    assert p.out_features == out and p.in_features == n_in
    assert bitwise_equal(p.dequantize(), grid.fake_quantize(w))
    assert bitwise_equal(p.bias, b.to(torch.float16))
