"""EMAOptimizer: an EMA of the weights, kept inside any optimizer's ``step()``."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Protocol

import torch
from torch import nn
from torch._C._autograd import _profiler_enabled as profiler_enabled
from torch.autograd.profiler import record_function

from .checkpoint import check_load, ema_state
from .ema import EMA
from .frontend import EMAFrontEnd
from .schedules import Schedule
from .wrapped import refuse_wrapped

__all__ = ["EMAOptimizer", "attached_ema"]


class Hooks(Protocol):
    """What :func:`~triton_ema.attach` registers on the wrapped optimizer (:class:`~triton_ema.hooks.AttachHooks`)."""

    match_names: bool  # load_state_dict's match_names, for the load hooks

    def remove(self) -> None: ...


# The EMA attached to each optimizer, by id: an entry lives as long as its EMA,
# which holds the optimizer (so the id is not reused meanwhile).
_attached: weakref.WeakValueDictionary[int, EMAOptimizer] = weakref.WeakValueDictionary()


def attached_ema(optimizer: torch.optim.Optimizer) -> EMAOptimizer | None:
    """The EMA attached to ``optimizer``, if one is."""
    ema = _attached.get(id(optimizer))
    return ema if ema is not None and ema.optimizer is optimizer else None


class EMAOptimizer(EMAFrontEnd, torch.optim.Optimizer):
    """Wraps ``optimizer``; every ``step()`` also updates an exponential moving
    average of the parameters: ``s <- s + m_t * (p - s)`` every ``interval`` steps.

    It shares ``param_groups``, ``state`` and ``defaults`` with the wrapped
    optimizer, so LR schedulers, ``GradScaler`` and gradient clipping take it
    as they are. ``with opt.swap_ema():`` puts the EMA into the model.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        momentum: float | Schedule | dict[str, float | Schedule] | None = None,
        *,
        decay: float | dict[str, float] | None = None,
        interval: int = 1,
        model: nn.Module | None = None,
        update_buffers: bool = False,
        shadow_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str = "auto",
        skip_nonfinite: bool = False,
        capturable: bool = False,
        overlap: bool = False,
    ) -> None:
        if isinstance(optimizer, EMAOptimizer):
            raise TypeError("optimizer is already an EMAOptimizer; wrap the base optimizer once")
        refuse_wrapped(optimizer)  # a framework's optimizer wrapper: the error says where the EMA goes instead
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if attached_ema(optimizer) is not None:
            raise ValueError(f"{type(optimizer).__name__} already has an EMA attached; use that one, or detach() it first")
        self.optimizer = optimizer
        self._init_hooks()
        self.core = EMA(optimizer, momentum, decay=decay, interval=interval, model=model,
                        update_buffers=update_buffers, shadow_dtype=shadow_dtype, device=device, backend=backend,
                        skip_nonfinite=skip_nonfinite, capturable=capturable, overlap=overlap)
        self.hooks: Hooks | None = None  # attach(): the hooks on the wrapped optimizer

    # The wrapped optimizer's containers, shared (not copied): whatever
    # replaces them there (load_state_dict does) is seen here too.
    param_groups = property(lambda self: self.optimizer.param_groups,
                            lambda self, value: setattr(self.optimizer, "param_groups", value))
    state = property(lambda self: self.optimizer.state, lambda self, value: setattr(self.optimizer, "state", value))
    defaults = property(lambda self: self.optimizer.defaults,
                        lambda self, value: setattr(self.optimizer, "defaults", value))

    @property
    def attached(self) -> bool:
        """Whether this EMA runs from the wrapped optimizer's own hooks (made by :func:`attach`)."""
        return self.hooks is not None

    def run_from(self, hooks: Hooks) -> None:
        """From now on the EMA runs from ``hooks`` on the wrapped optimizer (what :func:`attach` does)."""
        self.hooks = hooks
        _attached[id(self.optimizer)] = self

    def detach(self) -> None:
        """Remove the hooks :func:`attach` put on the optimizer: it steps and saves
        without the EMA from then on. The EMA is kept, and this object goes on as a
        wrapper (its own ``step()`` updates it)."""
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None
            if _attached.get(id(self.optimizer)) is self:
                del _attached[id(self.optimizer)]

    def __repr__(self) -> str:
        return (f"EMAOptimizer({self.optimizer!r},\n  momentum={self.schedule!r}, interval={self.interval}, "
                f"update_buffers={self.update_buffers}, step={self.core.counted_steps})")

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and pickle: everything, the wrapped optimizer and
        the EMA included; hooks are dropped, as ``torch.optim.Optimizer`` drops them."""
        self.core.refuse_while_swapped("copying or pickling the optimizer")
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}
        state["hooks"] = None  # the copied optimizer has no hooks: a copy of an attached EMA is a wrapper
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()

    def _init_hooks(self) -> None:
        # Optimizer.__init__ is not called (it would rebuild param_groups); set up its hooks.
        self._optimizer_step_pre_hooks: dict = OrderedDict()
        self._optimizer_step_post_hooks: dict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict = OrderedDict()

    # --- optimizer interface ----------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The wrapped optimizer's step, then the EMA update. Step hooks registered on this
        object run around it, as on any optimizer; a profiler sees it as a range of its own."""
        args, kwargs = (() if closure is None else (closure,)), {}
        # torch wraps optimizer steps to do this; here a profiler range is opened only while
        # one records: the wrapped optimizer's step, wrapped itself, runs the global hooks.
        with record_function("Optimizer.step#EMAOptimizer.step") if profiler_enabled() else nullcontext():
            for pre_hook in list(self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    args, kwargs = result
            loss = self._step_and_update(*args, **kwargs)
            for post_hook in list(self._optimizer_step_post_hooks.values()):
                post_hook(self, args, kwargs)
        return loss

    def _step_and_update(self, closure: Callable[[], Any] | None = None) -> Any:
        if self.hooks is not None:  # the wrapped optimizer's own hooks update the EMA, once
            return self.optimizer.step() if closure is None else self.optimizer.step(closure)
        core = self.core
        update = core.before_step()
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        core.after_step(update)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; its shadows start as copies of its params."""
        self.core.add_params(lambda: self.optimizer.add_param_group(param_group), self.param_groups.pop)

    # --- checkpoints -----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus ``"ema"``. The shadows are
        views of the live EMA (no copy), as optimizer state tensors are, except
        inside ``swap_ema()``, where they are copies of the EMA; shadows of
        DTensor params are DTensors with the params' placements. With ``model=``,
        ``"ema"`` also holds the parameter names, checked on load."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.optimizer.state_dict()
        if not self.attached:  # attached, the wrapped optimizer's own hook adds it
            sd["ema"] = ema_state(self.core)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            sd = post_hook(self, sd) or sd
        return sd

    def load_state_dict(self, state_dict: dict[str, Any], *, match_names: bool = True) -> None:
        """Load a dict from :meth:`state_dict`: everything is checked before anything changes.

        Where both the checkpoint and this wrapper know the parameter names
        (``model=``), they must match; ``match_names=False`` loads by position
        instead, for a deliberate rename (buffers too, in their saved order)."""
        self.core.refuse_while_swapped("load_state_dict()")
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict.copy()) or state_dict
        self._load(state_dict, match_names)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load(self, state_dict: dict[str, Any], match_names: bool) -> None:
        hooks = self.hooks
        if hooks is not None:  # the wrapped optimizer's own hooks check and load "ema"
            hooks.match_names = match_names
            try:
                self.optimizer.load_state_dict(state_dict)
            finally:
                hooks.match_names = True
            return
        checked = check_load(self.core, state_dict, match_names)
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "ema"})
        if checked is None:
            self.core.restart()
        else:
            self.core.load(*checked)
