"""The jobs over all buckets of one EMA: build them, keep them valid, update, swap, load.

This is the layer above both storage (:mod:`.buckets`, which knows no backend)
and the backends: it picks a backend per bucket (:func:`select_backend`, the one
place that chooses) and runs each job as one backend call per bucket.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from .backends import BACKENDS, TRITON_DTYPES, Backend, TorchBackend
from .buckets import Bucket, StorageWatch, build_buckets, is_dense

_TORCH = TorchBackend()


def triton_unavailable(bucket: Bucket) -> str | None:
    """Why the Triton backend cannot run ``bucket``, or None when it can."""
    device = bucket.param_device
    if bucket.shadows.device != device:
        return f"shadows on {bucket.shadows.device} for parameters on {device} (Triton kernels need both on one device)"
    if bucket.param_dtype not in TRITON_DTYPES or bucket.shadows.dtype not in TRITON_DTYPES:
        return (f"parameter dtype {bucket.param_dtype} with shadow dtype {bucket.shadows.dtype} "
                "(Triton kernels take float32, bfloat16, float16)")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("parameters on the CPU (Triton runs CPU tensors only in its interpreter: "
                "set TRITON_INTERPRET=1 before importing triton)")
    if device.type not in ("cpu", "cuda"):
        return f"parameters on {device}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    for name, t in zip(bucket.names, bucket.tensors):
        if not is_dense(t):
            return f"{name} is a non-dense view (stride {t.stride()}); make it contiguous"
    return None


def select_backend(name: str, bucket: Bucket) -> Backend:
    """The backend that runs ``bucket``'s jobs for the user's ``backend=`` choice."""
    if name == "torch":
        return _TORCH
    reason = triton_unavailable(bucket)
    if name == "triton":
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run {reason}; use backend='auto' or 'torch'")
        from .triton_backend import TritonBackend

        return TritonBackend()
    if name == "auto":
        if reason is None and bucket.param_device.type == "cuda":
            from .triton_backend import TritonBackend

            return TritonBackend()
        return _TORCH
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return (a.shape, a.stride(), a.dtype, a.device) == (b.shape, b.stride(), b.dtype, b.device)


class ShadowStore:
    """All buckets of one EMA: builds them, keeps them valid, runs their jobs.

    ``tensors`` are the averaged tensors in a fixed order (the optimizer's
    params, then buffers); index ``i`` everywhere means ``tensors[i]``. Each
    tensor has ``profiles`` shadows (one per EMA profile), index ``k``.
    """

    def __init__(self, tensors: Sequence[Tensor], names: Sequence[str], *, shadow_dtype, device, backend: str,
                 profiles: int = 1) -> None:
        self.shadow_dtype = shadow_dtype
        self.device = device
        self.backend = backend
        self.profiles = profiles
        self.skips: dict[torch.device, Tensor] = {}  # per device: bucket updates skipped for non-finite params
        self.held: list[Tensor] | None = None  # while swapped: the storage that swap_in swapped
        self.generation = -1  # counts the layouts: views of the shadows taken before a rebuild are stale
        self.keep_storages = False  # hold the tensors' storages until the next refresh (overlap=True)
        self.rebuild(list(tensors), list(names), [None] * len(tensors))

    def rebuild(self, tensors: list[Tensor], names: list[str], values: list[Sequence[Tensor] | None]) -> None:
        """Lay out buckets; tensor i's shadows start from ``values[i]`` (one per profile)
        or, where None, from the tensor."""
        buckets, where = build_buckets(tensors, names, self.shadow_dtype, self.device, self.profiles)
        for bucket in buckets:
            bucket.backend = select_backend(self.backend, bucket)
        with torch.no_grad():
            for bucket in buckets:
                bucket.backend.params_to_shadow(bucket)
            for (b, slot), value in zip(where, values):
                for views, v in zip(buckets[b].profile_views, value or ()):
                    views[slot].copy_(v)
        self.tensors, self.names, self.buckets, self.where = tensors, names, buckets, where
        self.generation += 1
        self.watch = StorageWatch(tensors, self.keep_storages)

    def keep_alive(self, keep: bool) -> None:
        """Hold every averaged tensor's storage from one refresh to the next, so that a
        storage replaced meanwhile is not freed while an update may still read it."""
        self.keep_storages = keep
        self.watch.hold(keep)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def swapped(self) -> bool:
        return any(b.exchanged or b.stash is not None for b in self.buckets)

    def ema(self, i: int, profile: int = 0) -> Tensor:
        """Profile ``profile``'s EMA of tensor ``i`` as it is stored now (no copy)."""
        b, slot = self.where[i]
        return self.buckets[b].ema_tensors(profile)[slot]

    def shadow_view(self, i: int, profile: int = 0) -> Tensor:
        b, slot = self.where[i]
        return self.buckets[b].profile_views[profile][slot]

    def shadow_views(self, i: int) -> list[Tensor]:
        """Tensor ``i``'s shadows, one per profile."""
        return [self.shadow_view(i, k) for k in range(self.profiles)]

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
            for t, name, view in zip(bucket.tensors, bucket.names, bucket.profile_views[0]):
                if t.shape != view.shape:
                    raise RuntimeError(f"{name} changed shape from {tuple(view.shape)} to {tuple(t.shape)}; "
                                       "its EMA cannot follow")
                relayout |= (t.dtype, t.device, t.stride()) != (bucket.param_dtype, bucket.param_device, view.stride())
        if relayout and self.swapped:
            raise RuntimeError("parameters changed dtype, device or memory layout inside swap_ema(); "
                               "move the model outside the swap_ema() block")
        if relayout:
            self.rebuild(self.tensors, self.names, [self.shadow_views(i) for i in range(len(self))])
            return
        for bucket in stale:
            bucket.ptrs = bucket.current_ptrs()
            bucket.cache.clear()
        self.watch.mark()

    # Jobs: one backend call per bucket.

    def update(self, momenta: Sequence[float] | Tensor, skip_nonfinite: bool = False, skip: Tensor | None = None) -> None:
        """Every profile k moves by ``momenta[k]`` (floats, or a float32 device tensor):
        one backend call per bucket. Nothing moves where the device flag ``skip`` is set."""
        for bucket in self.buckets:
            if not skip_nonfinite:
                bucket.backend.update(bucket, momenta, skip)
                continue
            flag = bucket.backend.nonfinite(bucket)  # decided on the device: no host sync
            if skip is not None:
                flag = flag * (1 - skip)  # a step without an update skips nothing for non-finite params
            bucket.backend.update(bucket, momenta, flag if skip is None else flag | skip)
            count = self.skips.get(flag.device)
            if count is None:
                self.skips[flag.device] = flag.to(torch.int64)
            else:
                count += flag

    def skipped(self) -> int:
        """Bucket updates skipped for non-finite params so far (reading it waits for the device)."""
        return sum(int(count) for count in self.skips.values())

    def swap_in(self, profile: int = 0) -> None:
        done = []
        try:
            for bucket in self.buckets:
                bucket.backend.swap_in(bucket, profile)
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
        assert held is not None, "swap_out() follows swap_in(), which holds the swapped storage"
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

    def load(self, values: Sequence[Sequence[Tensor]], skipped: int) -> None:
        """Overwrite every shadow with ``values[k][i]`` (already checked for shape and dtype),
        and restart the skip count at ``skipped``."""
        for k, profile in enumerate(values):
            for i, value in enumerate(profile):
                self.shadow_view(i, k).copy_(value)
        for count in self.skips.values():  # in place: a captured step keeps adding to the same tensors
            count.zero_()
        if skipped:
            first = next(iter(self.skips.values()), None)
            if first is None:
                self.skips[torch.device("cpu")] = torch.tensor(skipped)
            else:
                first.fill_(skipped)
