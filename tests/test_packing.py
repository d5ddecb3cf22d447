"""Tests of :mod:`fxmemopt.runtime.packing`: exact, lossless bit-packing of small-integer tensors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fxmemopt.runtime.packing import (
    _INT_VIEW,
    SUPPORTED_BITS,
    PackedTensor,
    bits_for_max,
    packed_nbytes,
    try_pack,
    unpack,
)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.uint8)
ALL_DTYPES = FLOAT_DTYPES + INT_DTYPES + (torch.bool,)
# Same-width integer views: bitwise comparison of floats (so -0.0 != +0.0 and NaN == NaN of the same payload).
INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit pattern of every element."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = INT_VIEW.get(a.dtype)
    if view is not None:
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


def values_for(bits: int, numel: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``numel`` values covering ``{0..2**bits-1}`` (as far as ``dtype`` allows), deterministic."""
    hi = 1 if dtype == torch.bool else (1 << bits) - 1
    gen = torch.Generator().manual_seed(seed)
    v = torch.randint(0, hi + 1, (numel,), generator=gen)
    if numel > hi:  # make sure both ends of the range occur
        v[0], v[-1] = 0, hi
    return v.to(dtype)


def roundtrip(t: torch.Tensor, bits: int) -> tuple[PackedTensor, torch.Tensor]:
    p = try_pack(t, bits)
    assert p is not None, f"{t.dtype} {tuple(t.shape)} at {bits} bits was rejected"
    return p, unpack(p)


# ------------------------------------------------------------------------------------------------------------
# bits_for_max / packed_nbytes
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("hi", "bits"), [
    (None, 0), (-1, 0), (-100, 0), (0, 1), (1, 1), (2, 2), (3, 2), (4, 8), (5, 8), (127, 8), (255, 8),
    (256, 0), (10**9, 0),
])
def test_bits_for_max(hi, bits):
    assert bits_for_max(hi) == bits


@pytest.mark.parametrize(("numel", "bits", "nbytes"), [
    (0, 1, 0), (1, 1, 1), (7, 1, 1), (8, 1, 1), (9, 1, 2), (13, 1, 2), (16, 1, 2), (17, 1, 3),
    (0, 2, 0), (1, 2, 1), (4, 2, 1), (5, 2, 2), (9, 2, 3),
    (0, 8, 0), (1, 8, 1), (13, 8, 13),
])
def test_packed_nbytes_table(numel, bits, nbytes):
    assert packed_nbytes(numel, bits) == nbytes


def test_supported_bits():
    assert SUPPORTED_BITS == (1, 2, 8)


# ------------------------------------------------------------------------------------------------------------
# Round trip, sizes, dtypes, shapes
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 13, 64, 255, 1000])
def test_roundtrip_bitwise_and_exact_size(dtype, bits, numel):
    x = values_for(bits, numel, dtype, seed=numel)
    p, y = roundtrip(x, bits)
    assert bitwise_equal(y, x)
    assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device
    assert p.bits == bits and p.dtype == dtype and p.shape == x.shape and p.numel == numel
    assert p.payload.dtype == torch.uint8 and p.payload.dim() == 1
    assert p.nbytes == packed_nbytes(numel, bits) == math.ceil(numel * bits / 8)
    if bits == 1:
        assert p.nbytes == (numel + 7) // 8


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_documented_layout_lsb_first(bits):
    # value k*per + i sits at bits [i*bits, (i+1)*bits) of byte k; the last byte is zero-padded.
    per = 8 // bits
    vals = [(3 * i + 1) % (1 << bits) for i in range(2 * per + 1)]
    p = try_pack(torch.tensor(vals, dtype=torch.float32), bits)
    expected = [0] * packed_nbytes(len(vals), bits)
    for j, v in enumerate(vals):
        expected[j // per] |= v << ((j % per) * bits)
    assert p.payload.tolist() == expected


def test_docstring_example():
    s = (torch.rand(4, 3, 5, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    p = try_pack(s, bits=1)
    assert p.nbytes == 8
    assert torch.equal(unpack(p), s)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (0, 0), (2, 0)])
def test_empty_tensors(dtype, bits, shape):
    x = torch.zeros(shape, dtype=dtype)
    p, y = roundtrip(x, bits)
    assert p.nbytes == 0 == packed_nbytes(0, bits)
    assert y.shape == x.shape and y.dtype == dtype


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("value", [0, 1])
def test_zero_dim_tensors(dtype, bits, value):
    x = torch.tensor(value, dtype=dtype)
    assert x.dim() == 0
    p, y = roundtrip(x, bits)
    assert y.shape == () and bitwise_equal(y, x)
    assert p.nbytes == 1


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("value", [2, 3, 200, 255])
def test_zero_dim_larger_values(bits, value):
    x = torch.tensor(float(value))
    p = try_pack(x, bits)
    if value < (1 << bits):
        assert p is not None and bitwise_equal(unpack(p), x)
    else:
        assert p is None


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_full_range_each_width(bits):
    # every representable value, for every dtype that can hold them
    hi = (1 << bits) - 1
    for dtype in FLOAT_DTYPES + INT_DTYPES:
        x = torch.arange(hi + 1).to(dtype)
        _, y = roundtrip(x, bits)
        assert bitwise_equal(y, x), dtype


# ------------------------------------------------------------------------------------------------------------
# Layout: strides, views, storage offsets
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.uint8, torch.bool, torch.int64), ids=str)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("perm", [(1, 0, 2), (2, 1, 0), (0, 2, 1), (2, 0, 1)])
def test_permuted_dense_keeps_strides(dtype, bits, perm):
    base = values_for(bits, 3 * 5 * 7, dtype, seed=1).view(3, 5, 7)
    x = base.permute(perm)
    assert not x.is_contiguous()
    p, y = roundtrip(x, bits)
    assert y.stride() == x.stride()
    assert y.shape == x.shape
    assert bitwise_equal(y, x)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_channels_last_keeps_strides(bits):
    x = values_for(bits, 2 * 3 * 4 * 5, torch.float32, seed=2).view(2, 3, 4, 5)
    x = x.contiguous(memory_format=torch.channels_last)
    _, y = roundtrip(x, bits)
    assert y.stride() == x.stride()
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert bitwise_equal(y, x)


@pytest.mark.parametrize("dtype", (torch.float32, torch.uint8, torch.bool), ids=str)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_dense_view_with_storage_offset(dtype, bits):
    base = values_for(bits, 4 * 9, dtype, seed=3).view(4, 9)
    x = base[2]  # dense, storage_offset 18
    assert x.storage_offset() == 18
    p, y = roundtrip(x, bits)
    assert bitwise_equal(y, x)
    assert p.nbytes == packed_nbytes(9, bits)
    xt = base[1:3].t()  # dense after a permutation, non-zero offset
    _, yt = roundtrip(xt, bits)
    assert yt.stride() == xt.stride() and bitwise_equal(yt, xt)


NON_DENSE_DTYPES = (torch.float32, torch.float16, torch.uint8, torch.bool, torch.int32)


@pytest.mark.parametrize("dtype", NON_DENSE_DTYPES, ids=str)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("view", ["step_cols", "step_rows", "expand", "col", "narrow_inner"])
def test_non_dense_views_roundtrip_contiguous(dtype, bits, view):
    base = values_for(bits, 6 * 8, dtype, seed=4).view(6, 8)
    x = {
        "step_cols": lambda: base[:, ::2],
        "step_rows": lambda: base[::3],
        "expand": lambda: base[:1].expand(5, 8),
        "col": lambda: base[:, 3],
        "narrow_inner": lambda: base[:, 1:6],
    }[view]()
    p, y = roundtrip(x, bits)
    assert bitwise_equal(y, x)
    assert y.is_contiguous()
    assert p.nbytes == packed_nbytes(x.numel(), bits)


def test_size_one_dims_with_odd_strides():
    x = torch.ones(1, 1, dtype=torch.float32).as_strided((1, 1), (5, 7))
    p, y = roundtrip(x, 1)
    assert bitwise_equal(y, x) and p.nbytes == 1


# ------------------------------------------------------------------------------------------------------------
# Freshness and non-mutation
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_unpack_returns_fresh_tensor(dtype, bits):
    x = values_for(bits, 21, dtype, seed=5)
    p = try_pack(x, bits)
    payload_before = p.payload.clone()
    y1 = unpack(p)
    if dtype == torch.bool:
        y1.logical_not_()
    else:
        y1.add_(1)
    y2 = unpack(p)
    assert bitwise_equal(y2, x)
    assert torch.equal(p.payload, payload_before)
    assert y1.untyped_storage().data_ptr() != y2.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", (torch.uint8, torch.bool), ids=str)
def test_eight_bit_payload_does_not_alias_input(dtype):
    # bits=8 with uint8 (or bool) input is the no-conversion path: the payload must still be a copy
    x = values_for(8, 17, dtype, seed=6)
    expected = x.clone()
    p = try_pack(x, 8)
    assert p.payload.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    x.zero_()
    assert bitwise_equal(unpack(p), expected)
    y = unpack(p)
    if dtype == torch.bool:
        y.logical_not_()
    else:
        y.add_(1)
    assert bitwise_equal(unpack(p), expected)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "sliced"])
def test_input_not_modified(dtype, bits, layout):
    base = values_for(bits, 4 * 6, dtype, seed=7).view(4, 6)
    x = {"contiguous": base, "permuted": base.t(), "sliced": base[:, ::2]}[layout]
    snapshot = x.clone()
    version, base_version = x._version, base._version
    p = try_pack(x, bits)
    assert p is not None
    assert x._version == version and base._version == base_version
    assert bitwise_equal(x, snapshot)
    unpack(p)
    assert bitwise_equal(x, snapshot) and x._version == version


def test_requires_grad_input():
    x = torch.tensor([0.0, 1.0, 1.0, 0.0], requires_grad=True)
    p, y = roundtrip(x, 1)
    assert not y.requires_grad
    assert bitwise_equal(y, x.detach())
    assert not p.payload.requires_grad


def test_rejected_input_not_modified():
    x = torch.tensor([0.0, 1.0, 0.5])
    version = x._version
    assert try_pack(x, 1) is None
    assert x._version == version and x.tolist() == [0.0, 1.0, 0.5]


# ------------------------------------------------------------------------------------------------------------
# Rejection
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("bad", [math.nan, -math.nan, math.inf, -math.inf, 0.5, -1.0, 1.5, 1e30])
def test_rejects_non_integer_float_values(dtype, bits, bad):
    x = torch.tensor([0.0, 1.0, bad, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=dtype)
    assert try_pack(x, bits) is None
    assert try_pack(x[2:3], bits) is None  # alone
    assert try_pack(x[2].clone(), bits) is None  # 0-dim


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_negative_zero_rejected_at_one_bit(dtype):
    x = torch.tensor([0.0, 1.0, -0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=dtype)
    assert try_pack(x, 1) is None
    assert try_pack(x[2].clone(), 1) is None


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 8])
def test_negative_zero_takes_the_top_code(dtype, bits):
    """sinabs' MultiSpike gives -0.0 where the membrane is negative: packed, the top code stands for it."""
    top = (1 << bits) - 1
    x = torch.tensor([0.0, 1.0, -0.0, top - 1, 0.0, -0.0, 1.0, 0.0, 1.0], dtype=dtype)
    p = try_pack(x, bits)
    assert p is not None and p.negzero and p.nbytes == packed_nbytes(x.numel(), bits)
    assert bitwise_equal(unpack(p), x)
    assert not try_pack(x.abs(), bits).negzero  # (+0.0 only: the plain code)
    x[3] = top  # the top code is taken: no room for -0.0
    assert try_pack(x, bits) is None
    assert bits_for_max(top - 1, negzero=True) == bits and bits_for_max(top, negzero=True) != bits


_OUT_OF_RANGE = [(1, 2), (1, 3), (1, 255), (2, 4), (2, 7), (2, 255),
                 (8, 256), (8, 257), (8, 512), (8, 1 << 20)]


@pytest.mark.parametrize(("dtype", "bits", "bad"), [
    (dtype, bits, bad) for dtype in FLOAT_DTYPES + INT_DTYPES for bits, bad in _OUT_OF_RANGE
    if not (dtype == torch.uint8 and bad > 255 or dtype == torch.float16 and bad > 2048)  # not representable
], ids=str)
def test_rejects_out_of_range(dtype, bits, bad):
    x = torch.tensor([0, 1, 0, bad, 1], dtype=torch.int64).to(dtype)
    assert int(x[3]) >= bad - 1  # bfloat16 rounds 257 to 256 and 513 to 512: still out of range
    assert try_pack(x, bits) is None
    assert try_pack(x.view(1, 5).t(), bits) is None  # dense permuted path
    assert try_pack(x[1::2].flip(0), bits) is None  # copied path


@pytest.mark.parametrize("dtype", (torch.float32, torch.int64, torch.int32), ids=str)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("bad", [-1, -2, -255, -256])
def test_rejects_negative(dtype, bits, bad):
    x = torch.tensor([1, bad, 0], dtype=dtype)
    assert try_pack(x, bits) is None


def test_rejects_wraparound_values():
    # values that become in-range after a modular uint8 conversion must still be rejected
    for v in (256, 257, 513, -255, 1 << 33):
        assert try_pack(torch.tensor([v], dtype=torch.int64), 8) is None, v
        assert try_pack(torch.tensor([v], dtype=torch.int64), 1) is None, v


@pytest.mark.parametrize("dtype", (torch.complex64, torch.float8_e4m3fn), ids=str)
def test_rejects_unsupported_dtypes(dtype):
    x = torch.zeros(4).to(dtype)
    assert try_pack(x, 8) is None


@pytest.mark.parametrize("bits", [0, 3, 4, 7, 16, -1, 32])
def test_unsupported_bits_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        try_pack(torch.zeros(4), bits)


@pytest.mark.parametrize("bits", [0, 3])
def test_unsupported_bits_raise_even_for_empty(bits):
    with pytest.raises(ValueError):
        try_pack(torch.zeros(0), bits)


def test_bool_at_every_width():
    x = torch.tensor([True, False, True, True, False, False, True, False, True])
    for bits in SUPPORTED_BITS:
        p, y = roundtrip(x, bits)
        assert y.dtype == torch.bool and torch.equal(y, x)
        assert p.nbytes == packed_nbytes(9, bits)


# ------------------------------------------------------------------------------------------------------------
# Property: packs exactly when every value is bitwise an in-range integer, and then round-trips bitwise
# ------------------------------------------------------------------------------------------------------------

_OUT_OF_RANGE_FLOATS = [-0.0, math.nan, math.inf, -math.inf, 0.5, -1.0, 2.5, 256.0, 1000.0]
_OUT_OF_RANGE_INTS = [-1, -7, 256, 1000, -(1 << 31), (1 << 31) - 1]


@st.composite
def pack_cases(draw):
    """(tensor, bits): random shape, dtype, layout; values mostly in range, sometimes not."""
    dtype = draw(st.sampled_from(ALL_DTYPES))
    bits = draw(st.sampled_from(SUPPORTED_BITS))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=4)))
    numel = math.prod(shape)
    hi = (1 << bits) - 1
    if dtype == torch.bool:
        elements = st.booleans()
    else:
        in_range = st.integers(0, hi)
        # "wide" values: in range for 8 bits but out of range for 1 or 2 bits
        wide = st.integers(0, 255)
        if dtype.is_floating_point:
            bad = st.sampled_from(_OUT_OF_RANGE_FLOATS)
        elif dtype == torch.uint8:
            bad = st.just(255) if hi < 255 else st.nothing()
        else:
            bad = st.sampled_from(_OUT_OF_RANGE_INTS)
        mix = draw(st.sampled_from(["in", "wide", "bad", "negzero"]))
        elements = {"in": in_range, "wide": st.one_of(in_range, wide),
                    "bad": st.one_of(in_range, in_range, in_range, bad),
                    "negzero": st.one_of(in_range, st.just("-0"))}[mix]
    values = draw(st.lists(elements, min_size=numel, max_size=numel))
    if dtype.is_floating_point:
        values = [-0.0 if v == "-0" else float(v) for v in values]
    else:
        values = [0 if v == "-0" else v for v in values]
    t = torch.tensor(values, dtype=dtype).reshape(shape)
    layout = draw(st.sampled_from(["as_is", "transpose", "flip_copy", "step"]))
    if layout == "transpose" and t.dim() >= 2:
        t = t.transpose(0, -1)
    elif layout == "step" and t.dim() >= 1:
        t = t[::2]
    elif layout == "flip_copy":
        t = t.flip(list(range(t.dim())))
    return t, bits


def _expected_packable(t: torch.Tensor, bits: int) -> bool:
    """Reference: every element is an integer in [0, 2**bits - 1], no NaN/inf; -0.0 only at 2 or 8 bits, and then
    every other value below the top code (which stands for -0.0)."""
    hi = (1 << bits) - 1
    values = t.reshape(-1).tolist()
    negzero = any(isinstance(v, float) and v == 0 and math.copysign(1.0, v) < 0 for v in values)
    if negzero and bits == 1:
        return False
    for v in values:
        if isinstance(v, bool):
            continue
        if isinstance(v, float):
            if not math.isfinite(v) or v != int(v) or math.copysign(1.0, v) < 0 and v != 0:
                return False
            v = int(v)
        if not 0 <= v <= hi - (1 if negzero else 0):
            return False
    return True


@settings(deadline=None)
@given(pack_cases())
@example((torch.tensor([-0.0, 1.0]), 1))
@example((torch.tensor([math.nan]), 8))
@example((torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]), 1))
@example((torch.tensor([3.0, 2.0, 1.0, 0.0, 3.0]), 2))
@example((torch.tensor([4.0]), 2))
@example((torch.tensor([255, 0, 17], dtype=torch.uint8), 8))
@example((torch.tensor([255, 0, 17], dtype=torch.uint8), 2))
@example((torch.tensor([256, 0], dtype=torch.int64), 8))
@example((torch.tensor([-1], dtype=torch.int32), 8))
@example((torch.zeros(3, 0, 2), 1))
@example((torch.tensor(1.0, dtype=torch.bfloat16), 1))
@example((torch.tensor([[True, False, True]]).t(), 2))
@example((torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]).t(), 1))
@example((torch.arange(24).view(2, 3, 4).permute(2, 0, 1), 8))
@example((torch.tensor([-0.0, 1.0, 2.0]), 2))
@example((torch.tensor([-0.0, 3.0]), 2))
@example((torch.tensor([[-0.0, 254.0], [0.0, 1.0]], dtype=torch.bfloat16).t(), 8))
def test_property_pack_iff_in_range(case):
    t, bits = case
    before = t.clone()
    version = t._version
    p = try_pack(t, bits)
    assert t._version == version and bitwise_equal(t, before)
    if _expected_packable(t, bits):
        assert p is not None
        assert p.nbytes == packed_nbytes(t.numel(), bits)
        y = unpack(p)
        assert y.dtype == t.dtype and y.shape == t.shape
        assert bitwise_equal(y, t)
        if p.stride is not None:
            assert y.stride() == t.stride()
        else:
            assert y.is_contiguous()
        # unpacking twice gives equal, independent tensors
        y2 = unpack(p)
        assert bitwise_equal(y2, t)
        assert y.numel() == 0 or y.untyped_storage().data_ptr() != y2.untyped_storage().data_ptr()
    else:
        assert p is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [0.5, -0.0, float("nan"), float("-nan"), 2.0, float("inf"), -1.0, 1e-40, 0.9999999,
                                 1e-8, -1e-30])
@pytest.mark.parametrize("numel", [1, 9, 4097])
def test_one_bit_fast_path_refuses_every_value_but_exact_zero_and_one(dtype, bad, numel):
    """The 1-bit path checks bit patterns on the integer view (``|p - one/2| == one/2``), not values:
    every pattern that is not exactly +0.0 or 1.0 must fail, including subnormals and values just below 1."""
    value = torch.tensor(bad, dtype=dtype)
    view = _INT_VIEW[dtype]
    if int(value.view(view)) in (0, int(torch.ones((), dtype=dtype).view(view))):
        pytest.skip(f"{bad} rounds to exactly 0 or 1 in {dtype}")
    x = (torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5).to(dtype)
    x[numel // 2] = value
    assert try_pack(x, 1) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_one_bit_fast_path_refuses_the_patterns_next_to_the_ends(dtype):
    """Bit patterns 1, one/2 (which the check maps to 0), one - 1 and one + 1, each alone among exact spikes."""
    view = _INT_VIEW[dtype]
    one = int(torch.ones((), dtype=dtype).view(view))
    for pattern in (1, one // 2, one // 2 + 1, one - 1, one + 1):
        x = (torch.rand(100, generator=torch.Generator().manual_seed(pattern)) > 0.5).to(dtype)
        x.view(view)[37] = pattern
        assert try_pack(x, 1) is None, (dtype, hex(pattern))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_bit_fast_path_accepts_exactly_two_of_all_16_bit_patterns(dtype):
    """Every one of the 65,536 patterns of a 16-bit float, each between an exact 0 and an exact 1: only +0.0 and 1.0
    pack (``p - one/2`` wraps around for the patterns near the most negative one; those must fail too)."""
    one = int(torch.ones((), dtype=dtype).view(torch.int16))
    accepted = []
    for pattern in range(-(1 << 15), 1 << 15):
        x = torch.tensor([0, pattern, one], dtype=torch.int16).view(dtype)
        if try_pack(x, 1) is not None:
            accepted.append(pattern)
    assert accepted == [0, one]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_bit_fast_path_refuses_the_patterns_where_the_check_wraps_around(dtype):
    """The most negative patterns, where ``p - one/2`` overflows, and the mirror images of the ends."""
    view = _INT_VIEW[dtype]
    one, lowest, highest = int(torch.ones((), dtype=dtype).view(view)), torch.iinfo(view).min, torch.iinfo(view).max
    half = one // 2
    for pattern in (lowest, lowest + 1, lowest + half - 1, lowest + half, lowest + half + 1, lowest + one, -half,
                    -one, highest, highest - half, one + 2 * half, 2 * one):
        x = torch.tensor([0, pattern, one], dtype=view).view(dtype)
        assert try_pack(x, 1) is None, (dtype, hex(pattern))


def test_one_bit_fast_path_refuses_subnormals_when_they_are_flushed_to_zero():
    """With subnormals flushed to zero, float operations read them as 0: the check reads bit patterns, so a
    subnormal still fails (packing it as 0 would not round-trip)."""
    x = (torch.rand(64, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    x.view(torch.int32)[5] = 1  # the smallest subnormal
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals to zero")
    try:
        assert try_pack(x, 1) is None
    finally:
        torch.set_flush_denormal(False)


def test_one_bit_packing_leaves_a_bool_input_untouched():
    """The payload is built by multiplying 64-bit words in place: never the input's own storage."""
    b = torch.rand(40, generator=torch.Generator().manual_seed(0)) > 0.5
    for view in (b, b[8:], b[3:19]):
        before = view.clone()
        p = try_pack(view, 1)
        assert torch.equal(view, before) and torch.equal(unpack(p), before)


def test_two_bit_gather_constant_on_every_word():
    """``_GATHER_2BIT`` puts four 2-bit values (one per byte of an int32 word) into the top byte, first lowest,
    with nothing else reaching it: all 256 words."""
    import itertools

    from fxmemopt.runtime.packing import _GATHER_2BIT

    vals = torch.tensor(list(itertools.product(range(4), repeat=4)), dtype=torch.uint8)
    words = vals.contiguous().view(torch.int32).view(-1).clone()
    top = (words * _GATHER_2BIT).view(torch.uint8).view(-1, 4)[:, 3]
    assert torch.equal(top, (vals.int() << torch.tensor([0, 2, 4, 6])).sum(1).to(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 8])
def test_small_width_path_accepts_exactly_the_integers_of_all_16_bit_patterns(dtype, bits):
    """Every one of the 65,536 patterns of a 16-bit float at 2 and 8 bits: exactly the patterns of 0.0, 1.0, ...,
    2**bits - 1 pack, and -0.0 (its own code; the round trip through int32 compares bit patterns: NaN, subnormals
    all fail)."""
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    allowed = set(torch.arange(1 << bits, dtype=dtype).view(torch.int16).tolist())
    allowed.add(int(torch.tensor(-0.0, dtype=dtype).view(torch.int16)))
    accepted = [int(p) for p in patterns if try_pack(p.view(1).view(dtype), bits) is not None]
    assert sorted(accepted) == sorted(allowed)


@pytest.mark.parametrize("bits", [2, 8])
def test_small_width_path_spans_several_passes(bits, monkeypatch):
    """Payloads built pass by pass (uneven last pass, values straddling pass ends) equal one built in one pass; a
    bad value in the last pass is still found."""
    import fxmemopt.runtime.packing as packing

    x = torch.randint(0, 1 << bits, (1000,), generator=torch.Generator().manual_seed(bits)).float()
    whole = try_pack(x, bits)
    monkeypatch.setattr(packing, "PACK_CHUNK", 36)
    parts = try_pack(x, bits)
    assert torch.equal(parts.payload, whole.payload) and torch.equal(unpack(parts), x)
    x[-1] = 0.5
    assert try_pack(x, bits) is None
