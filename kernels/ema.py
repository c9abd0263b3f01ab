"""Triton kernels for EMA over a flat bucket: update (K profiles in one pass), swap, copy.

Every kernel walks a segment table of int64 rows ``(param address, offset in
the flat buffer, length)``, one program per row. Rows ``< n_full`` are full,
16-byte-aligned chunks of exactly ``BLOCK`` elements and run unmasked, so the
compiler can emit 128-bit accesses; the remaining rows are tails (shorter, or
from unaligned params) and run masked. Flat-buffer offsets are multiples of 16
elements. The parameter dtype comes from ``param_type_ptr`` (any tensor of
that dtype; never read).
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
    """float32 -> bfloat16, round to nearest even, by hand: the same bits on
    every target (Triton's CPU interpreter truncates a plain ``.to``)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x == x, y, x.to(tl.bfloat16))  # NaN stays NaN


@triton.jit
def _store(ptr, idx, n, x, FULL: tl.constexpr):
    dtype = ptr.dtype.element_ty
    if dtype == tl.bfloat16 and x.dtype != tl.bfloat16:
        x = _to_bf16_rne(x.to(tl.float32))
    else:
        x = x.to(dtype)
    if FULL:
        tl.store(ptr + idx, x)
    else:
        tl.store(ptr + idx, x, mask=idx < n)


@triton.jit
def _update_row(table_ptr, shadow_ptr, param_type_ptr, momenta, row_stride, pid, BLOCK: tl.constexpr,
                PROFILES: tl.constexpr, MOMENTA_IN_MEMORY: tl.constexpr, FULL: tl.constexpr):
    p_ptr, s_ptr, n = _segment(table_ptr, shadow_ptr, param_type_ptr, pid, FULL)
    idx = tl.arange(0, BLOCK)
    p = _load(p_ptr, idx, n, FULL).to(tl.float32)  # read once for every profile
    for k in tl.static_range(PROFILES):
        if MOMENTA_IN_MEMORY:
            momentum = tl.load(momenta + k)
        else:
            momentum = momenta[k]
        sk_ptr = s_ptr + k * row_stride.to(tl.int64)  # int64: K rows of a large bucket pass 2**31
        s = _load(sk_ptr, idx, n, FULL).to(tl.float32)
        d = p - s
        # Two-sided lerp: exact at momentum 0 and 1, stable in between.
        if momentum < 0.5:
            out = s + momentum * d
        else:
            out = p - d * (1.0 - momentum)
        _store(sk_ptr, idx, n, out, FULL)


@triton.jit(do_not_specialize=["n_full"])
def _ema_update_kernel(table_ptr, shadow_ptr, param_type_ptr, skip_ptr, momenta, row_stride, n_full,
                       BLOCK: tl.constexpr, PROFILES: tl.constexpr, CHECK_SKIP: tl.constexpr,
                       MOMENTA_IN_MEMORY: tl.constexpr = False):
    """For each of ``PROFILES`` shadow rows (``row_stride`` elements apart, a multiple
    of 16), ``shadow_k <- shadow_k + momenta[k] * (param - shadow_k)`` in float32,
    each param element loaded once; ``momenta`` is a tuple of run-time floats, or with
    ``MOMENTA_IN_MEMORY`` a pointer to ``PROFILES`` float32 values (read on the device,
    for CUDA graphs). With ``CHECK_SKIP``, nothing is written when ``*skip_ptr`` is non-zero."""
    pid = tl.program_id(0).to(tl.int64)
    skip = 0
    if CHECK_SKIP:
        skip = tl.load(skip_ptr)
    if skip == 0:
        if pid < n_full:
            _update_row(table_ptr, shadow_ptr, param_type_ptr, momenta, row_stride, pid, BLOCK, PROFILES,
                        MOMENTA_IN_MEMORY, True)
        else:
            _update_row(table_ptr, shadow_ptr, param_type_ptr, momenta, row_stride, pid, BLOCK, PROFILES,
                        MOMENTA_IN_MEMORY, False)


@triton.jit
def _nonfinite_row(table_ptr, param_type_ptr, flag_ptr, pid, BLOCK: tl.constexpr, FULL: tl.constexpr):
    p_ptr, _, n = _segment(table_ptr, param_type_ptr, param_type_ptr, pid, FULL)
    p = _load(p_ptr, tl.arange(0, BLOCK), n, FULL).to(tl.float32)
    bad = (p != p) | (tl.abs(p) == float("inf"))
    if tl.max(bad.to(tl.int32), axis=0) > 0:
        tl.store(flag_ptr, 1)


@triton.jit(do_not_specialize=["n_full"])
def _ema_nonfinite_kernel(table_ptr, param_type_ptr, flag_ptr, n_full, BLOCK: tl.constexpr):
    """``*flag_ptr = 1`` if any parameter element is NaN or infinite (the caller zeroes it first)."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < n_full:
        _nonfinite_row(table_ptr, param_type_ptr, flag_ptr, pid, BLOCK, True)
    else:
        _nonfinite_row(table_ptr, param_type_ptr, flag_ptr, pid, BLOCK, False)


@triton.jit
def _swap_row(table_ptr, shadow_ptr, param_type_ptr, pid, BLOCK: tl.constexpr, FULL: tl.constexpr):
    p_ptr, s_ptr, n = _segment(table_ptr, shadow_ptr, param_type_ptr, pid, FULL)
    idx = tl.arange(0, BLOCK)
    p = _load(p_ptr, idx, n, FULL)
    s = _load(s_ptr, idx, n, FULL)
    _store(p_ptr, idx, n, s, FULL)
    _store(s_ptr, idx, n, p, FULL)


@triton.jit(do_not_specialize=["n_full"])
def _ema_swap_kernel(table_ptr, shadow_ptr, param_type_ptr, n_full, BLOCK: tl.constexpr):
    """Params and shadow exchange values in place (equal dtypes: bitwise)."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < n_full:
        _swap_row(table_ptr, shadow_ptr, param_type_ptr, pid, BLOCK, True)
    else:
        _swap_row(table_ptr, shadow_ptr, param_type_ptr, pid, BLOCK, False)


@triton.jit
def _copy_row(table_ptr, flat_ptr, param_type_ptr, pid, BLOCK: tl.constexpr, TO_PARAMS: tl.constexpr,
              FULL: tl.constexpr):
    p_ptr, f_ptr, n = _segment(table_ptr, flat_ptr, param_type_ptr, pid, FULL)
    idx = tl.arange(0, BLOCK)
    if TO_PARAMS:
        _store(p_ptr, idx, n, _load(f_ptr, idx, n, FULL), FULL)
    else:
        _store(f_ptr, idx, n, _load(p_ptr, idx, n, FULL), FULL)


@triton.jit(do_not_specialize=["n_full"])
def _ema_copy_kernel(table_ptr, flat_ptr, param_type_ptr, n_full, BLOCK: tl.constexpr, TO_PARAMS: tl.constexpr):
    """Params -> flat buffer, or flat buffer -> params (``TO_PARAMS``), rounding to nearest even."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < n_full:
        _copy_row(table_ptr, flat_ptr, param_type_ptr, pid, BLOCK, TO_PARAMS, True)
    else:
        _copy_row(table_ptr, flat_ptr, param_type_ptr, pid, BLOCK, TO_PARAMS, False)
