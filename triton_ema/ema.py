"""The EMA itself, which every front end drives: :class:`EMA`.

An :class:`EMA` owns what an exponential moving average of some tensors is:
the tensors (those of a list of param groups, then the model's floating
buffers when asked) and their names, their shadows (a
:class:`~triton_ema.store.ShadowStore`), the profiles and their schedules, the
step count (on the device with ``capturable=True``), the side stream of
``overlap=True``, the swap state and the EMA modules kept on its storage.

A front end drives it: :class:`~triton_ema.EMAOptimizer` from its ``step()``,
:func:`~triton_ema.attach` from an optimizer's own hooks. Around each step of
whatever changes the tensors it calls :meth:`EMA.before_step` (everything that
can fail, before a weight changes) and :meth:`EMA.after_step` (the update and
the step count, after a completed step). The param groups need not belong to a
torch optimizer: any object with a ``param_groups`` list, or the list itself,
read anew at every step so that groups added to it are noticed. Swaps, EMA
modules, checkpoints and migration (:mod:`.swap`, :mod:`.module`,
:mod:`.checkpoint`, :mod:`.migrate`) work on its public names.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .arguments import check_arguments, param_names
from .clock import DeviceClock
from .eager import call_untraced
from .overlap import SideStream, side_stream
from .schedules import Schedule, momentum_at
from .store import ShadowStore
from .tracking import Tracking

__all__ = ["EMA"]

Update = tuple[list[float] | Tensor, Tensor | None]  # a step's momenta (one per profile) and a device flag that cancels it


class ModuleLink(Protocol):
    """What keeps an EMA module on the shadows (:class:`~triton_ema.module.EMAModuleLink`)."""

    def alive(self) -> nn.Module | None: ...

    def follow(self, *, strict: bool) -> None: ...


class EMA:
    """The EMA of the tensors in ``param_groups`` (an object with a ``param_groups``
    list, as a torch optimizer has, or a list of dicts with ``"params"``), read at
    every step. The other arguments are :class:`~triton_ema.EMAOptimizer`'s.

    Index ``i`` (``0 <= i < len(names)``) names one averaged tensor everywhere:
    the params of the groups in order, then the buffers. Profile ``k`` is the
    k-th entry of ``schedules``."""

    def __init__(
        self,
        param_groups: Any,
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
        groups = param_groups if isinstance(param_groups, list) else getattr(param_groups, "param_groups", None)
        if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g for g in groups):
            raise TypeError("param_groups must be a list of dicts with 'params', or an object with one as its "
                            f"param_groups (a torch optimizer), got {type(param_groups).__name__}")
        self.source = param_groups
        schedules, device = check_arguments(self.param_groups, momentum, decay, interval, model, update_buffers,
                                            shadow_dtype, device, backend)
        self.schedules = schedules  # the EMA profiles by name; {None: schedule} for one unnamed profile
        self.schedule = schedules[None] if None in schedules else dict(schedules)
        self.run_id = uuid.uuid4().hex  # tells this run's post-hoc snapshots from another's
        self.interval = int(interval)
        self.model = model
        self.update_buffers = update_buffers
        self.skip_nonfinite = bool(skip_nonfinite)
        self.tracking = Tracking(model, update_buffers)
        tensors, names = self.tracking.track(self.param_groups)
        self.store = ShadowStore(tensors, names, shadow_dtype=shadow_dtype, device=device, backend=backend,
                                 profiles=len(schedules))
        self._step = 0
        self.clock = self._device_clock() if capturable else None  # capturable=True: the step count on the device
        self.overlap = bool(overlap)
        self.side_stream = self._side_stream()
        self.module_links: dict[int, ModuleLink] = {}  # per profile, what keeps its EMA module on the shadows

    @property
    def param_groups(self) -> list[dict]:
        """The groups whose params are averaged, as the source holds them now."""
        source = self.source
        return source if isinstance(source, list) else source.param_groups

    @property
    def names(self) -> list[str]:
        """Every averaged tensor's name: the params', then the buffers'."""
        return self.store.names

    @property
    def num_params(self) -> int:
        """How many of the averaged tensors are params (the rest are buffers)."""
        return self.tracking.num_params

    def param_names(self) -> list[str]:
        """Each param's name in the model, or its place in the groups, as the groups are now."""
        return param_names(self.param_groups, self.model)

    @property
    def num_steps(self) -> int:
        """Steps completed so far (the next step has t = num_steps); with
        ``capturable=True`` read from the device counter (it waits for the device)."""
        return self._step if self.clock is None else self.clock.read()

    @property
    def counted_steps(self) -> int:
        """Steps counted on the host (a replayed CUDA graph counts on the device only)."""
        return self._step

    @property
    def capturable(self) -> bool:
        return self.clock is not None

    @property
    def swapped(self) -> bool:
        """Whether a swap is active: the tensors hold an EMA."""
        return self.store.swapped

    def devices(self) -> set[torch.device]:
        """Where the averaged tensors and their shadows are."""
        return {t.device for b in self.store.buckets for t in (b.shadows, b.tensors[0])}

    def _side_stream(self) -> SideStream | None:
        """``overlap=True``: the side stream the update runs on, or None (CPU buckets: nothing to overlap)."""
        side = side_stream(self.devices()) if self.overlap else None
        self.store.keep_alive(side is not None)
        return side

    def _device_clock(self) -> DeviceClock:
        devices = self.devices()
        if len(devices) > 1:
            raise ValueError(f"capturable=True needs the params and their shadows on one device, got {sorted(map(str, devices))}")
        device = devices.pop() if devices else torch.device("cpu")
        clock = DeviceClock(list(self.schedules.values()), self.interval, device)
        if self.skip_nonfinite:  # counted in place from the start: a captured step adds to this tensor
            self.store.skips.setdefault(device, torch.zeros((), dtype=torch.int64, device=device))
        return clock

    def wait_update(self) -> None:
        """``overlap=True``: the current stream waits for the update in flight (the host does not)."""
        if self.side_stream is not None:
            self.side_stream.wait()

    @property
    def skipped_updates(self) -> int:
        """With ``skip_nonfinite=True``: bucket updates skipped because their
        params held NaN or Inf (reading it waits for the device)."""
        self.wait_update()
        return self.store.skipped()

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and pickle: EMA modules follow the original, and a CUDA
        stream does not pickle (the copy makes its own)."""
        self.refuse_while_swapped("copying or pickling the EMA")
        return {**self.__dict__, "module_links": {}, "side_stream": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.side_stream = self._side_stream()

    # --- what is averaged -------------------------------------------------

    def sync(self) -> None:
        """Before the tensors or shadows are read or written: :meth:`adopt_new_params`, then
        :meth:`follow_storage`."""
        self.adopt_new_params()
        self.follow_storage()

    def follow_storage(self) -> None:
        """Follow buffers that ``module.to()`` replaced, shards that moved, and storage that moved."""
        self.tracking.follow(self.store)

    def adopt_new_params(self) -> None:
        """Params added to the groups (``opt.optimizer.add_param_group``) are noticed at
        the next step, swap or checkpoint: their shadows start as copies of their current
        values (removed ones are dropped). Waits for an update in flight first."""
        self.wait_update()  # every way to the params and shadows passes here first
        if self.tracking.params_changed(self.param_groups):
            self.refuse_while_swapped("adding parameters to the wrapped optimizer")
            self.track_params()

    def track_params(self) -> None:
        """Lay out shadows for the groups' params as they are now, keeping the EMA of those already tracked."""
        tensors, names = self.tracking.track(self.param_groups)
        kept = {id(t): self.store.shadow_views(i) for i, t in enumerate(self.store.tensors)}
        with torch.no_grad():
            self.store.rebuild(tensors, names, [kept.get(id(t)) for t in tensors])

    def add_params(self, add: Callable[[], object], remove: Callable[[], object]) -> None:
        """``add()`` puts params into the groups (``add_param_group``); their shadows start
        as copies of them. Refused (``remove()`` takes them out again, the EMA stays as
        it was) if they cannot be averaged."""
        self.refuse_while_swapped("add_param_group()")
        self.wait_update()
        add()
        try:
            self.track_params()
        except BaseException:
            remove()
            self.tracking.track(self.param_groups)
            raise

    def refuse_while_swapped(self, what: str) -> None:
        """An error naming ``what`` while a swap is active."""
        if self.store.swapped:
            raise RuntimeError(f"{what} inside swap_ema() is not allowed; leave the with-block first")

    def profile(self, name: str | None) -> int:
        """The index of profile ``name``; None names the only profile."""
        names = list(self.schedules)
        if name is None and len(names) > 1:
            raise ValueError(f"this EMA has several profiles {names}: name the one you want")
        if name is None or name in names:
            return 0 if name is None else names.index(name)
        if names == [None]:
            raise ValueError(f"no EMA profile named {name!r}: this EMA has one unnamed profile (call without a name)")
        raise ValueError(f"no EMA profile named {name!r}; the profiles are {names}")

    # --- a step -------------------------------------------------------------

    def before_step(self) -> Update | None:
        """Everything that can fail, before the step touches a weight: this step's
        update (the momenta, and a device flag that cancels it) or None."""
        if self.store.swapped:
            raise RuntimeError("step() inside swap_ema(): the model holds the EMA weights; leave the with-block first")
        t = self._step
        self.adopt_new_params()
        if self.clock is not None:
            return self.clock.momenta()
        return ([momentum_at(s, t) for s in self.schedules.values()], None) if t % self.interval == 0 else None

    def after_step(self, update: Update | None) -> None:
        """After a completed step: the update :meth:`before_step` gave (never traced by
        ``torch.compile``), and the step count."""
        if update is not None:
            call_untraced(type(self).update, self, *update)
        self._step += 1
        if self.clock is not None:
            self.clock.advance()

    @torch.no_grad()
    def update(self, momenta: list[float] | Tensor, skip: Tensor | None = None) -> None:
        """Every profile k moves by ``momenta[k]``, where the device flag ``skip`` is not
        set; storage that moved is followed first, and EMA modules after."""
        self.follow_storage()  # new params were adopted (and an update in flight waited for) before the base step
        if self.side_stream is None:
            self.store.update(momenta, self.skip_nonfinite, skip)
        else:
            self.side_stream.run(lambda: self.store.update(momenta, self.skip_nonfinite, skip),
                                 (momenta if isinstance(momenta, Tensor) else None, skip))
        for profile, link in list(self.module_links.items()):
            if link.alive() is None:
                del self.module_links[profile]
            else:
                link.follow(strict=False)

    # --- swaps --------------------------------------------------------------

    def swap_in(self, profile: int) -> None:
        """Profile ``profile``'s EMA into the tensors, the training values kept aside
        (call :meth:`sync` first). Nesting is an error."""
        if self.store.swapped:
            raise RuntimeError("swap_ema() is already active; nesting it would put training weights in the model")
        self.store.swap_in(profile)

    def swap_out(self) -> list[int]:
        """Undo :meth:`swap_in`: the training values back in the tensors as the model holds
        them now. Returns the indices of the tensors moved to another dtype, device or
        layout meanwhile: their training values are back too, their EMA kept its values
        from before the move."""
        moved = self.store.swap_out(self.tracking.current())
        if moved:
            self.tracking.put_back(moved, self.store)
        return list(moved)

    # --- loads ----------------------------------------------------------------

    def load(self, step: int, skipped: int, values: list[list[Tensor]], run: str | None = None) -> None:
        """Set the state, checked already (:func:`~triton_ema.checkpoint.check_ema`): the
        step count, the skip count, ``values[k][i]`` for profile k's shadow of tensor i
        (this rank's), and the run id."""
        with torch.no_grad():
            self.sync()
            self.store.load(values, skipped)
        self._step = step
        if self.clock is not None:
            self.clock.set(step)
        self.run_id = run or self.run_id

    def restart(self) -> None:
        """Every shadow becomes a copy of its tensor's current value (the step count stays)."""
        with torch.no_grad():
            self.sync()
            self.store.reset()
