"""Backends: how the jobs on one bucket are done.

A backend implements three primitives on a bucket (``update``, ``exchange``,
``copy``); the jobs the optimizer needs (swap in/out, params <-> shadow) are
built from them here, once, for every backend. A bucket holds one shadow row
per EMA profile: ``update`` moves all of them in one pass over the params. Which backend runs a
bucket is chosen in one place, :func:`triton_ema.store.select_backend`.
"""

from __future__ import annotations

import abc
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .buckets import Bucket, is_dense

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class Backend(abc.ABC):
    name: str

    @abc.abstractmethod
    def update(self, bucket: Bucket, momenta: Sequence[float] | Tensor, skip: Tensor | None = None) -> None:
        """For every profile k, ``shadow_k <- shadow_k + momenta[k] * (param - shadow_k)``,
        in float32 or wider, each param read once; nothing changes where the device
        scalar ``skip`` is non-zero. ``momenta``: floats, or a float32 tensor on the
        bucket's device read there (no host sync)."""

    @abc.abstractmethod
    def nonfinite(self, bucket: Bucket) -> Tensor:
        """A device int32 scalar: 1 if any param element is NaN or infinite, else 0 (no host sync)."""

    @abc.abstractmethod
    def exchange(self, bucket: Bucket, profile: int) -> None:
        """Params and the profile's shadow trade values in place, bitwise (equal dtype and device)."""

    @abc.abstractmethod
    def copy(self, bucket: Bucket, flat: Tensor, to_params: bool) -> None:
        """Copy between the params and ``flat`` (a buffer laid out like the shadow)."""

    def params_to_shadow(self, bucket: Bucket) -> None:
        """Every profile's shadow becomes a copy of the params (read once)."""
        self.copy(bucket, bucket.rows[0], to_params=False)
        bucket.shadows[1:].copy_(bucket.rows[0])

    def shadow_to_params(self, bucket: Bucket, profile: int) -> None:
        self.copy(bucket, bucket.rows[profile], to_params=True)

    def swap_in(self, bucket: Bucket, profile: int) -> None:
        """Put the profile's EMA into the params; the training weights wait in its
        shadow (in-place exchange) or, where that would round them, in a stash."""
        if bucket.can_exchange:
            self.exchange(bucket, profile)
            bucket.exchanged = True
        else:
            stash = bucket.new_flat(bucket.param_dtype, bucket.param_device)
            self.copy(bucket, stash, to_params=False)
            self.shadow_to_params(bucket, profile)
            bucket.stash = stash
        bucket.swapped = profile

    def swap_out(self, bucket: Bucket) -> None:
        """Undo :meth:`swap_in`: training weights back bitwise. What the params
        hold became the swapped profile's EMA: exchanged back in place, or, from a
        stash, only the elements the block wrote (an element left alone keeps its
        wider shadow value). Other profiles are untouched."""
        if bucket.exchanged:
            assert bucket.swapped is not None, "swap_in sets the swapped profile with exchanged"
            self.exchange(bucket, bucket.swapped)
            bucket.exchanged = False
        elif bucket.stash is not None:
            keep_writes(bucket)
            self.copy(bucket, bucket.stash, to_params=True)
            bucket.stash = None
        bucket.swapped = None


# Updates that need temporaries (dtype conversions, the copy kept for a skipped
# update) run over groups of at most this many elements, a tensor larger than
# that cut into pieces, so the temporaries stay small whatever the model's size:
# cache-sized on a CPU (4 MB of float32; larger groups measured 2x slower there),
# 64 MB elsewhere, where fewer, larger launches are faster. So do updates of
# several profiles, so that a group's params, read from memory once, are still
# in cache for every profile's lerp. An update of one profile that needs no
# temporaries is one foreach call over the whole bucket, as a bare
# torch._foreach_lerp_ (cut into groups it measured 3-9% slower on a CPU).
GROUP_NUMEL = {"cpu": 2**20}
DEFAULT_GROUP_NUMEL = 2**24
WHOLE = sys.maxsize  # a group limit no bucket reaches


@dataclass
class _Group:
    shadows: list[list[Tensor]]  # [k]: pieces of profile k's flat shadow
    params: list[Tensor]  # the matching pieces of the params
    span: slice  # the run of the flat shadows the pieces lie in


def _pieces(bucket: Bucket, limit: int):
    """(shadow pieces of every profile, param piece, start, end in the flat shadow): a dense
    tensor in runs of at most ``limit`` elements along its memory order (the shadow's
    layout), any other tensor whole."""
    for i, (t, off) in enumerate(zip(bucket.tensors, bucket.offsets)):
        n = t.numel()
        if n <= limit or not is_dense(t):
            yield [views[i] for views in bucket.profile_views], t.detach(), off, off + n
            continue
        flat = t.detach().as_strided((n,), (1,), t.storage_offset())  # dense: [offset, offset + n) in memory order
        for a in range(0, n, limit):
            b = min(a + limit, n)
            yield [row[off + a : off + b] for row in bucket.rows], flat[a:b], off + a, off + b


def _groups(bucket: Bucket, limit: int) -> list[_Group]:
    """The bucket's update work in groups of at most ``limit`` elements; built once per layout."""
    key = ("torch-groups", limit)
    if key not in bucket.cache:
        groups, size = [], limit + 1
        for shadow, param, start, end in _pieces(bucket, limit):
            if size + (end - start) > limit:
                groups.append(_Group([[] for _ in bucket.rows], [], slice(start, end)))
                size = 0
            group = groups[-1]
            for pieces, piece in zip(group.shadows, shadow):
                pieces.append(piece)
            group.params.append(param)
            group.span = slice(group.span.start, end)
            size += end - start
        bucket.cache[key] = groups
    return bucket.cache[key]


def _lerp(profiles: list[list[Tensor]], params: list[Tensor], momenta: Sequence[float] | Tensor) -> None:
    """``views <- views + m * (params - views)`` for the views and momentum of every profile,
    computed in float32 or wider; a dtype conversion of the params is done once for all.
    A momentum tensor is read on the device (a weight per tensor: no host sync)."""
    views = profiles[0]
    if views[0].dtype == params[0].dtype and views[0].device == params[0].device:
        ends = params  # lerp computes 16-bit inputs in float32 and uses the two-sided stable form
    else:
        compute = torch.promote_types(torch.promote_types(views[0].dtype, params[0].dtype), torch.float32)
        ends = [p.to(views[0].device, compute) for p in params]
    for views, momentum in zip(profiles, momenta):
        wide = views if views[0].dtype == ends[0].dtype else [v.to(ends[0].dtype) for v in views]
        if isinstance(momentum, Tensor):
            torch._foreach_lerp_(wide, ends, [momentum.to(ends[0].dtype)] * len(ends))
        else:
            torch._foreach_lerp_(wide, ends, momentum)
        if wide is not views:
            torch._foreach_copy_(views, wide)


def keep_writes(bucket: Bucket) -> None:
    """After a stashed swap: every param element whose bits differ from the swapped
    profile's shadow rounded to the param's dtype (what :meth:`Backend.swap_in` put there)
    was written in the block; its value goes into the shadow."""
    int_dtype = _INT_OF_SIZE[bucket.param_dtype.itemsize]
    for shadows, param, _, _ in _pieces(bucket, GROUP_NUMEL.get(bucket.shadows.device.type, DEFAULT_GROUP_NUMEL)):
        shadow = shadows[bucket.swapped]
        param = param.to(shadow.device)
        written = param.view(int_dtype) != shadow.to(param.dtype).view(int_dtype)
        if written.any():
            shadow.copy_(torch.where(written, param.to(shadow.dtype), shadow))


class TorchBackend(Backend):
    """Foreach ops over the bucket's views: any device, any floating dtype. An update
    takes the bucket group by group and moves every profile's shadows before the next
    group, so a group's params (cache-sized on a CPU) are read from memory once."""

    name = "torch"

    def update(self, bucket: Bucket, momenta: Sequence[float] | Tensor, skip: Tensor | None = None) -> None:
        if skip is not None and skip.device.type == "cpu":  # read at no cost: no device to wait for
            if skip.item():
                return
            skip = None
        self._update(bucket, momenta, skip)

    def _update(self, bucket: Bucket, momenta: Sequence[float] | Tensor, skip: Tensor | None) -> None:
        """The update, group by group; where the device scalar ``skip`` is set, each group is put back."""
        keep = None if skip is None else skip.to(bucket.shadows.device, torch.bool)
        # a kept copy, dtype or device conversions, or params to keep in cache for several profiles
        grouped = keep is not None or not bucket.can_exchange or len(bucket.rows) > 1
        limit = GROUP_NUMEL.get(bucket.shadows.device.type, DEFAULT_GROUP_NUMEL) if grouped else WHOLE
        for group in _groups(bucket, limit):
            if keep is None:
                _lerp(group.shadows, group.params, momenta)
                continue
            span = bucket.shadows[:, group.span]
            saved = span.clone()
            _lerp(group.shadows, group.params, momenta)
            torch.where(keep, saved, span, out=span)

    def nonfinite(self, bucket: Bucket) -> Tensor:
        # min and max propagate NaN and show an infinity of either sign; one read
        # of each tensor (several times faster than isfinite().all() on a CPU).
        ends = [end for t in bucket.tensors if t.numel() for end in t.aminmax()]
        if not ends:
            return torch.zeros((), dtype=torch.int32, device=bucket.param_device)
        return torch.stack(ends).isfinite().all().logical_not().to(torch.int32)

    def exchange(self, bucket: Bucket, profile: int) -> None:
        # Three XORs on the bit patterns: bitwise exact and no temporary.
        int_dtype = _INT_OF_SIZE[bucket.shadows.element_size()]
        for param, view in zip(bucket.tensors, bucket.profile_views[profile]):
            a, b = param.detach().view(int_dtype), view.view(int_dtype)
            a.bitwise_xor_(b)
            b.bitwise_xor_(a)
            a.bitwise_xor_(b)

    def copy(self, bucket: Bucket, flat: Tensor, to_params: bool) -> None:
        views = bucket.views_for(flat)
        if to_params:
            torch._foreach_copy_([t.detach() for t in bucket.tensors], views)
        else:
            torch._foreach_copy_(views, bucket.tensors)
