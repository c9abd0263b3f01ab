"""EMAOptimizer: an EMA of the weights, kept inside any optimizer's ``step()``."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
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

    It is a ``torch.optim.Optimizer`` and shares ``param_groups``, ``state``
    and ``defaults`` with the wrapped optimizer, so LR schedulers,
    ``GradScaler`` (a skipped step updates no EMA and is not counted) and
    gradient clipping take it as they are. ``t`` is the 0-based index of the
    step that has just completed; the shadows start as exact copies of the
    parameters. ``with opt.swap_ema():`` puts the EMA into the model.

    Args:
        optimizer: Any ``torch.optim.Optimizer`` (not an ``EMAOptimizer``, and
            not one with an EMA attached). Its parameters are averaged.
        momentum: The weight of the new parameters in each update: a float in
            ``(0, 1]``, a schedule (a callable ``t -> momentum``, see
            :mod:`triton_ema.schedules`), or a dict ``{name: float or schedule}``
            (any ``Mapping``) of several EMA profiles updated in the same step. A constant above
            0.5 warns (it is nearly always a decay given as a momentum). Give
            exactly one of ``momentum`` and ``decay``.
        decay: The alternative to ``momentum``: ``momentum = 1 - decay``, a float
            in ``[0, 1)`` or a dict (any ``Mapping``) of them.
        interval: Update the EMA every ``interval`` optimizer steps, at
            ``t = 0, interval, 2 * interval, ...``. The momentum is applied as
            given at each update (not raised to the power ``interval``).
        model: The ``nn.Module`` whose parameters the optimizer updates (one
            that shares none is an error). Needed for ``update_buffers``,
            :meth:`ema_state_dict`, :meth:`ema_module` and
            :meth:`load_ema_state_dict`; gives errors and checkpoints parameter
            names. Under DDP pass the inner module (``ddp.module``).
        update_buffers: Also average the model's floating-point buffers
            (BatchNorm statistics); integer buffers are left alone. Needs
            ``model``.
        shadow_dtype: The dtype of the shadows. ``None``: float32 for 16-bit
            parameters, the parameter's dtype otherwise; or one of float16,
            bfloat16, float32, float64.
        device: Where the shadows live. ``None``: each beside its parameter;
            ``"cpu"`` keeps the shadows of GPU parameters on the CPU (each update
            then copies the parameters to the host).
        backend: ``"auto"`` (Triton for CUDA buckets of float32, bfloat16 and
            float16, the torch backend otherwise), ``"triton"`` (refuses a
            bucket it cannot run) or ``"torch"``.
        skip_nonfinite: Skip the update of a bucket whose parameters hold NaN or
            Inf, decided on the device (no host sync); counted in
            :attr:`skipped_updates`. Costs one more read of the parameters per
            update.
        capturable: Keep the step count and the momenta on the device, so that a
            step can be captured in a CUDA graph and replayed with the schedule
            moving on. Every schedule needs a device form (``on_device``); the
            parameters and shadows must be on one device.
        overlap: Run the update on a side CUDA stream, beside the next forward
            and backward; everything that reads the parameters or shadows through
            this object waits for it on the device. A no-op on CPU buckets.

    Attributes:
        optimizer: The wrapped optimizer.
        schedules: The EMA profiles' schedules by name; ``{None: schedule}`` for one.
        schedule: The schedule of the one profile, or a dict of every profile's.
        interval: The EMA is updated every ``interval`` steps.
        model: The module given as ``model=``, or None.
        update_buffers: Whether the model's floating buffers are averaged too.
        skip_nonfinite: Whether a bucket holding NaN or Inf skips its update.
        overlap: Whether the update runs on a side CUDA stream.
        run_id: Tells this run's post-hoc snapshots from another's.

    Raises:
        TypeError: A bad argument type (``optimizer``, ``model``,
            ``shadow_dtype``, a momentum that is not a float or schedule).
        ValueError: A bad value (both or neither of ``momentum`` and ``decay``,
            a momentum outside ``(0, 1]``, ``interval < 1``, ``update_buffers``
            without ``model``, an unknown ``backend``); the message names it.

    Example:
        ```python
        opt = EMAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                           momentum=2e-4, model=model)
        loss.backward(); opt.step(); opt.zero_grad()
        with opt.swap_ema():
            evaluate(model)
        ```
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        momentum: float | Schedule | Mapping[str, float | Schedule] | None = None,
        *,
        decay: float | Mapping[str, float] | None = None,
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
        """Whether this EMA runs from the wrapped optimizer's own hooks (made by :func:`~triton_ema.attach`)."""
        return self.hooks is not None

    def run_from(self, hooks: Hooks) -> None:
        """From now on the EMA runs from ``hooks`` on the wrapped optimizer (what :func:`attach` does)."""
        self.hooks = hooks
        _attached[id(self.optimizer)] = self

    def detach(self) -> None:
        """Remove the hooks :func:`~triton_ema.attach` put on the optimizer.

        The optimizer steps and saves without the EMA from then on. The EMA is
        kept, and this object goes on as a wrapper (its own ``step()`` updates it)."""
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
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    # --- optimizer interface ----------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The wrapped optimizer's step, then the EMA update.

        Step hooks registered on this object run around it (its post-hooks after
        the EMA update), as on any optimizer; a profiler sees it as a range of its
        own. Everything that can fail (a step inside :meth:`swap_ema`, the
        schedule's value) is checked before the base step changes a weight.

        Args:
            closure: Passed to the wrapped optimizer's ``step``.

        Returns:
            What the wrapped optimizer's ``step`` returns (the closure's loss).

        Raises:
            RuntimeError: Called inside :meth:`swap_ema`.
            ValueError: The schedule gave a momentum outside ``[0, 1]`` or NaN
                (naming the step and the value); nothing has changed then.
        """
        args: tuple[Any, ...] = () if closure is None else (closure,)
        kwargs: dict[str, Any] = {}
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
        """The wrapped optimizer's ``zero_grad``.

        Args:
            set_to_none: Set the gradients to ``None`` instead of zeros.
        """
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; its shadows start as copies of its params.

        A refused group leaves the optimizer and the EMA as they were.

        Args:
            param_group: As for ``torch.optim.Optimizer.add_param_group``.

        Raises:
            RuntimeError: Called inside :meth:`swap_ema`.
        """
        self.core.add_params(lambda: self.optimizer.add_param_group(param_group), self.param_groups.pop)

    # --- checkpoints -----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus ``"ema"``.

        The base optimizer's keys stay at the top level. ``"ema"`` holds
        ``step``, ``interval``, ``skipped_updates``, ``shadow`` (parameter-shaped tensors keyed like
        the optimizer's ``state``) and ``buffers`` (keyed by buffer name), or
        ``profiles: {name: {shadow, buffers}}`` with several profiles; with
        ``model=`` also ``names``, checked on load; with a ``PowerFunction``
        profile also ``run``, the identity post-hoc snapshots carry. The shadows
        are views of the live EMA (no copy), as optimizer state tensors are,
        except inside :meth:`swap_ema`, where they are copies of the EMA; shadows
        of DTensor params are DTensors with the params' placements. It loads with
        ``torch.load(weights_only=True)``.

        Returns:
            The state dict.
        """
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

        The step count is restored, so schedules and warm-ups continue where they
        were, and the run continues bitwise as if it had not stopped. A dict from
        a bare optimizer (no ``"ema"``) loads with a warning and the EMA restarts
        from the current weights. Checkpoints without names load by position.

        Args:
            state_dict: A dict from :meth:`state_dict` (or a bare optimizer's).
            match_names: Where both the checkpoint and this wrapper know the
                parameter names (``model=``), they must match; ``False`` loads by
                position instead, for a deliberate rename (buffers too, in their
                saved order).

        Raises:
            RuntimeError: Inside :meth:`swap_ema`.
            TypeError: ``state_dict`` is not a dict.
            ValueError: A wrong shape, dtype, missing or extra entry, other
                parameter names or other profiles (naming the first mismatch); the
                wrapper then stays as it was.
        """
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
