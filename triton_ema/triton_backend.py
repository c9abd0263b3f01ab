"""The Triton backend: one kernel launch per bucket and job, through a segment table."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .backends import Backend
from .buckets import Bucket
from .kernels.ema import _ema_copy_kernel, _ema_nonfinite_kernel, _ema_swap_kernel, _ema_update_kernel

# Elements per program. 2048 (16 per thread at 4 warps: four 128-bit accesses
# of fp32) is a first choice, untuned: perf/sweep.py measures the alternatives on a GPU.
BLOCK = 2048
NUM_WARPS = 4
ALIGN_BYTES = 16  # 128-bit accesses


def _rows(count: Tensor, first: Tensor, addr: Tensor, off: Tensor, numel: Tensor, esize: int) -> Tensor:
    """Table rows for ``count[i]`` chunks of tensor ``i`` starting at element ``first[i]``."""
    which = torch.repeat_interleave(torch.arange(count.numel()), count)
    k = torch.arange(which.numel()) - torch.repeat_interleave(count.cumsum(0) - count, count)
    start = first[which] + k * BLOCK
    return torch.stack([addr[which] + start * esize, off[which] + start, (numel[which] - start).clamp(max=BLOCK)], 1)


def segment_table(bucket: Bucket) -> tuple[Tensor, int]:
    """The bucket's int64 table ``(address, flat offset, length)`` on its device:
    full aligned chunks first, then tails; and the number of full rows."""
    esize = bucket.param_dtype.itemsize
    addr = torch.tensor(bucket.ptrs, dtype=torch.int64)
    off = torch.tensor(bucket.offsets, dtype=torch.int64)
    numel = torch.tensor([t.numel() for t in bucket.tensors], dtype=torch.int64)
    aligned = (addr % ALIGN_BYTES == 0).to(torch.int64)
    n_full = aligned * (numel // BLOCK)
    first_tail = n_full * BLOCK
    n_tail = (numel - first_tail + BLOCK - 1) // BLOCK
    table = torch.cat([_rows(n_full, torch.zeros_like(numel), addr, off, numel, esize),
                       _rows(n_tail, first_tail, addr, off, numel, esize)])
    return table.to(bucket.param_device), int(n_full.sum())


class TritonBackend(Backend):
    name = "triton"

    @staticmethod
    def _launch_args(bucket: Bucket) -> tuple[Tensor, int, tuple[int], Tensor | None]:
        """(table, full rows, grid, a non-empty param giving the dtype), built once per layout."""
        cached = bucket.cache.get("table")
        if cached is None:
            table, n_full = segment_table(bucket)
            typed = next((t for t in bucket.tensors if t.numel()), None)  # an empty one may have a null pointer
            cached = bucket.cache["table"] = (table, n_full, (table.shape[0],), typed)
        return cached

    def update(self, bucket: Bucket, momenta: Sequence[float] | Tensor, skip: Tensor | None = None) -> None:
        table, n_full, grid, typed = self._launch_args(bucket)
        if grid[0]:
            shadows = bucket.shadows
            in_memory = isinstance(momenta, Tensor)
            _ema_update_kernel[grid](table, shadows, typed, table if skip is None else skip,
                                     momenta if in_memory else tuple(map(float, momenta)),
                                     shadows.stride(0), n_full, BLOCK=BLOCK, PROFILES=shadows.shape[0],
                                     CHECK_SKIP=skip is not None, MOMENTA_IN_MEMORY=in_memory, num_warps=NUM_WARPS)

    def nonfinite(self, bucket: Bucket) -> Tensor:
        table, n_full, grid, typed = self._launch_args(bucket)
        flag = torch.zeros((), dtype=torch.int32, device=bucket.param_device)
        if grid[0]:
            _ema_nonfinite_kernel[grid](table, typed, flag, n_full, BLOCK=BLOCK, num_warps=NUM_WARPS)
        return flag

    def exchange(self, bucket: Bucket, profile: int) -> None:
        table, n_full, grid, typed = self._launch_args(bucket)
        if grid[0]:
            _ema_swap_kernel[grid](table, bucket.rows[profile], typed, n_full, BLOCK=BLOCK, num_warps=NUM_WARPS)

    def copy(self, bucket: Bucket, flat: Tensor, to_params: bool) -> None:
        table, n_full, grid, typed = self._launch_args(bucket)
        if grid[0]:
            _ema_copy_kernel[grid](table, flat, typed, n_full, BLOCK=BLOCK, TO_PARAMS=to_params, num_warps=NUM_WARPS)
