"""Flat shadow storage: the one place that knows where every EMA element lives.

Averaged tensors (parameters, and floating buffers when asked) are grouped
into buckets by (param device, param dtype, shadow dtype, shadow device).
Each bucket owns one flat shadow buffer per EMA profile (the rows of one
``[profiles, numel]`` tensor); tensor ``i`` of a bucket lives at
``offsets[i]`` in every row, laid out in the tensor's own memory order so a dense
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

    def __init__(self, tensors: list[Tensor], keep_storages: bool = False) -> None:
        self.tensors = tensors  # the caller's own list: a tensor put in its place is watched
        self.keep_storages = keep_storages
        self.mark()

    def mark(self) -> None:
        self.ptrs = list(map(Tensor.data_ptr, self.tensors))
        self.indices = list(range(len(self.tensors)))
        self.hold(self.keep_storages)

    def hold(self, keep: bool) -> None:
        """Hold the tensors' storages until the next mark, so that a storage replaced
        meanwhile stays allocated (``overlap=True``); the marked pointers stay as they are."""
        self.keep_storages = keep
        self.storages = [t.untyped_storage() for t in self.tensors] if keep else None

    def moved(self) -> bool:
        if _PTRS_EQUAL is not None:
            return not _PTRS_EQUAL(self.tensors, self.ptrs, self.indices)
        return list(map(Tensor.data_ptr, self.tensors)) != self.ptrs


@dataclass(eq=False)
class Bucket:
    """Shadows of tensors that share device and dtype: one flat row per EMA profile,
    all rows in one ``[profiles, numel]`` buffer laid out alike."""

    tensors: list[Tensor]
    names: list[str]
    shadows: Tensor  # [profiles, numel]; each row a flat shadow, the same offsets in every row
    offsets: list[int]
    rows: list[Tensor] = field(init=False)  # shadows[k], one object per profile
    profile_views: list[list[Tensor]] = field(init=False)  # [k][i]: profile k's shadow of tensors[i]
    ptrs: tuple[int, ...] = field(init=False)  # data_ptr of every tensor when the layout was last checked
    param_dtype: torch.dtype = field(init=False)
    param_device: torch.device = field(init=False)
    stash: Tensor | None = None  # training weights while swapped, when not exchanged in place
    exchanged: bool = False  # params and the swapped profile's shadow exchanged in place by swap_in
    swapped: int | None = None  # the profile whose EMA the params hold, while swapped
    backend: Any = None  # set by the store (store.py): the Backend that runs this bucket's jobs
    cache: dict = field(default_factory=dict)  # the backend's own data (segment tables)

    def __post_init__(self) -> None:
        self.rows = list(self.shadows.unbind(0))
        self.profile_views = [self.views_of(row) for row in self.rows]
        self.ptrs = self.current_ptrs()
        self.param_dtype, self.param_device = self.tensors[0].dtype, self.tensors[0].device

    @property
    def can_exchange(self) -> bool:
        """Params and shadows can trade places bitwise, with no temporary."""
        return self.shadows.dtype == self.param_dtype and self.shadows.device == self.param_device

    def current_ptrs(self) -> tuple[int, ...]:
        return tuple(map(Tensor.data_ptr, self.tensors))

    def new_flat(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An empty flat buffer laid out like one shadow row."""
        return torch.empty(self.shadows.shape[1], dtype=dtype, device=device)

    def views_of(self, flat: Tensor) -> list[Tensor]:
        """Tensor-shaped views of a flat buffer laid out like a shadow row."""
        base = flat.storage_offset()
        return [
            flat.as_strided(t.shape, t.stride(), base + off) if is_dense(t) else flat[off : off + t.numel()].view(t.shape)
            for t, off in zip(self.tensors, self.offsets)
        ]

    def views_for(self, flat: Tensor) -> list[Tensor]:
        """:meth:`views_of`, without building them again for a shadow row."""
        for row, views in zip(self.rows, self.profile_views):
            if flat is row:
                return views
        return self.views_of(flat)

    def ema_tensors(self, profile: int) -> list[Tensor]:
        """Where profile ``profile``'s EMA values are now: the params themselves while exchanged."""
        return self.tensors if self.exchanged and self.swapped == profile else self.profile_views[profile]

    def __getstate__(self) -> dict[str, Any]:
        # Rows and views come back as separate tensors from pickle: rebuilt from the shadows on load.
        # The backend's cache holds raw addresses of this process's tensors.
        state = self.__dict__.copy()
        state.update(rows=None, profile_views=None, cache={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.rows = list(self.shadows.unbind(0))
        self.profile_views = [self.views_of(row) for row in self.rows]


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
    profiles: int = 1,
) -> tuple[list[Bucket], list[tuple[int, int]]]:
    """Lay out zero-filled shadows for ``tensors``, ``profiles`` rows each.

    Returns the buckets and, for every tensor in order, its (bucket, slot).
    """
    buckets: list[Bucket] = []
    where = [(0, 0)] * len(tensors)
    for (_, _, sdtype, sdevice), members in _group(tensors, shadow_dtype, device).items():
        offsets, total = [], 0
        for i in members:
            offsets.append(total)
            total += _padded(tensors[i].numel())
        shadows = torch.zeros(profiles, total, dtype=sdtype, device=sdevice)
        for slot, i in enumerate(members):
            where[i] = (len(buckets), slot)
        buckets.append(Bucket([tensors[i] for i in members], [names[i] for i in members], shadows, offsets))
    return buckets, where
