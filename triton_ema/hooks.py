"""The hooks by which an EMA is attached to an optimizer it does not wrap.

Frameworks build the optimizer and hold it (Lightning, the transformers
Trainer, accelerate, mmengine). Attached, the EMA runs inside that
optimizer's own ``step()`` and travels in its own ``state_dict()``, through
torch's optimizer hooks, which drive the same core
(:class:`~triton_ema.ema.EMA`) as :class:`EMAOptimizer`'s ``step()`` and
``load_state_dict()`` do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import check_load, ema_state
from .optimizer import EMAOptimizer, attached_ema
from .wrapped import unwrap_optimizer

if TYPE_CHECKING:
    from .schedules import Schedule

__all__ = ["AttachHooks", "attach", "attached_ema"]


class AttachHooks:
    """Step pre/post, state-dict post and load pre/post hooks of one attached EMA."""

    def __init__(self, ema: EMAOptimizer, optimizer: torch.optim.Optimizer) -> None:
        self.ema = ema  # held by the optimizer's hooks: the EMA lives as long as they do
        self.core = ema.core
        self.match_names = True  # load_state_dict's match_names, set by the EMA's own load_state_dict
        self._update: tuple | None = None  # what before_step decided for this step
        self._loading: Any = None
        self.handles = [optimizer.register_step_pre_hook(self.before_step),
                        optimizer.register_step_post_hook(self.after_step),
                        optimizer.register_state_dict_post_hook(self.add_state),
                        optimizer.register_load_state_dict_pre_hook(self.check_load),
                        optimizer.register_load_state_dict_post_hook(self.load)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Raising here stops the base step before it changes a weight.
        self._update = self.core.before_step()

    def after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Runs only after a completed step: a step that GradScaler skips never calls step().
        self.core.after_step(self._update)

    def add_state(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict["ema"] = ema_state(self.core)
        return state_dict

    def check_load(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        # Before the base optimizer loads: everything is checked while nothing has changed yet.
        self.core.refuse_while_swapped("load_state_dict()")
        self._loading = check_load(self.core, state_dict, self.match_names)
        return {k: v for k, v in state_dict.items() if k != "ema"}

    def load(self, optimizer: torch.optim.Optimizer) -> None:
        """After the base optimizer loaded: the checked EMA, or a restart from the current weights."""
        loading, self._loading = self._loading, None
        if loading is None:
            self.core.restart()
        else:
            self.core.load(*loading)


def attach(optimizer: torch.optim.Optimizer, momentum: float | Schedule | Mapping[str, float | Schedule] | None = None,
           **kwargs: Any) -> EMAOptimizer:
    """Keep the EMA of an optimizer that something else built and holds, without replacing it.

    Hooks on ``optimizer`` run the EMA update inside its own ``step()`` (a step
    that ``GradScaler`` skips updates nothing) and put ``"ema"`` in its own
    ``state_dict()``, checked before and loaded after its ``load_state_dict()``:
    whoever checkpoints the optimizer checkpoints the EMA. A step pre-hook checks
    everything that can fail before the base step. One EMA per optimizer.

    Args:
        optimizer: The ``torch.optim.Optimizer`` a framework built (Lightning,
            the transformers Trainer, accelerate, mmengine), or the framework's
            wrapper of it (accelerate's ``AcceleratedOptimizer``, Lightning's
            ``LightningOptimizer``, mmengine's ``OptimWrapper``): that is
            attached through, to the optimizer inside it (``triton_ema.wrapped``).
        momentum: As for :class:`~triton_ema.EMAOptimizer`.
        **kwargs: The other arguments of :class:`~triton_ema.EMAOptimizer`
            (``decay``, ``interval``, ``model``, ``update_buffers``,
            ``shadow_dtype``, ``device``, ``backend``, ``skip_nonfinite``,
            ``capturable``, ``overlap``).

    Returns:
        The EMA, an :class:`~triton_ema.EMAOptimizer` whose ``attached`` is true.
        ``swap_ema()``, ``ema_state_dict()``, ``num_steps`` work as on a wrapper;
        its ``step()``, ``state_dict()`` and ``load_state_dict()`` are the
        optimizer's (one update per step, however it is called). ``detach()``
        removes the hooks and keeps the EMA.

    Raises:
        ValueError: ``optimizer`` already has an EMA attached.
        TypeError: A wrapper that cannot be attached through (naming it and
            where the EMA goes), or as :class:`~triton_ema.EMAOptimizer` raises
            for bad arguments.

    Example:
        ```python
        ema = attach(optimizer, momentum=2e-4, model=model)
        optimizer.step()                  # the EMA updates inside it
        optimizer.state_dict()["ema"]     # and its checkpoint carries the EMA
        with ema.swap_ema():
            evaluate(model)
        ```
    """
    optimizer = unwrap_optimizer(optimizer)  # a framework's wrapper: the optimizer inside, where that is right
    ema = EMAOptimizer(optimizer, momentum, **kwargs)
    ema.run_from(AttachHooks(ema, optimizer))
    return ema
