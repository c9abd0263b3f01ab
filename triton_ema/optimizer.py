"""EMAOptimizer: an EMA of the weights, kept inside any optimizer's ``step()``."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from numbers import Integral
from typing import Any

import torch
from torch import Tensor, nn
from torch._C._autograd import _profiler_enabled as profiler_enabled
from torch.autograd.profiler import record_function
from torch.utils.hooks import RemovableHandle

from . import migrate, sharding
from .arguments import check_arguments, param_names
from .checkpoint import Checked, EMACheckpoint, check_load, ema_state, model_keyed
from .clock import DeviceClock
from .eager import call_untraced
from .module import EMAModuleLink, ema_module
from .overlap import side_stream
from .schedules import Schedule, momentum_at
from .store import ShadowStore
from .swap import SwapContext
from .tracking import Tracking

__all__ = ["EMAOptimizer"]

class EMAOptimizer(torch.optim.Optimizer):
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
        schedules, device = check_arguments(optimizer, momentum, decay, interval, model, update_buffers, shadow_dtype,
                                            device, backend)

        self.optimizer = optimizer
        self.schedules = schedules  # the EMA profiles by name; {None: schedule} for one unnamed profile
        self.schedule = schedules[None] if None in schedules else dict(schedules)
        self.run_id = uuid.uuid4().hex  # tells this run's post-hoc snapshots from another's
        self.interval = int(interval)
        self.model = model
        self.update_buffers = update_buffers
        self.skip_nonfinite = bool(skip_nonfinite)
        self._init_hooks()

        self._tracking = Tracking(model, update_buffers)
        tensors, names = self._tracking.track(self.param_groups)
        self._store = ShadowStore(tensors, names, shadow_dtype=shadow_dtype, device=device, backend=backend,
                                  profiles=len(schedules))
        self._step = 0
        self._clock = self._device_clock() if capturable else None
        self.overlap = bool(overlap)
        self._side = self._side_stream()
        self._hooks: list[RemovableHandle] = []  # attach(): handles of the hooks on the wrapped optimizer
        self._match_names = True  # attached: load_state_dict's match_names, for the load hooks
        self._module_links: dict[int, EMAModuleLink] = {}  # ema_module(): per profile, the module kept on the EMA

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
        return bool(self._hooks)

    def detach(self) -> None:
        """Remove the hooks :func:`attach` put on the optimizer: it steps and saves
        without the EMA from then on. The EMA is kept, and this object goes on as a
        wrapper (its own ``step()`` updates it)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @property
    def num_steps(self) -> int:
        """Optimizer steps completed so far (the next step has t = num_steps); with
        ``capturable=True`` read from the device counter (it waits for the device)."""
        return self._step if self._clock is None else self._clock.read()

    @property
    def capturable(self) -> bool:
        return self._clock is not None

    def _devices(self) -> set[torch.device]:
        """Where the averaged tensors and their shadows are."""
        return {t.device for b in self._store.buckets for t in (b.shadows, b.tensors[0])}

    def _side_stream(self):
        """``overlap=True``: the side stream the update runs on, or None (CPU buckets: nothing to overlap)."""
        side = side_stream(self._devices()) if self.overlap else None
        self._store.keep_alive(side is not None)
        return side

    def _wait_update(self) -> None:
        """``overlap=True``: the current stream waits for the update in flight (the host does not)."""
        if self._side is not None:
            self._side.wait()

    def _device_clock(self) -> DeviceClock:
        devices = self._devices()
        if len(devices) > 1:
            raise ValueError(f"capturable=True needs the params and their shadows on one device, got {sorted(map(str, devices))}")
        device = devices.pop() if devices else torch.device("cpu")
        clock = DeviceClock(list(self.schedules.values()), self.interval, device)
        if self.skip_nonfinite:  # counted in place from the start: a captured step adds to this tensor
            self._store.skips.setdefault(device, torch.zeros((), dtype=torch.int64, device=device))
        return clock

    @property
    def skipped_updates(self) -> int:
        """With ``skip_nonfinite=True``: bucket updates skipped because their
        params held NaN or Inf (reading it waits for the device)."""
        self._wait_update()
        return self._store.skipped()

    def __repr__(self) -> str:
        return (f"EMAOptimizer({self.optimizer!r},\n  momentum={self.schedule!r}, interval={self.interval}, "
                f"update_buffers={self.update_buffers}, step={self._step})")

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and pickle: everything, the wrapped optimizer and
        the EMA included; hooks are dropped, as ``torch.optim.Optimizer`` drops them."""
        self._refuse_while_swapped("copying or pickling the optimizer")
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}
        state["_hooks"] = []  # the copied optimizer has no hooks: a copy of an attached EMA is a wrapper
        state["_module_links"] = {}  # EMA modules follow the original
        state["_side"] = None  # a CUDA stream does not pickle: the copy makes its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()
        self._side = self._side_stream()

    def _init_hooks(self) -> None:
        # Optimizer.__init__ is not called (it would rebuild param_groups); set up its hooks.
        self._optimizer_step_pre_hooks: dict = OrderedDict()
        self._optimizer_step_post_hooks: dict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict = OrderedDict()

    # --- what is averaged -------------------------------------------------

    def _param_names(self) -> list[str]:
        return param_names(self.param_groups, self.model)

    def _sync(self) -> None:
        """Follow params added behind the wrapper's back, then :meth:`_follow_storage`."""
        self._adopt_new_params()
        self._follow_storage()

    def _follow_storage(self) -> None:
        """Follow buffers that ``module.to()`` replaced, shards that moved, and storage that moved."""
        self._tracking.follow(self._store)

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
        if self.attached:  # the wrapped optimizer's own hooks update the EMA, once
            return self.optimizer.step() if closure is None else self.optimizer.step(closure)
        momentum = self._before_step()
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self._after_step(momentum)
        return loss

    def _before_step(self) -> tuple[list[float] | Tensor, Tensor | None] | None:
        """Everything that can fail, before the base step touches a weight: this step's
        update (the momenta, and a device flag that cancels it) or None."""
        if self._store.swapped:
            raise RuntimeError("step() inside swap_ema(): the model holds the EMA weights; leave the with-block first")
        t = self._step
        self._adopt_new_params()
        if self._clock is not None:
            return self._clock.momenta()
        return ([momentum_at(s, t) for s in self.schedules.values()], None) if t % self.interval == 0 else None

    def _after_step(self, update: tuple[list[float] | Tensor, Tensor | None] | None) -> None:
        """After a completed base step: the update, and the step count."""
        if update is not None:
            call_untraced(type(self)._update_ema, self, *update)
        self._step += 1
        if self._clock is not None:
            self._clock.advance()

    @torch.no_grad()
    def _update_ema(self, momenta: list[float] | Tensor, skip: Tensor | None = None) -> None:
        self._follow_storage()  # new params were adopted (and an update in flight waited for) before the base step
        if self._side is None:
            self._store.update(momenta, self.skip_nonfinite, skip)
        else:
            self._side.run(lambda: self._store.update(momenta, self.skip_nonfinite, skip),
                           (momenta if isinstance(momenta, Tensor) else None, skip))
        for profile, link in list(self._module_links.items()):
            if link.alive() is None:
                del self._module_links[profile]
            else:
                link.follow(strict=False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; its shadows start as copies of its params."""
        self._refuse_while_swapped("add_param_group()")
        self.optimizer.add_param_group(param_group)
        try:
            self._track_params()
        except BaseException:  # refused: the optimizer and the EMA stay as they were
            self.param_groups.pop()
            self._tracking.track(self.param_groups)
            raise

    def _adopt_new_params(self) -> None:
        """Params added to the wrapped optimizer itself (``opt.optimizer.add_param_group``)
        are noticed at the next step, swap or checkpoint: their shadows start as
        copies of their current values (removed ones are dropped)."""
        self._wait_update()  # every way to the params and shadows passes here first
        if self._tracking.params_changed(self.param_groups):
            self._refuse_while_swapped("adding parameters to the wrapped optimizer")
            self._track_params()

    def _track_params(self) -> None:
        """Lay out shadows for the optimizer's params as they are now, keeping the EMA of those already tracked."""
        tensors, names = self._tracking.track(self.param_groups)
        kept = {id(t): self._store.shadow_views(i) for i, t in enumerate(self._store.tensors)}
        with torch.no_grad():
            self._store.rebuild(tensors, names, [kept.get(id(t)) for t in tensors])

    def _refuse_while_swapped(self, what: str) -> None:
        if self._store.swapped:
            raise RuntimeError(f"{what} inside swap_ema() is not allowed; leave the with-block first")

    # --- EMA weights --------------------------------------------------------

    def _profile(self, name: str | None) -> int:
        """The index of profile ``name``; None names the only profile."""
        names = list(self.schedules)
        if name is None and len(names) > 1:
            raise ValueError(f"this EMA has several profiles {names}: name the one you want")
        if name is None or name in names:
            return 0 if name is None else names.index(name)
        if names == [None]:
            raise ValueError(f"no EMA profile named {name!r}: this EMA has one unnamed profile (call without a name)")
        raise ValueError(f"no EMA profile named {name!r}; the profiles are {names}")

    def swap_ema(self, name: str | None = None) -> SwapContext:
        """``with opt.swap_ema():`` the model holds the EMA weights (of profile
        ``name``, needed with several); on exit, also by an exception, the
        training weights are back, bitwise.

        Inside the block the averaged parameters are the EMA: what the block
        writes to them becomes the EMA (elements it leaves alone keep their
        exact shadow values, for every dtype pair). Averaged buffers are put back
        on exit if the block changed them (a forward in train mode), with a
        warning. If the block moves the model to another dtype or device, the
        training weights still come back (into the moved tensors), the EMA keeps
        its values from before the move, and the exit raises an error."""
        return SwapContext(self, self._profile(name))

    def ema_module(self, name: str | None = None) -> nn.Module:
        """The EMA (of profile ``name``, needed with several) as a module with the
        model's structure, whose averaged parameters and buffers are the EMA storage
        itself: no copy, the current EMA after every ``step()`` (the same object keeps
        following; calling this again returns it), ``requires_grad=False``, the
        training model untouched. Needs ``model=``. See :mod:`triton_ema.module` for
        dtypes, buffers and what it refuses (inside ``swap_ema()``, DTensor params)."""
        profile = self._profile(name)
        if self.model is None:
            raise RuntimeError("ema_module() needs the model: pass model= to EMAOptimizer")
        self._refuse_while_swapped("ema_module()")
        link = self._module_links.get(profile)
        module = None if link is None else link.alive()
        if module is None:
            with torch.no_grad():
                self._sync()
            module, self._module_links[profile] = ema_module(self, profile)
        return module

    def ema_state_dict(self, name: str | None = None, *, full: bool = False) -> dict[str, Tensor]:
        """``model.state_dict()`` with EMA values (of profile ``name``, needed with
        several) for every averaged tensor, in the model's dtypes; entries not
        averaged keep the model's values. Every value is a copy: it keeps what it
        held when this was called.

        Sharded (DTensor) entries stay DTensors, as ``set_model_state_dict``
        takes them; ``full=True`` gathers them into whole tensors for export
        (a collective: every rank must call it)."""
        out = {}
        for key, value, ema in model_keyed(self, name, "ema_state_dict()"):
            local = sharding.local(value) if ema is None else ema
            copy = sharding.like(local.detach().to(value.dtype, copy=True), value)
            out[key] = sharding.full(copy) if full else copy
        return out

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
            sd["ema"] = ema_state(self)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            sd = post_hook(self, sd) or sd
        return sd

    def load_ema_state_dict(self, state_dict: dict[str, Tensor], *, num_steps: int) -> None:
        """Start the EMA from weights averaged elsewhere: a dict keyed like
        ``model.state_dict()`` (see :mod:`triton_ema.migrate` for other libraries'
        formats), after ``num_steps`` optimizer steps, from which the schedule
        continues; with several profiles, every profile starts from these weights.
        Needs ``model=``. Everything is checked before anything changes."""
        self._refuse_while_swapped("load_ema_state_dict()")
        if isinstance(num_steps, bool) or not isinstance(num_steps, Integral) or num_steps < 0:
            raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
        values = migrate.checked_values(self, state_dict)
        self._load_ema(int(num_steps), self._store.skipped(), [values] * len(self.schedules))

    @property
    def ema_checkpoint(self) -> EMACheckpoint:
        """The ``"ema"`` part of :meth:`state_dict` as a ``torch.distributed.checkpoint``
        ``Stateful``: put it in the dict given to ``dcp.save``/``dcp.load``
        beside the model and the wrapped optimizer's state."""
        return EMACheckpoint(self)

    def load_state_dict(self, state_dict: dict[str, Any], *, match_names: bool = True) -> None:
        """Load a dict from :meth:`state_dict`: everything is checked before anything changes.

        Where both the checkpoint and this wrapper know the parameter names
        (``model=``), they must match; ``match_names=False`` loads by position
        instead, for a deliberate rename (buffers too, in their saved order)."""
        self._refuse_while_swapped("load_state_dict()")
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict.copy()) or state_dict
        self._load(state_dict, match_names)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load(self, state_dict: dict[str, Any], match_names: bool) -> None:
        if self.attached:  # the wrapped optimizer's own hooks check and load "ema"
            self._match_names = match_names
            try:
                self.optimizer.load_state_dict(state_dict)
            finally:
                self._match_names = True
            return
        checked = check_load(self, state_dict, match_names)
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "ema"})
        self._apply_load(checked)

    def _apply_load(self, checked: Checked | None) -> None:
        """After the base optimizer loaded: the checked EMA, or a restart from the current weights."""
        if checked is not None:
            self._load_ema(*checked)
            return
        with torch.no_grad():
            self._sync()
            self._store.reset()

    def _load_ema(self, step: int, skipped: int, values: list[list[Tensor]], run: str | None = None) -> None:
        with torch.no_grad():
            self._sync()
            self._store.load(values, skipped)
        self._step = step
        if self._clock is not None:
            self._clock.set(step)
        self.run_id = run or self.run_id
