"""The Triton backend: kernel launches per bucket and job, through segment tables.

Each bucket's params are cut into chunks of ``BLOCK`` elements. Full, aligned
chunks and the rest (tails) have tables of their own and separate launches:
the full-chunk kernels are compiled without the masked tail code, which would
otherwise set their register count (and so how many programs an SM holds) for
chunks that never run it. ``perf/occupancy.py`` compiles every launch made here
and shows registers, spills and access widths; tests/test_occupancy.py holds
them to their limits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .backends import Backend
from .buckets import Bucket
from .kernels.ema import _ema_copy_kernel, _ema_nonfinite_kernel, _ema_swap_kernel, _ema_update_kernel

# Elements per program: 16 per thread at 4 warps, four 128-bit accesses of float32 per
# stream. A first choice from the compiled kernels' occupancy (perf/occupancy.py), to be
# tuned on a GPU with perf/sweep.py.
BLOCK = 2048
# Also for buckets of 16-bit params and 16-bit shadows (32 B per thread and stream): at 4096
# their update needs 127-128 registers at 4 warps (4 blocks per SM) or 64 at 8 (the same bytes
# per thread as 2048 at 4), which perf/occupancy.py's Little's-law model puts below 2048's
# 1.7-2.5x margin on an H200 (1.5-2.3x), so they keep 2048.
NUM_WARPS = 4
# K >= 2 profiles: every shadow row is loaded before the first store, 1 + K float32 values per
# element and thread; 8 warps halve the elements per thread, so that the full path stays
# within 64 registers (fp32, 4 warps: 69-72 registers for K = 2, 7 blocks of 4 warps per SM;
# 8 warps: 32-40, 6-8 blocks of 8).
NUM_WARPS_MANY_PROFILES = 8
# Fused multiply-adds in the lerp (s + m * d as one rounding): the bits Triton 3.9 gives by
# default, and those of torch's own CUDA lerp; given explicitly, as the default changes in 3.10.
FP_FUSION = True
ALIGN_BYTES = 16  # 128-bit accesses
# (BLOCK, num_warps) for every launch, when set: perf/sweep.py's launch shapes.
FORCED_SHAPE: tuple[int, int] | None = None


def block() -> int:
    """Elements per program, and per chunk of a bucket's tables."""
    return BLOCK if FORCED_SHAPE is None else FORCED_SHAPE[0]


def warps_for(profiles: int = 1) -> int:
    """Warps per program of a launch moving ``profiles`` shadow rows (1 for swap, copy, scan)."""
    if FORCED_SHAPE is not None:
        return FORCED_SHAPE[1]
    return NUM_WARPS_MANY_PROFILES if profiles >= 2 else NUM_WARPS


def _rows(count: Tensor, first: Tensor, addr: Tensor, off: Tensor, numel: Tensor, esize: int, block: int) -> Tensor:
    """Table rows for ``count[i]`` chunks of tensor ``i`` starting at element ``first[i]``."""
    which = torch.repeat_interleave(torch.arange(count.numel()), count)
    k = torch.arange(which.numel()) - torch.repeat_interleave(count.cumsum(0) - count, count)
    start = first[which] + k * block
    return torch.stack([addr[which] + start * esize, off[which] + start, (numel[which] - start).clamp(max=block)], 1)


def segment_tables(bucket: Bucket, block: int) -> tuple[Tensor, Tensor]:
    """The bucket's int64 tables ``(address, flat offset, length)`` on its device, one
    row per chunk of ``block`` elements: the full aligned chunks, and the tails."""
    esize = bucket.param_dtype.itemsize
    addr = torch.tensor(bucket.ptrs, dtype=torch.int64)
    off = torch.tensor(bucket.offsets, dtype=torch.int64)
    numel = torch.tensor([t.numel() for t in bucket.tensors], dtype=torch.int64)
    aligned = (addr % ALIGN_BYTES == 0).to(torch.int64)
    n_full = aligned * (numel // block)
    first_tail = n_full * block
    n_tail = (numel - first_tail + block - 1) // block
    full = _rows(n_full, torch.zeros_like(numel), addr, off, numel, esize, block)
    tail = _rows(n_tail, first_tail, addr, off, numel, esize, block)
    return full.to(bucket.param_device), tail.to(bucket.param_device)


@dataclass(frozen=True)
class Tables:
    """A bucket's launch data, built once per layout."""

    full: Tensor  # [rows, 3] int64: full aligned chunks
    tail: Tensor  # [rows, 3] int64: the rest, masked
    block: int
    typed: Tensor | None  # a non-empty param, giving the param dtype (an empty one may have a null pointer)
    round_by_hand: bool  # CPU tensors: Triton's interpreter, whose bfloat16 conversion truncates

    def parts(self):
        """(table, FULL) for each non-empty table."""
        return [(t, full) for t, full in ((self.full, True), (self.tail, False)) if t.shape[0]]


class TritonBackend(Backend):
    name = "triton"

    @staticmethod
    def tables(bucket: Bucket) -> Tables:
        cached = bucket.cache.get("table")
        if cached is None:
            size = block()
            full, tail = segment_tables(bucket, size)
            typed = next((t for t in bucket.tensors if t.numel()), None)
            cached = bucket.cache["table"] = Tables(full, tail, size, typed, bucket.param_device.type == "cpu")
        return cached

    def launch(self, kernel, table: Tensor, args: tuple, num_warps: int, **constexprs) -> None:
        """One program per table row. Every launch of this backend goes through here."""
        kernel[(table.shape[0],)](table, *args, **constexprs, num_warps=num_warps, enable_fp_fusion=FP_FUSION)

    def update(self, bucket: Bucket, momenta: Sequence[float] | Tensor, skip: Tensor | None = None) -> None:
        t = self.tables(bucket)
        shadows = bucket.shadows
        in_memory = isinstance(momenta, Tensor)
        values = momenta if in_memory else tuple(map(float, momenta))
        for table, full in t.parts():
            self.launch(_ema_update_kernel, table, (shadows, t.typed, table if skip is None else skip, values,
                                                    shadows.stride(0)), warps_for(shadows.shape[0]),
                        BLOCK=t.block, PROFILES=shadows.shape[0], CHECK_SKIP=skip is not None,
                        MOMENTA_IN_MEMORY=in_memory, FULL=full, ROUND_BY_HAND=t.round_by_hand)

    def nonfinite(self, bucket: Bucket) -> Tensor:
        t = self.tables(bucket)
        flag = torch.zeros((), dtype=torch.int32, device=bucket.param_device)
        for table, full in t.parts():
            self.launch(_ema_nonfinite_kernel, table, (t.typed, flag), warps_for(), BLOCK=t.block, FULL=full)
        return flag

    def exchange(self, bucket: Bucket, profile: int) -> None:
        t = self.tables(bucket)
        for table, full in t.parts():
            self.launch(_ema_swap_kernel, table, (bucket.rows[profile], t.typed), warps_for(), BLOCK=t.block, FULL=full)

    def copy(self, bucket: Bucket, flat: Tensor, to_params: bool) -> None:
        t = self.tables(bucket)
        for table, full in t.parts():
            self.launch(_ema_copy_kernel, table, (flat, t.typed), warps_for(), BLOCK=t.block, TO_PARAMS=to_params,
                        FULL=full, ROUND_BY_HAND=t.round_by_hand)
