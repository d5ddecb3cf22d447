"""Lossless bit-packing of spike tensors stored for backward.

A checkpoint region keeps only its inputs for backward. When an input carries spikes its values are small
non-negative integers, and storing them at 32 bits is waste:

==============================  ============  ===============================
value set                       bits/value    stored bytes for ``n`` values
==============================  ============  ===============================
{0, 1} (spikes)                 1             ``ceil(n / 8)``
{0, 1, 2, 3} (SEW ADD of two)   2             ``ceil(n / 4)``
{0, ..., 255}                   8             ``n``
anything else                   not packed    the tensor itself (no copy)
==============================  ============  ===============================

Negative zeros: a spike function that computes ``(v > 0) * trunc(v / threshold)`` (sinabs' ``MultiSpike``) gives
``-0.0`` wherever the membrane is negative. Such a tensor is packed with the top code of its width standing for
``-0.0`` (``negzero=True``: values ``{0, ..., 2**bits - 2}`` and ``-0.0``), so a set ``{0, ..., hi}`` that may hold
``-0.0`` takes the width of ``hi + 1`` (:func:`bits_for_max` with ``negzero``): ``{-0.0, 0, 1}`` at 2 bits.

Lossless first, always: :func:`try_pack` checks, bit for bit, that every value is an integer in range while it
reads the data anyway (``-0.0``, ``NaN`` and ``0.5`` all fail the check), and returns ``None`` instead of
packing when the check fails; the caller then stores the tensor unpacked. :func:`unpack` restores dtype,
shape, device and, for dense tensors, the exact strides, so recomputation sees the same memory layout as the
forward did.

Layout: values are packed in the tensor's memory order, ``8 // bits`` values per byte, least significant bits
first (value ``k*per + i`` sits at bits ``[i*bits, (i+1)*bits)`` of byte ``k``). The last byte is zero-padded.

Example:
    >>> import torch
    >>> s = (torch.rand(4, 3, 5) > 0.5).float()
    >>> p = try_pack(s, bits=1)
    >>> p.nbytes, torch.equal(unpack(p), s)
    (8, True)
    >>> try_pack(torch.tensor([0.5, 1.0]), bits=1) is None
    True
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

__all__ = ["PackedTensor", "SUPPORTED_BITS", "PACK_CHUNK", "packed_nbytes", "try_pack", "unpack", "bits_for_max"]

#: The widths a tensor can be packed at; 0 means "store as is".
SUPPORTED_BITS = (1, 2, 8)

# Same-width integer views used to compare floats bit for bit (so -0.0 != 0.0 and NaN never matches).
_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def bits_for_max(hi: int | None, negzero: bool = False) -> int:
    """The packing width for values in ``{0, ..., hi}`` (and ``-0.0``, when ``negzero``: one code more); 0 when
    they cannot be packed (``hi`` None or above what 8 bits hold)."""
    if hi is None or hi < 0:
        return 0
    hi += 1 if negzero else 0
    for bits in SUPPORTED_BITS:
        if hi < (1 << bits):
            return bits
    return 0


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes a packed payload of ``numel`` values at ``bits`` bits each occupies: ``ceil(numel * bits / 8)``."""
    return math.ceil(numel * bits / 8)


@dataclass(frozen=True)
class PackedTensor:
    """A tensor stored at ``bits`` bits per value. Build with :func:`try_pack`, restore with :func:`unpack`.

    Attributes:
        payload: 1-D ``uint8`` tensor of ``packed_nbytes(numel, bits)`` bytes, on the original device.
        bits: 1, 2 or 8.
        shape: the original shape.
        dtype: the original dtype (restored exactly by :func:`unpack`).
        stride: the original strides when the tensor was dense (restored exactly), else ``None``
            (restored contiguous).
        negzero: the top code (``2**bits - 1``) stands for ``-0.0`` (see the module docstring).
    """

    payload: torch.Tensor
    bits: int
    shape: torch.Size
    dtype: torch.dtype
    stride: tuple[int, ...] | None
    negzero: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the payload (what this packed tensor costs while stored)."""
        return self.payload.numel()


def _is_dense(t: torch.Tensor) -> bool:
    """True when ``t`` covers one gap-free block of its storage (contiguous up to a permutation of dims)."""
    if t.numel() == 0:
        return False
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _as_small_uint8(flat: torch.Tensor, hi: int) -> torch.Tensor | None:
    """``flat`` as uint8 if every value is *exactly* an integer in ``[0, hi]`` (bitwise), else ``None``."""
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    if flat.is_complex() or flat.dtype not in _INT_VIEW and flat.is_floating_point():
        return None  # float8 and friends: no exact round trip we can check cheaply
    u = flat.to(torch.uint8)
    back = u.to(flat.dtype)
    view = _INT_VIEW.get(flat.dtype)
    if view is not None:
        exact = torch.equal(back.view(view), flat.view(view))
    else:
        exact = torch.equal(back, flat)
    if not exact:
        return None
    if hi < 255 and u.numel() and int(u.max()) > hi:
        return None
    return u


#: The 1-bit fast path reads eight bytes as one int64 word, first byte lowest (elsewhere: the general path).
_LITTLE_ENDIAN = sys.byteorder == "little"
#: The bit pattern of 1.0 in each float dtype's same-width integer view.
_ONE_BITS = {dt: int(torch.ones((), dtype=dt).view(iv).item()) for dt, iv in _INT_VIEW.items()}
#: Multiplying eight 0/1 bytes (one int64, little-endian) by this gathers them into bits 56..63, first byte lowest.
_GATHER = 0x0102040810204080
#: Multiplying one byte by this copies it into all eight bytes; this mask then keeps bit i in byte i (as int64).
_SPREAD, _BIT_OF_BYTE = 0x0101010101010101, 0x8040201008040201 - (1 << 64)


#: Values per pass of the 1-bit path: its temporaries are small buffers reused pass after pass (cache-resident, and
#: no fresh pages to fault in per call, which dominates on large tensors: measured 13x -> 4x ``to(bool)`` at 64 MiB).
#: 2**19 values (a 2 MiB check buffer for float32) was the fastest of 2**16 .. 2**20 at 4 and 64 MiB with one and
#: two threads: smaller passes pay the per-op dispatch more often, larger ones fall out of cache.
PACK_CHUNK = 1 << 19


def _pack_spikes(flat: torch.Tensor) -> torch.Tensor | None:
    """The 1-bit payload of ``flat`` (1-D), or ``None`` unless every value is exactly 0 or 1 (bitwise).

    The fast path for spikes, with no float intermediate and no bool comparison (both slow on CPU). Floats are
    checked on their integer view, so the check holds whatever the floating-point mode (flushing subnormals to zero
    included): every bit pattern ``p`` must satisfy ``|p - one/2| == one/2`` (``one``: the bits of 1.0, an even
    number in every float dtype), which one ``aminmax`` of ``|p - one/2|`` per pass answers. Only ``p == 0`` and
    ``p == one`` pass: ``0.5``, subnormals, ``-0.0``, ``NaN``, ``inf`` and negatives all fail, and where ``p - one/2``
    wraps around (``p`` near the most negative pattern) the result is far from ``one/2`` (or, for the most negative
    pattern itself, negative after ``abs``), so it fails too. Integers must lie in ``[0, 1]`` (one ``aminmax``).
    Then, pass by pass, the values become bool marks, eight marks at a time become one byte with one
    multiplication per 8 values (``_GATHER``: the byte lands in the top byte of each word), and a strided copy takes
    those top bytes. Four passes over the data per chunk, all of them vectorized.
    """
    n = flat.numel()
    if n == 0:
        return flat.new_empty(0, dtype=torch.uint8)
    iv, half = None, 0
    if flat.dtype in _INT_VIEW:
        iv, half = flat.view(_INT_VIEW[flat.dtype]), _ONE_BITS[flat.dtype] // 2
    elif flat.dtype != torch.bool:
        if flat.is_floating_point() or flat.is_complex():
            return None  # float8 and friends: no exact round trip we can check cheaply
        lo, hi = torch.aminmax(flat)
        if int(lo) < 0 or int(hi) > 1:
            return None
    step = min(n, PACK_CHUNK)
    ends = torch.empty(step, dtype=iv.dtype, device=flat.device) if iv is not None else None
    marks = torch.empty((step + 7) // 8 * 8, dtype=torch.bool, device=flat.device)
    payload = torch.empty((n + 7) // 8, dtype=torch.uint8, device=flat.device)
    for start in range(0, n, step):
        part = flat[start:start + step]
        m = part.numel()
        if iv is not None:
            lo, hi = torch.aminmax(torch.sub(iv[start:start + m], half, out=ends[:m]).abs_())
            if int(lo) != half or int(hi) != half:
                return None
        _gather_into(payload, start, part, marks, 8)  # nonzero -> True (exactly the ones, after the check)
    return payload


#: Multiplying four values in 0..3 (one int32 word, one value per byte, little-endian) by this puts them, two bits
#: each and first value lowest, into the word's top byte: value ``i`` moves from bit ``8i`` to bit ``24 + 2i``, and
#: no other partial product reaches the top byte or carries into it (checked on all 256 words in the tests).
_GATHER_2BIT = 0x01041040


def _pack_small(flat: torch.Tensor, bits: int, negzero: bool = False) -> torch.Tensor | None:
    """The ``bits``-bit payload (2 or 8) of ``flat`` (1-D), or ``None`` unless every value is exactly an integer in
    ``[0, 2**bits - 1]``.

    Pass by pass, in reused buffers: the values truncated to int32 ``y`` and converted back; the bit patterns of
    With ``negzero`` the elements whose pattern is ``-0.0``'s take the top code (which no value may then use) and
    are compared as ``-0.0``. Otherwise the round trip's patterns must equal the input's (so every value was an
    integer: ``-0.0`` comes back as ``+0.0``, ``NaN``,
    ``inf``, fractions and subnormals do not come back at all, whatever the conversion made of them, and a
    flushed-to-zero mode cannot hide a subnormal because patterns are compared, not values), and ``y`` must lie in
    range (one ``aminmax``). Then ``y`` becomes bytes, and at 2 bits four bytes become one with one int32
    multiplication (``_GATHER_2BIT``) and a strided copy of the top bytes. All of it vectorized; the former
    ``to(uint8)`` round trip and shift-and-sum took 2.5x as long at 2 bits.
    """
    n = flat.numel()
    per = 8 // bits
    payload = torch.empty(-(-n // per), dtype=torch.uint8, device=flat.device)
    if n == 0:
        return payload
    hi_ok = (1 << bits) - 1
    view = _INT_VIEW.get(flat.dtype)
    negzero = negzero and view is not None
    if negzero:
        hi_ok -= 1  # the top code is -0.0's
        neg_bits = torch.tensor(-0.0, dtype=flat.dtype).view(view).item()
    step = min(n, PACK_CHUNK)
    y = torch.empty(step, dtype=torch.int32, device=flat.device)
    back = torch.empty(step, dtype=flat.dtype, device=flat.device) if flat.dtype != torch.bool else None
    whole_step = -(-step // per) * per
    u = torch.empty(whole_step, dtype=torch.uint8, device=flat.device) if per > 1 else None
    for start in range(0, n, step):
        part = flat[start:start + step]
        m = part.numel()
        yy = y[:m]
        yy.copy_(part)  # truncation toward zero (for bool: 0/1)
        neg = part.view(view) == neg_bits if negzero else None
        if back is not None:
            bb = back[:m]
            bb.copy_(yy)
            if neg is not None:
                bb.masked_fill_(neg, -0.0)
            same = torch.equal(bb.view(view), part.view(view)) if view is not None else torch.equal(bb, part)
            if not same:
                return None
        lo, hi = torch.aminmax(yy)
        if int(lo) < 0 or int(hi) > hi_ok:
            return None
        if neg is not None:
            yy.masked_fill_(neg, hi_ok + 1)
        if per == 1:
            payload[start:start + m].copy_(yy)
        else:
            _gather_into(payload, start, yy, u, per)
    return payload


def _gather_into(payload: torch.Tensor, start: int, values: torch.Tensor, buf: torch.Tensor, per: int) -> None:
    """Write ``values`` (small integers, value ``start`` onwards of the tensor) into ``payload``, ``per`` (8 or 4)
    per byte: copied into the reused buffer ``buf`` (bool for spikes: the fastest conversion from floats; else
    uint8), zero-padded to whole bytes, gathered by one multiplication per word (``_GATHER`` on int64 words,
    ``_GATHER_2BIT`` on int32 words), and the words' top bytes copied out with one strided copy."""
    m = values.numel()
    whole = -(-m // per) * per
    h = buf[:whole]
    h[:m].copy_(values)
    if whole > m:
        h[m:].zero_()
    u = h.view(torch.uint8)
    if per == 8:
        top = u.view(torch.int64).mul_(_GATHER).view(torch.uint8)[7::8]
    else:
        top = u.view(torch.int32).mul_(_GATHER_2BIT).view(torch.uint8)[3::4]
    payload[start // per:(start + whole) // per].copy_(top)


def try_pack(t: torch.Tensor, bits: int) -> PackedTensor | None:
    """Pack ``t`` at ``bits`` bits per value, or return ``None`` if any value is not an integer in
    ``[0, 2**bits - 1]`` (checked bit for bit: ``-0.0``, ``NaN``, ``0.5``, ``-1`` and ``2`` at 1 bit all fail).
    At 2 or 8 bits a float tensor that fails only for its ``-0.0`` is packed with the top code standing for
    ``-0.0`` (``negzero``), if its values fit below it.

    Args:
        t: any tensor (float, integer or bool dtype; any shape, strides and device). Not modified.
        bits: 1, 2 or 8.

    Returns:
        A :class:`PackedTensor` whose ``nbytes`` is exactly ``packed_nbytes(t.numel(), bits)``, or ``None``.

    Raises:
        ValueError: ``bits`` is not one of :data:`SUPPORTED_BITS`.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"try_pack: bits must be one of {SUPPORTED_BITS}, got {bits}")
    with torch.no_grad():
        dense = _is_dense(t)
        if dense:
            # The storage block in memory order: no copy, and unpack can restore the exact strides.
            flat = t.as_strided((t.numel(),), (1,), t.storage_offset())
        else:
            flat = t.reshape(-1)
        if _LITTLE_ENDIAN and (bits == 1 or flat.dtype in _INT_VIEW
                               or not (flat.is_floating_point() or flat.is_complex())):  # (bool included)
            payload = _pack_spikes(flat) if bits == 1 else _pack_small(flat, bits)
            negzero = payload is None and bits > 1 and flat.dtype in _INT_VIEW
            if negzero:
                payload = _pack_small(flat, bits, negzero=True)
            if payload is None:
                return None
            return PackedTensor(payload, bits, t.shape, t.dtype, tuple(t.stride()) if dense else None, negzero)
        u = _as_small_uint8(flat, (1 << bits) - 1)
        if u is None:
            return None
        per = 8 // bits
        if per > 1:
            pad = (-u.numel()) % per
            if pad:
                u = torch.cat([u, u.new_zeros(pad)])
            shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=u.device)
            payload = (u.view(-1, per) << shifts).sum(dim=1, dtype=torch.uint8)
        else:
            payload = u.clone() if u.data_ptr() == flat.data_ptr() else u  # bool input is viewed, not copied
    return PackedTensor(payload, bits, t.shape, t.dtype, tuple(t.stride()) if dense else None)


def unpack(p: PackedTensor) -> torch.Tensor:
    """Restore the tensor :func:`try_pack` packed: same values (bitwise), dtype, shape, device, and strides
    when the original was dense. The result does not require grad.
    """
    with torch.no_grad():
        n = p.numel
        per = 8 // p.bits
        if p.bits == 1 and _LITTLE_ENDIAN:
            # each byte spread into eight (one multiplication per 8 values), bit i kept in byte i, each byte made
            # 0/1 (clamped to 1), then converted once to the dtype
            words = p.payload.to(torch.int64).mul_(_SPREAD).bitwise_and_(_BIT_OF_BYTE)
            u = words.view(torch.uint8).clamp_max_(1)[:n]
            flat = u.view(torch.bool) if p.dtype == torch.bool else u.to(p.dtype)
            if p.stride is not None:
                return flat.as_strided(p.shape, p.stride, 0)
            return flat.view(p.shape)
        if per > 1:
            shifts = torch.arange(0, 8, p.bits, dtype=torch.uint8, device=p.payload.device)
            mask = (1 << p.bits) - 1
            u = ((p.payload.unsqueeze(1) >> shifts) & mask).view(-1)[:n]
        else:
            u = p.payload
        # A fresh tensor always (copy when no conversion happens): the payload must survive in-place ops that
        # recomputation might apply to its input.
        flat = u.to(p.dtype, copy=per == 1)
        if p.negzero:
            flat.masked_fill_(u == (1 << p.bits) - 1, -0.0)
        if p.stride is not None:
            return flat.as_strided(p.shape, p.stride, 0)
        return flat.view(p.shape)
