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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .sharding import reshard

if TYPE_CHECKING:
    from .ema import EMA


class SwapContext:
    """What ``opt.swap_ema()`` returns; reports itself if it is never entered.

    It swaps profile ``profile`` of ``ema`` and gives ``front`` (the object whose
    ``swap_ema()`` made it) to the with-block; ``after`` (if given) runs after the
    swap in and after the swap out, for a front end whose model holds copies of the
    averaged tensors. If it raises after the swap in, the swap is undone (``after``
    runs again) before the error propagates."""

    def __init__(self, ema: EMA, profile: int = 0, front: Any = None,
                 after: Callable[[], None] | None = None) -> None:
        self._ema = ema
        self._profile = profile
        self._front = ema if front is None else front
        self._after = after
        caller = sys._getframe(2)  # the user's call of opt.swap_ema()
        self._caller = (caller.f_code.co_filename, caller.f_lineno)
        self._entered = False
        self._kept: dict[int, Tensor] = {}

    def __enter__(self) -> Any:
        self._entered = True
        ema = self._ema
        if ema.swapped:
            raise RuntimeError("swap_ema() is already active; nesting it would put training weights in the model")
        with torch.no_grad():
            reshard(ema.model)  # FSDP2: a gathered copy of the training weights would hide the swap
            ema.sync()
            self._kept = {i: ema.store.shadow_view(i, self._profile).clone()
                          for i in range(ema.num_params, len(ema.names))}
            ema.swap_in(self._profile)
            if self._after is not None:
                try:
                    self._after()
                except BaseException:  # the with-block never runs: the training values go back first
                    self.__exit__(*sys.exc_info())
                    raise
        return self._front

    def __exit__(self, *exc_info: object) -> None:
        ema = self._ema
        with torch.no_grad():
            reshard(ema.model)  # FSDP2: a forward in the block left the EMA gathered
            moved = ema.swap_out()
            changed = self._restore_buffers()
            if self._after is not None:
                self._after()
        if changed:
            warnings.warn(f"{', '.join(changed)} changed inside swap_ema() (a forward in train mode? call model.eval() "
                          "first); the EMA of averaged buffers is kept as it was", UserWarning, stacklevel=2)
        if moved:
            names = [ema.names[i] for i in moved]
            raise RuntimeError(f"{names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''} moved to another "
                               "dtype, device or layout inside swap_ema(): the training weights are back in the moved "
                               "model and the EMA kept its values from before the move; move the model outside the "
                               "with-block")

    def _restore_buffers(self) -> list[str]:
        """Put back every averaged buffer's EMA that the block changed; their names."""
        changed = []
        store = self._ema.store
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
