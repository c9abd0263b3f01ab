"""``swap_ema()``: the EMA in the model for the length of a with-block.

The rule for writes inside the block, the same for every dtype pair: there the
model's averaged parameters *are* the EMA, so what the block writes to one
becomes its EMA on exit (an element it leaves alone keeps its shadow value
exactly; a wider shadow is never rounded). Averaged buffers are kept instead:
a forward in train mode moves BatchNorm statistics (evaluation code that
forgot ``model.eval()``), so their EMA values are copied aside on entry
(buffers are small) and put back on exit, with a warning naming each buffer
that changed.

Whatever happens in the block, the training weights are back in the model on
exit. If the block moved the model to another dtype or device (or changed a
tensor's shape or layout), they go into the moved tensors, the EMA keeps its
values from before the move, the wrapper follows the new layout, and an error
says so.
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import sharding

if TYPE_CHECKING:
    from .optimizer import EMAOptimizer


class SwapContext:
    """What ``opt.swap_ema()`` returns; reports itself if it is never entered."""

    def __init__(self, opt: EMAOptimizer, profile: int = 0) -> None:
        self._opt = opt
        self._profile = profile
        caller = sys._getframe(2)  # the user's call of opt.swap_ema()
        self._caller = (caller.f_code.co_filename, caller.f_lineno)
        self._entered = False
        self._kept: dict[int, Tensor] = {}

    def __enter__(self) -> EMAOptimizer:
        self._entered = True
        opt = self._opt
        if opt._store.swapped:
            raise RuntimeError("swap_ema() is already active; nesting it would put training weights in the model")
        with torch.no_grad():
            sharding.reshard(opt.model)  # FSDP2: a gathered copy of the training weights would hide the swap
            opt._sync()
            self._kept = {i: opt._store.shadow_view(i, self._profile).clone()
                          for i in range(opt._tracking.num_params, len(opt._store))}
            opt._store.swap_in(self._profile)
        return opt

    def __exit__(self, *exc_info: object) -> None:
        opt = self._opt
        with torch.no_grad():
            sharding.reshard(opt.model)  # FSDP2: a forward in the block left the EMA gathered
            moved = opt._store.swap_out(opt._tracking.current())
            changed = self._restore_buffers()
            if moved:
                _put_back(opt, moved)
        if changed:
            warnings.warn(f"{', '.join(changed)} changed inside swap_ema() (a forward in train mode? call model.eval() "
                          "first); the EMA of averaged buffers is kept as it was", UserWarning, stacklevel=2)
        if moved:
            names = [opt._store.names[i] for i in moved]
            raise RuntimeError(f"{names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''} moved to another "
                               "dtype, device or layout inside swap_ema(): the training weights are back in the moved "
                               "model and the EMA kept its values from before the move; move the model outside the "
                               "with-block")

    def _restore_buffers(self) -> list[str]:
        """Put back every averaged buffer's EMA that the block changed; their names."""
        changed = []
        store = self._opt._store
        for i, kept in self._kept.items():
            shadow = store.shadow_view(i, self._profile)
            if not bitwise_equal(shadow, kept):
                shadow.copy_(kept)
                changed.append(store.names[i])
        self._kept = {}
        return changed

    def __del__(self) -> None:
        if not self._entered:
            warnings.warn_explicit("opt.swap_ema() was called without `with`: nothing was swapped and the model "
                                   "still holds the training weights; write `with opt.swap_ema(): ...`",
                                   RuntimeWarning, *self._caller)


def bitwise_equal(a: Tensor, b: Tensor) -> bool:
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(bits), b.view(bits))


def _put_back(opt: EMAOptimizer, moved: dict[int, Tensor]) -> None:
    """The training weights in ``moved[i]`` (the storage tensor ``i`` had when the
    swap began) go into the model: into the tensor's new storage, or, where its
    shape changed, the old storage is put back in the model. The next step or
    swap lays the shadows out for the new layout."""
    n = opt._tracking.num_params
    for i, old in moved.items():
        current = sharding.local(opt._tracking.objects[i])
        if current.shape == old.shape:
            current.detach().copy_(old)
        elif i < n:
            opt._tracking.objects[i].data = old
        else:
            module, attr, _ = opt._tracking.buffer_slots[i - n]
            module._buffers[attr] = opt._tracking.objects[i] = old
            opt._store.replace(i, old)
