"""mmengine: a hook that keeps the EMA of the runner's optimizer, in place of mmengine's ``EMAHook``.

    custom_imports = dict(imports=["triton_ema.integrations.mmengine"])
    custom_hooks = [dict(type="TritonEMAHook", momentum=2e-4)]   # was dict(type="EMAHook", momentum=2e-4)

It takes ``EMAHook``'s arguments (``ema_type`` ExponentialMovingAverage,
MomentumAnnealingEMA or CosineEMA, ``momentum``, ``gamma``, ``end_momentum``,
``interval``, ``update_buffers``, ``begin_iter``, ``begin_epoch``,
``strict_load``) and behaves the same: validation and test on the EMA
weights, and checkpoints laid out as ``EMAHook``'s (the EMA weights in
``state_dict``, the training weights in ``ema_state_dict``), so either hook
loads the other's. The EMA is attached (``triton_ema.attach``) to the
optimizer of the runner's ``OptimWrapper``: it updates inside its ``step()``
and its exact state rides in the checkpoint's ``optimizer`` entry.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper, OptimWrapperDict
from mmengine.registry import HOOKS

from ..hooks import attach
from ..optimizer import EMAOptimizer
from ..schedules import Constant, CopyUntil, Cosine, MomentumAnnealing, Schedule

__all__ = ["TritonEMAHook"]

EMA_TYPES = ("ExponentialMovingAverage", "MomentumAnnealingEMA", "CosineEMA")


@HOOKS.register_module()
class TritonEMAHook(Hook):
    """mmengine's ``EMAHook`` on triton-ema, registered in mmengine's ``HOOKS``.

    The EMA is attached (:func:`~triton_ema.attach`) to the optimizer of the
    runner's ``OptimWrapper``. Validation and test epochs run on the EMA
    weights. Checkpoints have ``EMAHook``'s layout (``state_dict`` holds the EMA
    weights, ``ema_state_dict`` the training weights) and the exact EMA is in
    ``optimizer["ema"]``; a checkpoint of mmengine's own ``EMAHook`` resumes too.
    mmengine copies the weights until its first update and counts its steps from
    there: ``CopyUntil(schedule, max(begin_iter - 1, 0))``.

    Args:
        ema_type: ``"ExponentialMovingAverage"`` (a :class:`~triton_ema.schedules.Constant`
            momentum), ``"MomentumAnnealingEMA"``
            (:class:`~triton_ema.schedules.MomentumAnnealing` with ``gamma``) or
            mmpretrain's ``"CosineEMA"`` (:class:`~triton_ema.schedules.Cosine` to
            ``end_momentum`` over the run's ``max_iters``).
        strict_load: Loading a checkpoint of ``EMAHook`` that misses EMA entries
            is an error; else they start from the checkpoint's weights.
        begin_iter: The first iteration that updates (the weights are copied
            until then), an integer >= 0.
        begin_epoch: The same in epochs; not with ``begin_iter``.
        momentum: The momentum; None: 0.004 for ``CosineEMA``, 2e-4 otherwise.
        gamma: ``MomentumAnnealingEMA``'s time scale.
        end_momentum: ``CosineEMA``'s final momentum.
        interval: Update every ``interval`` optimizer steps; with
            ``interval > 1``, ``begin_iter - 1`` (or the first iteration of
            ``begin_epoch``) must be a multiple of it.
        update_buffers: Also average the model's floating-point buffers.
        **ema_kwargs: :class:`~triton_ema.EMAOptimizer`'s ``shadow_dtype``,
            ``device``, ``backend``, ``skip_nonfinite``; not ``model``.

    Attributes:
        ema: The EMA (an attached :class:`~triton_ema.EMAOptimizer`) once the
            run has an optimizer, else None.

    Raises:
        ValueError: An unknown ``ema_type``; a negative ``begin_iter`` or
            ``begin_epoch``, or both given; a start that is not a multiple of
            ``interval``, or beyond the run.
        TypeError: ``model=`` given; an ``OptimWrapperDict`` (several optimizers).
    """

    priority = "NORMAL"  # as EMAHook: before CheckpointHook, which must see the swapped state dict

    def __init__(self, ema_type: str = "ExponentialMovingAverage", strict_load: bool = False, begin_iter: int = 0,
                 begin_epoch: int = 0, *, momentum: float | None = None, gamma: float = 100,
                 end_momentum: float = 0.0, interval: int = 1, update_buffers: bool = False, **ema_kwargs: Any) -> None:
        if ema_type not in EMA_TYPES:
            raise ValueError(f"ema_type must be one of {EMA_TYPES}, got {ema_type!r}")
        for name, value in (("begin_iter", begin_iter), ("begin_epoch", begin_epoch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if begin_iter and begin_epoch:
            raise ValueError("begin_iter and begin_epoch cannot both be set")
        if "model" in ema_kwargs:
            raise TypeError("TritonEMAHook takes no model=: the EMA is of the runner's model")
        self.ema_type, self.strict_load = ema_type, strict_load
        self.begin_iter, self.begin_epoch = begin_iter, begin_epoch
        self.momentum = (0.004 if ema_type == "CosineEMA" else 2e-4) if momentum is None else momentum
        self.gamma, self.end_momentum, self.interval = gamma, end_momentum, interval
        self.update_buffers, self.ema_kwargs = update_buffers, ema_kwargs
        self.ema: EMAOptimizer | None = None
        self._resumed = False
        self._swapped = contextlib.ExitStack()

    def _schedule(self, runner) -> Schedule:
        """The momentum at optimizer step t: mmengine copies the weights up to its first update and counts
        its steps from there."""
        schedule: Schedule
        if self.ema_type == "ExponentialMovingAverage":
            schedule = Constant(self.momentum)
        elif self.ema_type == "MomentumAnnealingEMA":
            schedule = MomentumAnnealing(self.momentum, self.gamma)
        else:  # mmpretrain's CosineEMA, over the run's max_iters
            schedule = Cosine(self.momentum, self.end_momentum, total_steps=runner.max_iters)
        if self.begin_epoch:
            start = (self.begin_epoch - 1) * len(runner.train_dataloader)
        else:
            start = max(self.begin_iter - 1, 0)
        if start % self.interval:
            raise ValueError(f"TritonEMAHook(interval={self.interval}) starts at iteration {start} (begin_iter / "
                             "begin_epoch), which must be a multiple of interval: mmengine counts the interval from "
                             "there, this EMA from the first step")
        return CopyUntil(schedule, start)

    def before_run(self, runner) -> None:
        # Training builds the optim wrapper before this hook and loads checkpoints after it. Testing or
        # validating alone builds none: the checkpoint's state_dict holds the EMA weights, as with EMAHook.
        wrapper = runner.optim_wrapper
        if isinstance(wrapper, OptimWrapperDict):
            raise TypeError("TritonEMAHook keeps the EMA of one optimizer; the runner has an OptimWrapperDict")
        if not isinstance(wrapper, OptimWrapper):
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self.ema = attach(wrapper.optimizer, self._schedule(runner), interval=self.interval, model=model,
                          update_buffers=self.update_buffers, **self.ema_kwargs)

    def before_train(self, runner) -> None:
        if self.begin_epoch > runner.max_epochs or self.begin_iter > runner.max_iters:
            raise ValueError(f"TritonEMAHook: begin_epoch={self.begin_epoch} / begin_iter={self.begin_iter} lies "
                             f"beyond the run (max_epochs={runner.max_epochs}, max_iters={runner.max_iters})")
        assert self.ema is not None, "training builds the optim wrapper before before_run, which attaches the EMA"
        if not self._resumed:  # the weights were initialised or loaded after the EMA was attached
            self.ema.core.restart()

    def before_val_epoch(self, runner) -> None:
        self._swap_in()

    def after_val_epoch(self, runner, metrics: dict | None = None) -> None:
        self._swapped.close()

    def before_test_epoch(self, runner) -> None:
        self._swap_in()

    def after_test_epoch(self, runner, metrics: dict | None = None) -> None:
        self._swapped.close()

    def _swap_in(self) -> None:
        if self.ema is not None:
            self._swapped.enter_context(self.ema.swap_ema())

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.ema is None:
            return
        # EMAHook's layout: the EMA in state_dict (deployable as it is), the training weights in ema_state_dict.
        model_state = checkpoint["state_dict"]
        ema = {k: v.detach().to(model_state[k].device, copy=True) for k, v in self.ema.ema_state_dict().items()}
        start = self.ema.schedule.step
        steps = torch.tensor(max(self.ema.num_steps - start, 0), dtype=torch.long)
        checkpoint["ema_state_dict"] = {"steps": steps, **{f"module.{k}": model_state[k] for k in ema}}
        model_state.update(ema)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        ema_state = checkpoint.get("ema_state_dict")
        if not runner._resume:  # load_from: the model takes state_dict, the EMA weights of either hook
            return
        if ema_state is not None:  # the training weights back into state_dict, the EMA into ema_state_dict
            model_state = checkpoint["state_dict"]
            for key in ema_state:
                if key.startswith("module."):
                    ema_state[key], model_state[key[7:]] = model_state[key[7:]], ema_state[key]
        if self.ema is None:
            return
        self._resumed = True
        optimizer = checkpoint.get("optimizer")
        if optimizer is not None and "ema" not in optimizer and ema_state is not None:
            optimizer["ema"] = self._from_ema_hook(self.ema, ema_state, checkpoint)  # saved by mmengine's own EMAHook

    def _from_ema_hook(self, ema: EMAOptimizer, ema_state: dict, checkpoint: dict) -> dict:
        """The ``"ema"`` entry of the optimizer's state dict, from an ``EMAHook`` checkpoint's EMA weights."""
        keys = {f"module.{k}" for k in checkpoint["state_dict"]} | {"steps"}
        missing = sorted(keys - ema_state.keys())
        unexpected = sorted(ema_state.keys() - keys)
        if missing or unexpected:
            message = f"ema_state_dict of the checkpoint: missing {missing[:5]}, unexpected {unexpected[:5]}"
            if self.strict_load:
                raise KeyError(message)
            print_log(message + "; the EMA of what is missing starts from the checkpoint's weights", "current")
        entry = ema.ema_checkpoint.state_dict()  # this EMA's layout, dtypes and current values
        names = ema.core.param_names()
        for key in ("shadow", "buffers"):
            for slot, current in entry[key].items():
                name = names[slot] if key == "shadow" else slot
                saved = ema_state.get(f"module.{name}", checkpoint["state_dict"].get(name))
                if saved is not None:
                    entry[key][slot] = saved.to(current.dtype)
        entry["step"] = int(checkpoint["meta"]["iter"])
        return entry
