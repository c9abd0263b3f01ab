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
    backend: Any = None  # set by the store (store.py): the Backend that runs this bucket's jobs
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
