"""Lightning: a ``Callback`` that keeps the EMA of the module's optimizer.

    from triton_ema.integrations.lightning import EMACallback
    trainer = Trainer(callbacks=[EMACallback(momentum=1e-3)])

The EMA is attached to the optimizer Lightning builds (``triton_ema.attach``):
it updates inside that optimizer's ``step()`` and rides in its
``state_dict()``, so Lightning's checkpoints carry it and ``ckpt_path=``
resumes it bitwise. Under ``ModelParallelStrategy`` (FSDP2), whose
distributed checkpoints keep only the optimizer's ``state`` and
``param_groups``, the callback saves each rank's EMA shards beside them and
loads them back. Under ``DeepSpeedStrategy`` the EMA is attached to the
engine the strategy builds (:mod:`triton_ema.integrations.deepspeed`): the
EMA of each rank's fp32 master partition, carried by the engine's
``save_checkpoint`` / ``load_checkpoint``, which the strategy saves and
loads with.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning.pytorch as pl
import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils._pytree import tree_map

from ..arguments import check_momentum
from ..hooks import attach
from ..optimizer import EMAOptimizer
from ..schedules import Schedule
from ..weights import load_ema_weights

if TYPE_CHECKING:
    from .deepspeed import DeepSpeedEMA

__all__ = ["EMACallback"]


class EMACallback(pl.Callback):
    """Keeps an EMA of the weights that ``trainer.optimizers[optimizer_index]`` trains.

    The EMA is attached (:func:`~triton_ema.attach`) to that optimizer when
    ``fit`` starts; ``model=`` is the LightningModule. Validation (and the
    sanity check) and testing run on the EMA weights (the module's steps and
    its ``on_validation_epoch_end`` / ``on_test_epoch_end``), swapped back
    bitwise after them, also when they raise; checkpoints keep the training
    weights. Checkpoints carry the EMA in
    ``checkpoint["optimizer_states"][i]["ema"]`` and ``fit(ckpt_path=...)``
    resumes it bitwise; under ``ModelParallelStrategy`` (FSDP2) each rank's EMA
    shards are saved beside the optimizer state in the distributed checkpoint.
    ``test`` and ``validate(ckpt_path=...)`` run on that checkpoint's EMA, also
    in a process that has not fitted.

    Args:
        momentum: As for :class:`~triton_ema.EMAOptimizer`.
        validate_on_ema: Run validation (and the sanity check) on the EMA weights.
        test_on_ema: Run testing on the EMA weights.
        ema_at_end: Leave the EMA weights in the model when ``fit`` returns.
        optimizer_index: Which of ``trainer.optimizers`` to keep the EMA of.
        **ema_kwargs: :class:`~triton_ema.EMAOptimizer`'s other arguments
            (``decay``, ``interval``, ``update_buffers``, ``shadow_dtype``,
            ``device``, ``backend``, ``skip_nonfinite``); not ``model``.

    Attributes:
        ema: The EMA once ``fit`` has started, else None: an attached
            :class:`~triton_ema.EMAOptimizer`, or under ``DeepSpeedStrategy`` a
            :class:`~triton_ema.integrations.deepspeed.DeepSpeedEMA`.

    Raises:
        TypeError: ``model=`` given.
        ValueError: ``optimizer_index`` out of range (when ``fit`` starts).
        NotImplementedError: ``FSDPStrategy`` or
            ``ModelParallelStrategy(save_distributed_checkpoint=False)``, whose
            checkpoints would not carry the EMA (when ``fit`` starts); and
            ``test``/``validate(ckpt_path=...)`` without a fit of a ZeRO-3 or
            distributed (``ModelParallelStrategy``) checkpoint.
    """

    def __init__(self, momentum: float | Schedule | Mapping[str, float | Schedule] | None = None, *, validate_on_ema: bool = True,
                 test_on_ema: bool = True, ema_at_end: bool = False, optimizer_index: int = 0, **ema_kwargs: Any) -> None:
        if "model" in ema_kwargs:
            raise TypeError("EMACallback takes no model=: the EMA is of the LightningModule being fitted")
        if momentum is not None or "decay" in ema_kwargs:  # none given: test/validate(ckpt_path=) needs none
            check_momentum(momentum, ema_kwargs.get("decay"), given_to="EMACallback")
        self.momentum = momentum
        self.ema_kwargs = ema_kwargs
        self.validate_on_ema = validate_on_ema
        self.test_on_ema = test_on_ema
        self.ema_at_end = ema_at_end
        self.optimizer_index = optimizer_index
        self.ema: EMAOptimizer | DeepSpeedEMA | None = None
        self._swapped = contextlib.ExitStack()
        self._on_ema: str | None = None  # "validate" or "test" while the EMA is in the model
        self._load_hook = None
        self._checkpoint_ema: dict[str, torch.Tensor] | None = None  # test/validate(ckpt_path=) without a fit

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if stage != "fit":
            return
        if isinstance(strategy, FSDPStrategy):
            raise NotImplementedError("EMACallback under FSDPStrategy: its checkpoints save the optimizer without "
                                      "the EMA; use ModelParallelStrategy (FSDP2), DeepSpeedStrategy or DDP")
        # Lightning keeps this setting private; a full (not distributed) checkpoint would gather no EMA shards.
        if isinstance(strategy, ModelParallelStrategy) and not getattr(strategy, "_save_distributed_checkpoint", True):
            raise NotImplementedError("EMACallback under ModelParallelStrategy(save_distributed_checkpoint=False): "
                                      "the EMA is saved only in distributed checkpoints; pass "
                                      "save_distributed_checkpoint=True (the default)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning has built the optimizer (and wrapped the model) and restores its state after this hook.
        optimizers = trainer.optimizers
        if not 0 <= self.optimizer_index < len(optimizers):
            raise ValueError(f"EMACallback(optimizer_index={self.optimizer_index}) but configure_optimizers "
                             f"returned {len(optimizers)} optimizer(s)")
        if self.ema is not None:
            self.ema.detach()  # an earlier fit's optimizer
            if self._load_hook is not None:
                self._load_hook.remove()
            self._load_hook = None
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            from .deepspeed import attach as attach_engine  # imports DeepSpeed, which this strategy needs anyway

            # The strategy has built the engine; its load_checkpoint (ckpt_path=) runs after this hook.
            self.ema = attach_engine(trainer.strategy.deepspeed_engine, self.momentum, **self.ema_kwargs)
            return
        optimizer = optimizers[self.optimizer_index]
        self.ema = attach(optimizer, self.momentum, model=pl_module, **self.ema_kwargs)
        self._load_hook = optimizer.register_load_state_dict_pre_hook(
            functools.partial(self._with_sharded_ema, trainer), prepend=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ema_at_end and isinstance(trainer.strategy, DeepSpeedStrategy):
            cast("DeepSpeedEMA", self.ema).load_into_model()  # the masters and what the module computes with
        elif self.ema_at_end:
            assert self.ema is not None  # attached when fit started
            pl_module.load_state_dict(self.ema.ema_state_dict())

    # The swap lasts from the epoch's start to the callback's on_{validation,test}_end: Lightning calls the
    # module's on_validation_epoch_end after every callback's, so the module's steps and epoch-end hooks (where
    # diffusion models sample) run on the EMA; the callback's on_validation_end runs before ModelCheckpoint's,
    # where it saves (Lightning puts checkpoint callbacks last), and on_save_checkpoint keeps the training
    # weights in a checkpoint saved while the EMA is in the model.
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.validate_on_ema:
            self._swap_in("validate", pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.test_on_ema:
            self._swap_in("test", pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def _swap_in(self, what: str, pl_module: pl.LightningModule) -> None:
        if self.ema is None and self._checkpoint_ema is not None:
            self._swapped.enter_context(self._checkpoint_ema_swapped(pl_module))
            self._on_ema = what
            return
        if self.ema is None:
            raise RuntimeError(f"EMACallback({what}_on_ema=True): there is no EMA to {what} on; fit with this "
                               f"callback in this process first, or {what}(ckpt_path=...) a checkpoint saved with it, "
                               f"or pass {what}_on_ema=False")
        self._swapped.enter_context(self.ema.swap_ema())  # reshards FSDP2 modules on both sides of the swap
        self._on_ema = what

    def _swap_out(self) -> None:
        self._on_ema = None
        self._swapped.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_out()  # the training weights go back into the model

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # ModelParallelStrategy saves torch's get_optimizer_state_dict (state and param_groups only) with DCP:
        # the EMA goes beside them, each rank writing its own shards.
        deepspeed = isinstance(trainer.strategy, DeepSpeedStrategy)  # the engine's save_checkpoint carries the EMA
        states = checkpoint.get("optimizer_states")
        if self.ema is not None and not deepspeed and states and "ema" not in states[self.optimizer_index]:
            states[self.optimizer_index]["ema"] = self.ema.ema_checkpoint.state_dict()
        if self._on_ema is not None and deepspeed:
            raise RuntimeError("EMACallback under DeepSpeedStrategy: a checkpoint saved while validation or testing "
                               "runs on the EMA (from the module's epoch-end hooks) would hold the EMA as weights, "
                               "and the engine saves its weights itself; save it from on_validation_end or a "
                               "ModelCheckpoint instead")
        if self._on_ema is not None:
            # Saved inside the swap (from the module's epoch-end hook, or a callback before this one): the model's
            # state_dict holds the EMA; the checkpoint gets the training weights, and the EMA goes back in.
            what = self._on_ema
            self._swap_out()
            checkpoint["state_dict"] = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v,
                                                trainer.strategy.lightning_module_state_dict())
            self._swap_in(what, pl_module)

    def _with_sharded_ema(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer,
                          state_dict: dict[str, Any]) -> dict[str, Any] | None:
        """A load pre-hook run before the attached EMA's: ModelParallelStrategy loads the optimizer from a
        distributed checkpoint through torch's set_optimizer_state_dict, without "ema"; it joins here."""
        saved = None if "ema" in state_dict else self._read_sharded_ema(trainer.ckpt_path)
        return None if saved is None else {**state_dict, "ema": saved}

    def _read_sharded_ema(self, path: str | None) -> dict[str, Any] | None:
        """The EMA entry of a distributed checkpoint (a directory; this rank's shards), or None when it has none."""
        if path is None or not Path(path).is_dir():
            return None
        key = f"optimizer_{self.optimizer_index}"
        if not any(k.startswith(f"{key}.ema.") for k in dcp.FileSystemReader(path).read_metadata().state_dict_metadata):
            return None
        assert self.ema is not None  # the load hook that calls this is the attached EMA's
        saved = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, self.ema.ema_checkpoint.state_dict())
        dcp.load({key: {"ema": saved}}, checkpoint_id=path)
        return saved

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Fitting, the optimizer's own load_state_dict restores the EMA. Testing or validating a
        # checkpoint after a fit, its EMA replaces the fit's, as its weights replace the model's.
        wanted = {TrainerFn.VALIDATING: self.validate_on_ema, TrainerFn.TESTING: self.test_on_ema}
        if not wanted.get(trainer.state.fn):
            return
        if self.ema is None:  # no fit in this process: the checkpoint's EMA weights, swapped in by _swap_in
            self._checkpoint_ema = self._ema_weights_of(trainer, pl_module, checkpoint)
            return
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            # The strategy loads no optimizer states to test or validate: this rank's EMA comes from its file.
            cast("DeepSpeedEMA", self.ema).load_checkpoint_ema(trainer.ckpt_path)
            return
        states = checkpoint.get("optimizer_states") or [{}]
        saved = states[self.optimizer_index].get("ema") if self.optimizer_index < len(states) else None
        saved = saved or self._read_sharded_ema(trainer.ckpt_path)
        if saved is None:
            raise RuntimeError("EMACallback: the checkpoint holds no EMA (saved without this callback, or with "
                               "weights only); pass validate_on_ema=False / test_on_ema=False to use its weights")
        self.ema.ema_checkpoint.load_state_dict(saved)

    # --- test/validate(ckpt_path=) in a process that has not fitted: the checkpoint's EMA weights ---------

    def _ema_weights_of(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                        checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            if trainer.strategy.zero_stage_3:
                raise NotImplementedError(
                    "EMACallback: test/validate(ckpt_path=) of a ZeRO-3 checkpoint in a process that has not fitted "
                    "(the module's parameters are partitioned, the checkpoint's EMA is whole); fit first in this "
                    "process, or write the EMA with python -m triton_ema.export and test an unsharded module")
            return load_ema_weights(trainer.ckpt_path, model=pl_module)  # every rank's partitions joined
        if trainer.ckpt_path is not None and Path(trainer.ckpt_path).is_dir():
            raise NotImplementedError(
                "EMACallback: test/validate(ckpt_path=) of a distributed checkpoint (ModelParallelStrategy) in a "
                "process that has not fitted; fit first in this process, or write the checkpoint's EMA weights with "
                "python -m triton_ema.export and load them into an unsharded module")
        try:
            return load_ema_weights(checkpoint)
        except ValueError as error:
            raise RuntimeError(f"EMACallback: the checkpoint's EMA cannot be read ({error}); pass "
                               "validate_on_ema=False / test_on_ema=False to use its weights") from error

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage in ("validate", "test"):
            self._checkpoint_ema = None  # that run's checkpoint: a later run without ckpt_path= has no EMA

    @contextlib.contextmanager
    def _checkpoint_ema_swapped(self, pl_module: pl.LightningModule):
        """The checkpoint's EMA weights in the module, its own weights back afterwards (also when the body raises)."""
        own = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        pl_module.load_state_dict(self._checkpoint_ema, strict=pl_module.strict_loading)  # as Lightning loads it
        try:
            yield
        finally:
            pl_module.load_state_dict(own)
