"""Triton kernels for EMA over a flat bucket: update (K profiles in one pass), swap, copy.

Every kernel walks a segment table of int64 rows ``(param address, offset in
the flat buffer, length)``, one program per row. A launch takes either full
chunks (``FULL``: 16-byte-aligned runs of exactly ``BLOCK`` elements, unmasked,
so the compiler emits 128-bit accesses) or tails (shorter, or from unaligned
params; masked): the two are separate launches, so the full path is compiled
without the tail's code and registers. Flat-buffer offsets are multiples of 16
elements. The parameter dtype comes from ``param_type_ptr`` (any tensor of
that dtype; never read). ``ROUND_BY_HAND``: float32 -> bfloat16 rounded to
nearest even by integer arithmetic, for Triton's CPU interpreter, whose
conversion truncates; compiled code uses the hardware's ``cvt.rn.bf16x2.f32``
(the same bits).
"""

import triton
import triton.language as tl


@triton.jit
def _segment(table_ptr, flat_ptr, param_type_ptr, pid, FULL: tl.constexpr):
    row = table_ptr + 3 * pid
    p_ptr = tl.load(row).to(param_type_ptr.dtype)
    off = tl.load(row + 1)
    n = tl.load(row + 2)
    if FULL:  # the table builder guarantees these alignments for full rows only
        p_ptr = tl.multiple_of(p_ptr, 16)
        off = tl.multiple_of(off, 16)
    return p_ptr, flat_ptr + off, n


@triton.jit
def _load(ptr, idx, n, FULL: tl.constexpr):
    if FULL:
        x = tl.load(ptr + idx)
    else:
        x = tl.load(ptr + idx, mask=idx < n, other=0)
    return x


@triton.jit
def _to_bf16_rne(x):
    """float32 -> bfloat16, round to nearest even, by integer arithmetic."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x == x, y, x.to(tl.bfloat16))  # NaN stays NaN


@triton.jit
def _store(ptr, idx, n, x, FULL: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
    dtype = ptr.dtype.element_ty
    if dtype == tl.bfloat16 and x.dtype != tl.bfloat16:
        if ROUND_BY_HAND:
            x = _to_bf16_rne(x.to(tl.float32))
        else:
            x = x.to(tl.float32).to(tl.bfloat16, fp_downcast_rounding="rtne")
    else:
        x = x.to(dtype)
    if FULL:
        tl.store(ptr + idx, x)
    else:
        tl.store(ptr + idx, x, mask=idx < n)


@triton.jit
def _ema_update_kernel(table_ptr, shadow_ptr, param_type_ptr, skip_ptr, momenta, row_stride,
                       BLOCK: tl.constexpr, PROFILES: tl.constexpr, CHECK_SKIP: tl.constexpr,
                       MOMENTA_IN_MEMORY: tl.constexpr, FULL: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
    """For each of ``PROFILES`` shadow rows (``row_stride`` elements apart, a multiple
    of 16), ``shadow_k <- shadow_k + momenta[k] * (param - shadow_k)`` in float32,
    each param element loaded once; ``momenta`` is a tuple of run-time floats, or with
    ``MOMENTA_IN_MEMORY`` a pointer to ``PROFILES`` float32 values (read on the device,
    for CUDA graphs). With ``CHECK_SKIP``, nothing is written when ``*skip_ptr`` is non-zero.

    Every load is issued before the first store: the table row, the skip flag and the
    momenta together, then the param and all K shadow rows (a load after a store would
    wait for it, since the compiler cannot tell the rows do not overlap)."""
    pid = tl.program_id(0).to(tl.int64)
    p_ptr, s_ptr, n = _segment(table_ptr, shadow_ptr, param_type_ptr, pid, FULL)
    skip = 0
    if CHECK_SKIP:
        skip = tl.load(skip_ptr)  # beside the row's loads, waited for only at the stores
    ms = ()
    for k in tl.static_range(PROFILES):
        if MOMENTA_IN_MEMORY:
            ms = ms + (tl.load(momenta + k),)
        else:
            ms = ms + (momenta[k],)
    idx = tl.arange(0, BLOCK)
    p = _load(p_ptr, idx, n, FULL)  # read once for every profile
    stride = row_stride.to(tl.int64)  # int64: K rows of a large bucket pass 2**31
    shadows = ()
    for k in tl.static_range(PROFILES):
        shadows = shadows + (_load(s_ptr + k * stride, idx, n, FULL),)
    if skip == 0:
        for k in tl.static_range(PROFILES):
            momentum = ms[k]
            s = shadows[k].to(tl.float32)
            d = p.to(tl.float32) - s
            # Two-sided lerp: exact at momentum 0 and 1, stable in between.
            if momentum < 0.5:
                out = s + momentum * d
            else:
                out = p.to(tl.float32) - d * (1.0 - momentum)
            _store(s_ptr + k * stride, idx, n, out, FULL, ROUND_BY_HAND)


@triton.jit
def _ema_nonfinite_kernel(table_ptr, param_type_ptr, flag_ptr, BLOCK: tl.constexpr, FULL: tl.constexpr):
    """``*flag_ptr = 1`` if any parameter element is NaN or infinite (the caller zeroes it first)."""
    pid = tl.program_id(0).to(tl.int64)
    p_ptr, _, n = _segment(table_ptr, param_type_ptr, param_type_ptr, pid, FULL)
    p = _load(p_ptr, tl.arange(0, BLOCK), n, FULL).to(tl.float32)
    bad = (p != p) | (tl.abs(p) == float("inf"))
    if tl.max(bad.to(tl.int32), axis=0) > 0:
        tl.store(flag_ptr, 1)


@triton.jit
def _ema_swap_kernel(table_ptr, shadow_ptr, param_type_ptr, BLOCK: tl.constexpr, FULL: tl.constexpr):
    """Params and shadow exchange values in place (equal dtypes: bitwise)."""
    pid = tl.program_id(0).to(tl.int64)
    p_ptr, s_ptr, n = _segment(table_ptr, shadow_ptr, param_type_ptr, pid, FULL)
    idx = tl.arange(0, BLOCK)
    p = _load(p_ptr, idx, n, FULL)
    s = _load(s_ptr, idx, n, FULL)
    _store(p_ptr, idx, n, s, FULL, False)
    _store(s_ptr, idx, n, p, FULL, False)


@triton.jit
def _ema_copy_kernel(table_ptr, flat_ptr, param_type_ptr, BLOCK: tl.constexpr, TO_PARAMS: tl.constexpr,
                     FULL: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
    """Params -> flat buffer, or flat buffer -> params (``TO_PARAMS``), rounding to nearest even."""
    pid = tl.program_id(0).to(tl.int64)
    p_ptr, f_ptr, n = _segment(table_ptr, flat_ptr, param_type_ptr, pid, FULL)
    idx = tl.arange(0, BLOCK)
    if TO_PARAMS:
        _store(p_ptr, idx, n, _load(f_ptr, idx, n, FULL), FULL, ROUND_BY_HAND)
    else:
        _store(f_ptr, idx, n, _load(p_ptr, idx, n, FULL), FULL, ROUND_BY_HAND)
