"""The hooks by which an EMA is attached to an optimizer it does not wrap.

Frameworks build the optimizer and hold it (Lightning, the transformers
Trainer, accelerate, mmengine). Attached, the EMA runs inside that
optimizer's own ``step()`` and travels in its own ``state_dict()``, through
torch's optimizer hooks: the same code as :class:`EMAOptimizer`'s
``step()`` and ``load_state_dict()``, called from the other side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils.hooks import RemovableHandle

from .checkpoint import check_load, ema_state
from .wrapped import unwrap_optimizer

if TYPE_CHECKING:
    from .optimizer import EMAOptimizer
    from .schedules import Schedule


class AttachHooks:
    """Step pre/post, state-dict post and load pre/post hooks of one attached EMA."""

    def __init__(self, ema: EMAOptimizer) -> None:
        self.ema = ema
        self._update: tuple | None = None  # what _before_step decided for this step
        self._loading: Any = None

    def register(self, optimizer: torch.optim.Optimizer) -> list[RemovableHandle]:
        return [optimizer.register_step_pre_hook(self.before_step),
                optimizer.register_step_post_hook(self.after_step),
                optimizer.register_state_dict_post_hook(self.add_state),
                optimizer.register_load_state_dict_pre_hook(self.check_load),
                optimizer.register_load_state_dict_post_hook(self.load)]

    def before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Raising here stops the base step before it changes a weight.
        self._update = self.ema._before_step()

    def after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Runs only after a completed step: a step that GradScaler skips never calls step().
        self.ema._after_step(self._update)

    def add_state(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict["ema"] = ema_state(self.ema)
        return state_dict

    def check_load(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        # Before the base optimizer loads: everything is checked while nothing has changed yet.
        self.ema._refuse_while_swapped("load_state_dict()")
        self._loading = check_load(self.ema, state_dict, self.ema._match_names)
        return {k: v for k, v in state_dict.items() if k != "ema"}

    def load(self, optimizer: torch.optim.Optimizer) -> None:
        loading, self._loading = self._loading, None
        self.ema._apply_load(loading)


def attach(optimizer: torch.optim.Optimizer, momentum: float | Schedule | None = None, **kwargs: Any) -> EMAOptimizer:
    """Keep the EMA of an optimizer that something else built and holds, without replacing it.

    Takes the arguments of :class:`EMAOptimizer`. Hooks on ``optimizer`` run
    the EMA update inside its own ``step()`` (a step that ``GradScaler`` skips
    updates nothing) and put ``"ema"`` in its own ``state_dict()``, checked
    before and loaded after its ``load_state_dict()``: whoever checkpoints the
    optimizer checkpoints the EMA. Returns the EMA, an :class:`EMAOptimizer`:
    ``swap_ema()``, ``ema_state_dict()``, ``num_steps`` work as on a wrapper;
    its ``step()``, ``state_dict()`` and ``load_state_dict()`` are the
    optimizer's (one update per step, however it is called). A framework's
    wrapper (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``, mmengine's ``OptimWrapper``) is attached through,
    to the optimizer inside it (``triton_ema.wrapped``)."""
    from .optimizer import EMAOptimizer  # the optimizer uses these hooks: imported when called

    optimizer = unwrap_optimizer(optimizer)  # a framework's wrapper: the optimizer inside, where that is right
    ema = EMAOptimizer(optimizer, momentum, **kwargs)
    ema._hooks = AttachHooks(ema).register(optimizer)
    return ema


def attached_ema(optimizer: torch.optim.Optimizer) -> EMAOptimizer | None:
    """The EMA attached to ``optimizer``, if one is."""
    for hook in optimizer._optimizer_step_post_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, AttachHooks):
            return owner.ema
    return None
