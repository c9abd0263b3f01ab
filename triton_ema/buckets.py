"""Flat shadow storage: the one place that knows where every EMA element lives.

Averaged tensors (parameters, and floating buffers when asked) are grouped
into buckets by (param device, param dtype, shadow dtype, shadow device).
Each bucket owns one flat shadow buffer; tensor ``i`` of a bucket lives at
``offsets[i]`` in it, laid out in the tensor's own memory order so a dense
tensor of any stride order is a straight run of elements. The parameters
themselves are never moved or rebound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# Shadow offsets are padded to multiples of 16 elements so that every segment
# starts on a 64-byte (fp32) or 32-byte (16-bit) boundary: 128-bit accesses.
ALIGN = 16


def default_shadow_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """float32 shadows for 16-bit params (a 16-bit EMA with a small momentum rounds its updates away)."""
    return torch.float32 if param_dtype in (torch.float16, torch.bfloat16) else param_dtype


def is_dense(t: Tensor) -> bool:
    """True when ``t`` covers exactly ``numel`` consecutive elements, in any stride order."""
    if t.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted((d for d in zip(t.shape, t.stride()) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return (a.shape, a.stride(), a.dtype, a.device) == (b.shape, b.stride(), b.dtype, b.device)


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# Torch's one C++ loop comparing many tensors' data pointers with saved ones (its
# CUDA graphs check their static inputs with it); CUDA builds have it, CPU builds do not.
_PTRS_EQUAL = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)


class StorageWatch:
    """Whether any tensor's storage moved since :meth:`mark`, in one pass over all of them."""

    def __init__(self, tensors: list[Tensor]) -> None:
        self.tensors = tensors  # the caller's own list: a tensor put in its place is watched
        self.mark()

    def mark(self) -> None:
        self.ptrs = list(map(Tensor.data_ptr, self.tensors))
        self.indices = list(range(len(self.tensors)))

    def moved(self) -> bool:
        if _PTRS_EQUAL is not None:
            return not _PTRS_EQUAL(self.tensors, self.ptrs, self.indices)
        return list(map(Tensor.data_ptr, self.tensors)) != self.ptrs


@dataclass(eq=False)
class Bucket:
    """Shadows of tensors that share device and dtype, in one flat buffer."""

    tensors: list[Tensor]
    names: list[str]
    shadow: Tensor
    offsets: list[int]
    views: list[Tensor] = field(init=False)
    ptrs: tuple[int, ...] = field(init=False)  # data_ptr of every tensor when the layout was last checked
    param_dtype: torch.dtype = field(init=False)
    param_device: torch.device = field(init=False)
    stash: Tensor | None = None  # training weights while swapped, when not exchanged in place
    exchanged: bool = False  # params and shadow exchanged in place by swap_in
    backend: Any = None  # set by ShadowStore: the Backend that runs this bucket's jobs
    cache: dict = field(default_factory=dict)  # the backend's own data (segment tables)

    def __post_init__(self) -> None:
        self.views = self.views_of(self.shadow)
        self.ptrs = self.current_ptrs()
        self.param_dtype, self.param_device = self.tensors[0].dtype, self.tensors[0].device

    @property
    def can_exchange(self) -> bool:
        """Params and shadows can trade places bitwise, with no temporary."""
        return self.shadow.dtype == self.param_dtype and self.shadow.device == self.param_device

    def current_ptrs(self) -> tuple[int, ...]:
        return tuple(map(Tensor.data_ptr, self.tensors))

    def new_flat(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An empty flat buffer laid out like the shadow."""
        return torch.empty(self.shadow.numel(), dtype=dtype, device=device)

    def views_of(self, flat: Tensor) -> list[Tensor]:
        """Tensor-shaped views of a flat buffer laid out like the shadow."""
        return [
            flat.as_strided(t.shape, t.stride(), off) if is_dense(t) else flat[off : off + t.numel()].view(t.shape)
            for t, off in zip(self.tensors, self.offsets)
        ]

    def ema_tensors(self) -> list[Tensor]:
        """Where the EMA values are now: the params themselves while exchanged."""
        return self.tensors if self.exchanged else self.views

    def __getstate__(self) -> dict[str, Any]:
        # Views come back as separate tensors from pickle: rebuilt from the shadow on load.
        # The backend's cache holds raw addresses of this process's tensors.
        state = self.__dict__.copy()
        state.update(views=None, cache={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.views = self.views_of(self.shadow)


def _group(tensors: Sequence[Tensor], shadow_dtype: torch.dtype | None, device: torch.device | None) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        sdtype = shadow_dtype or default_shadow_dtype(t.dtype)
        sdevice = t.device if device is None else device
        groups.setdefault((t.device, t.dtype, sdtype, sdevice), []).append(i)
    return groups


def build_buckets(
    tensors: Sequence[Tensor],
    names: Sequence[str],
    shadow_dtype: torch.dtype | None,
    device: torch.device | None,
) -> tuple[list[Bucket], list[tuple[int, int]]]:
    """Lay out zero-filled shadows for ``tensors``.

    Returns the buckets and, for every tensor in order, its (bucket, slot).
    """
    buckets, where = [], [(0, 0)] * len(tensors)
    for (_, _, sdtype, sdevice), members in _group(tensors, shadow_dtype, device).items():
        offsets, total = [], 0
        for i in members:
            offsets.append(total)
            total += _padded(tensors[i].numel())
        shadow = torch.zeros(total, dtype=sdtype, device=sdevice)
        for slot, i in enumerate(members):
            where[i] = (len(buckets), slot)
        buckets.append(Bucket([tensors[i] for i in members], [names[i] for i in members], shadow, offsets))
    return buckets, where


class ShadowStore:
    """All buckets of one EMA: builds them, keeps them valid, runs their jobs.

    ``tensors`` are the averaged tensors in a fixed order (the optimizer's
    params, then buffers); index ``i`` everywhere means ``tensors[i]``.
    """

    def __init__(self, tensors: Sequence[Tensor], names: Sequence[str], *, shadow_dtype, device, backend: str) -> None:
        self.shadow_dtype = shadow_dtype
        self.device = device
        self.backend = backend
        self.skips: dict[torch.device, Tensor] = {}  # per device: bucket updates skipped for non-finite params
        self.held: list[Tensor] | None = None  # while swapped: the storage that swap_in swapped
        self.rebuild(list(tensors), list(names), [None] * len(tensors))

    def rebuild(self, tensors: list[Tensor], names: list[str], values: list[Tensor | None]) -> None:
        """Lay out buckets; shadows start from ``values[i]`` or, where None, from the tensor."""
        from .backends import select_backend

        buckets, where = build_buckets(tensors, names, self.shadow_dtype, self.device)
        for bucket in buckets:
            bucket.backend = select_backend(self.backend, bucket)
        with torch.no_grad():
            for bucket in buckets:
                bucket.backend.params_to_shadow(bucket)
            for (b, slot), value in zip(where, values):
                if value is not None:
                    buckets[b].views[slot].copy_(value)
        self.tensors, self.names, self.buckets, self.where = tensors, names, buckets, where
        self.watch = StorageWatch(tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def swapped(self) -> bool:
        return any(b.exchanged or b.stash is not None for b in self.buckets)

    def ema(self, i: int) -> Tensor:
        """The EMA of tensor ``i`` as it is stored now (no copy)."""
        b, slot = self.where[i]
        return self.buckets[b].ema_tensors()[slot]

    def shadow_view(self, i: int) -> Tensor:
        b, slot = self.where[i]
        return self.buckets[b].views[slot]

    def replace(self, i: int, tensor: Tensor) -> None:
        """``tensors[i]`` is now another object (``module.to()`` replaces buffers); keep its EMA."""
        b, slot = self.where[i]
        bucket = self.buckets[b]
        self.tensors[i] = bucket.tensors[slot] = tensor

    def refresh(self) -> None:
        """Notice storage that was replaced (``p.data = ...``, ``module.to()``,
        ``load_state_dict(assign=True)``) before any job touches it: one pass over
        every tensor's data pointer while nothing moved."""
        if not self.watch.moved():
            return
        stale = [b for b in self.buckets if b.current_ptrs() != b.ptrs]
        relayout = False
        for bucket in stale:
            for t, name, view in zip(bucket.tensors, bucket.names, bucket.views):
                if t.shape != view.shape:
                    raise RuntimeError(f"{name} changed shape from {tuple(view.shape)} to {tuple(t.shape)}; "
                                       "its EMA cannot follow")
                relayout |= (t.dtype, t.device, t.stride()) != (bucket.param_dtype, bucket.param_device, view.stride())
        if relayout and self.swapped:
            raise RuntimeError("parameters changed dtype, device or memory layout inside swap_ema(); "
                               "move the model outside the swap_ema() block")
        if relayout:
            self.rebuild(self.tensors, self.names, [self.shadow_view(i) for i in range(len(self))])
            return
        for bucket in stale:
            bucket.ptrs = bucket.current_ptrs()
            bucket.cache.clear()
        self.watch.mark()

    # Jobs: one backend call per bucket.

    def update(self, momentum: float, skip_nonfinite: bool = False) -> None:
        for bucket in self.buckets:
            if not skip_nonfinite:
                bucket.backend.update(bucket, momentum)
                continue
            flag = bucket.backend.nonfinite(bucket)  # decided on the device: no host sync
            bucket.backend.update(bucket, momentum, flag)
            count = self.skips.get(flag.device)
            if count is None:
                self.skips[flag.device] = flag.to(torch.int64)
            else:
                count += flag

    def skipped(self) -> int:
        """Bucket updates skipped for non-finite params so far (reading it waits for the device)."""
        return sum(int(count) for count in self.skips.values())

    def swap_in(self) -> None:
        done = []
        try:
            for bucket in self.buckets:
                bucket.backend.swap_in(bucket)
                done.append(bucket)
        except BaseException:
            for bucket in reversed(done):
                bucket.backend.swap_out(bucket)
            raise
        # The swapped storage, kept alive: if the block moves a tensor elsewhere, the
        # training weights still have a place to come back to.
        self.held = [t.detach() for t in self.tensors]

    def swap_out(self, current: Sequence[Tensor]) -> dict[int, Tensor]:
        """Undo :meth:`swap_in`; ``current`` are the tensors as the model holds them now.

        A tensor whose storage was replaced by one of the same layout is swapped
        out of its new storage (what it holds becomes the EMA, as any write in the
        block does). One moved to another dtype, device, shape or memory layout is
        swapped out of the storage it had at :meth:`swap_in`: the EMA keeps its
        values from before the move, and the training weights land in that old
        storage, returned as ``{i: old storage}`` for the caller to put them into
        the model. Afterwards the store tracks ``current`` (the next
        :meth:`refresh` lays the buckets out anew for the moved ones)."""
        held, self.held = self.held, None
        moved = {i: h for i, (t, h) in enumerate(zip(current, held)) if not _same_layout(t, h)}
        self._retrack([moved.get(i, t) for i, t in enumerate(current)])
        self.refresh()
        if moved:  # a backend's cache may describe a tensor by the object, whose dtype moved with it
            for bucket in self.buckets:
                bucket.cache.clear()
        for bucket in self.buckets:
            bucket.backend.swap_out(bucket)
        self._retrack(list(current))
        return moved

    def _retrack(self, tensors: list[Tensor]) -> None:
        for i, t in enumerate(tensors):
            self.replace(i, t)

    def reset(self) -> None:
        """Shadows become copies of the current tensors."""
        for bucket in self.buckets:
            bucket.backend.params_to_shadow(bucket)

    def load(self, values: Sequence[Tensor], skipped: int) -> None:
        """Overwrite every shadow with ``values[i]`` (already checked for shape and dtype),
        and restart the skip count at ``skipped``."""
        for i, value in enumerate(values):
            self.shadow_view(i).copy_(value)
        self.skips = {torch.device("cpu"): torch.tensor(skipped)} if skipped else {}
