"""Hugging Face transformers: a ``Trainer`` that keeps the EMA of the optimizer it builds.

    from triton_ema.integrations.transformers import EMATrainer
    trainer = EMATrainer(model=model, args=args, train_dataset=ds, eval_dataset=ev, ema_momentum=1e-3)

``EMATrainerMixin`` adds the same to another ``Trainer`` subclass. The EMA is
attached (``triton_ema.attach``) in ``create_optimizer``, before the Trainer
wraps the optimizer in accelerate's and loads a checkpoint into it: the
update runs inside the optimizer's ``step()`` and the EMA rides in
``optimizer.pt``, so ``resume_from_checkpoint`` continues it bitwise.
A bare accelerate loop needs nothing from here: ``attach`` the optimizer
before ``accelerator.prepare``.

With a DeepSpeed config (``TrainingArguments(deepspeed=...)``) the EMA is
attached instead to the engine that ``accelerator.prepare`` builds
(:mod:`triton_ema.integrations.deepspeed`), in ``create_scheduler``, which
the Trainer calls once prepare has built it and before it loads a
checkpoint: the EMA of each rank's fp32 master partition, carried by the
engine's ``save_checkpoint`` / ``load_checkpoint`` that the Trainer's
checkpoints use.

Under FSDP2 (``fsdp_version=2``) accelerate and the Trainer save the
optimizer with torch's ``get_optimizer_state_dict``, which keeps only its
``state`` and ``param_groups``: the EMA (of each rank's shards, attached once
prepare has sharded the model) is saved beside them as a DCP checkpoint,
``<checkpoint>/ema``, each rank writing its shards, and loaded from there
after the optimizer. In a bare accelerate loop, :func:`fsdp_ema_checkpoints`
hooks this into ``save_state`` / ``load_state``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
import transformers
from torch.utils._pytree import tree_map
from transformers.trainer import OPTIMIZER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..arguments import check_momentum
from ..hooks import attach, attached_ema
from ..optimizer import EMAOptimizer
from ..schedules import Schedule
from ..wrapped import unwrap_optimizer

if TYPE_CHECKING:
    from transformers import Trainer as _Trainer  # the mixin's methods call the Trainer's (Any to mypy: not analysed)

    from ..frontend import EMAFrontEnd
    from .deepspeed import DeepSpeedEMA
else:
    _Trainer = object

__all__ = ["EMATrainer", "EMATrainerMixin", "fsdp_ema_checkpoints"]

EMA_FOLDER = "ema"  # under FSDP2: the EMA's DCP checkpoint inside a checkpoint folder


def save_sharded_ema(ema: EMAFrontEnd, folder: str) -> None:
    """Every rank's EMA shards into ``folder/ema`` (a collective: DCP)."""
    dcp.save({"ema": ema.ema_checkpoint}, checkpoint_id=os.path.join(folder, EMA_FOLDER))


def load_sharded_ema(ema: EMAFrontEnd, folder: str) -> bool:
    """This rank's EMA shards from ``folder/ema`` (a collective); False where the folder has none."""
    path = os.path.join(folder, EMA_FOLDER)
    if not os.path.isdir(path):
        return False
    saved = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, ema.ema_checkpoint.state_dict())
    dcp.load({"ema": saved}, checkpoint_id=path)
    ema.ema_checkpoint.load_state_dict(saved)
    return True


def fsdp_ema_checkpoints(accelerator: Any, ema: EMAOptimizer) -> list[Any]:
    """Carry the EMA through ``save_state`` / ``load_state`` in an accelerate loop under FSDP2.

    ``accelerator.save_state(d)`` also saves ``ema`` into ``d/ema`` (a DCP
    checkpoint, each rank its shards), and ``load_state(d)`` loads it back
    after the optimizer (whose saved state holds no EMA there).

    Args:
        accelerator: The ``Accelerator``.
        ema: The EMA attached to the optimizer ``accelerator.prepare`` returned.

    Returns:
        The two hooks' handles: ``handle.remove()`` them before preparing
        another model on this accelerator.

    Raises:
        FileNotFoundError: From ``load_state``, a folder without ``ema/``.
    """
    saving = accelerator.register_save_state_pre_hook(
        lambda models, weights, output_dir: save_sharded_ema(ema, output_dir))

    def load(models: Any, input_dir: str) -> None:
        if not load_sharded_ema(ema, input_dir):
            raise FileNotFoundError(f"{input_dir} has no {EMA_FOLDER}/ folder: saved without fsdp_ema_checkpoints, "
                                    "so the EMA cannot be restored")
    return [saving, accelerator.register_load_state_pre_hook(load)]  # accelerate calls it after the optimizer's load



class EMATrainerMixin(_Trainer):
    """Keeps an EMA of the weights the Trainer's optimizer trains.

    Put it first among the bases of a ``Trainer`` subclass. The EMA is attached
    (:func:`~triton_ema.attach`) in ``create_optimizer`` (also to an optimizer
    given as ``optimizers=``), before the Trainer hands the optimizer to
    accelerate and loads a checkpoint into it: the Trainer's ``optimizer.pt``
    carries the EMA and ``resume_from_checkpoint`` continues it bitwise. With
    ``load_best_model_at_end=True`` the best checkpoint's EMA comes back with
    its weights.

    Args:
        *args: The ``Trainer``'s positional arguments.
        ema_momentum: :class:`~triton_ema.EMAOptimizer`'s ``momentum``.
        ema_kwargs: :class:`~triton_ema.EMAOptimizer`'s other arguments, a dict
            (``model=`` is the Trainer's model and may not be given).
        evaluate_on_ema: ``evaluate()`` (also the evaluations during training,
            and every dataset of a dict ``eval_dataset``, in one swap) runs on
            the EMA weights, swapped back bitwise after it.
        save_ema_model: ``save_model()`` called by the user writes the EMA
            weights; the checkpoints the Trainer writes to resume from keep the
            training weights either way.
        **kwargs: The ``Trainer``'s keyword arguments.

    Attributes:
        ema: The EMA (an attached :class:`~triton_ema.EMAOptimizer`) once the
            optimizer exists, else None.

    Raises:
        TypeError: ``model`` in ``ema_kwargs``.
    """

    def __init__(self, *args: Any, ema_momentum: float | Schedule | Mapping[str, float | Schedule] | None = None,
                 ema_kwargs: dict | None = None, evaluate_on_ema: bool = True, save_ema_model: bool = False,
                 **kwargs: Any) -> None:
        ema_kwargs = dict(ema_kwargs or {})
        if "model" in ema_kwargs:
            raise TypeError("EMATrainer takes no model= in ema_kwargs: the EMA is of the Trainer's model")
        # Checked now, not when train() builds the EMA: the momentum is ema_momentum, a decay ema_kwargs["decay"].
        check_momentum(ema_momentum, ema_kwargs.get("decay"),
                       given_to="EMATrainer(ema_momentum=..., or ema_kwargs={'decay': ...})")
        self.ema_momentum, self.ema_kwargs = ema_momentum, ema_kwargs
        self.evaluate_on_ema, self.save_ema_model = evaluate_on_ema, save_ema_model
        self.ema: EMAOptimizer | DeepSpeedEMA | None = None
        self._on_ema = False  # inside evaluate()'s swap
        self._resume_from: str | None = None  # the checkpoint train() resumes from
        super().__init__(*args, **kwargs)
        # First, so that every other callback's on_train_end sees the best checkpoint's EMA too.
        self.callback_handler.callbacks.insert(0, BestEMA(self))

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The Trainer's ``create_optimizer``, with the EMA attached to the optimizer it returns."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            # DeepSpeed takes the parameters over, FSDP2's prepare swaps them for their shards: the EMA is attached
            # once prepare has run, in create_scheduler.
            if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
                raise NotImplementedError("EMATrainer under FSDP1 (fsdp_version=1): its checkpoints save the "
                                          "optimizer without the EMA; use fsdp_version=2")
            return optimizer
        self.ema = attached_ema(unwrap_optimizer(optimizer))  # already wrapped by accelerate on a second train()
        if self.ema is None:
            self.ema = attach(optimizer, self.ema_momentum, model=self.model, **self.ema_kwargs)
        return optimizer

    def create_scheduler(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``create_scheduler``; under DeepSpeed or FSDP2, the EMA is attached here.

        The Trainer calls it once ``accelerator.prepare`` has built the DeepSpeed
        engine (the EMA: :func:`triton_ema.integrations.deepspeed.attach` to it)
        or sharded the model (the EMA: :func:`~triton_ema.attach` to the
        optimizer, which now holds the shards), before it loads a checkpoint.
        """
        scheduler = super().create_scheduler(*args, **kwargs)
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if self.is_deepspeed_enabled and wrapped is not None:  # prepare has built the engine; no checkpoint loaded yet
            from . import deepspeed

            self.ema = deepspeed.attached(wrapped.engine)
            if self.ema is None:
                self.ema = deepspeed.attach(wrapped.engine, self.ema_momentum, **self.ema_kwargs)
        elif self.is_fsdp_enabled and self.optimizer is not None:  # prepare has sharded the model and the optimizer
            self.ema = attached_ema(unwrap_optimizer(self.optimizer))
            if self.ema is None:
                self.ema = attach(self.optimizer, self.ema_momentum, model=self.model, **self.ema_kwargs)
        return scheduler

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``train``; under FSDP2 the EMA of ``resume_from_checkpoint`` is read from its ``ema/``.

        Raises:
            FileNotFoundError: Under FSDP2, a checkpoint to resume from without ``ema/``.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)  # as Trainer.train resolves it
        # Under FSDP2 the EMA is read from there in on_train_begin.
        resumed = resume_from_checkpoint
        self._resume_from = os.fspath(resumed) if isinstance(resumed, (str, os.PathLike)) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """The Trainer's ``evaluate``, on the EMA weights unless ``evaluate_on_ema=False``.

        Raises:
            RuntimeError: Called before ``train()`` built the optimizer (there is
                no EMA yet) with ``evaluate_on_ema=True``.
        """
        if not self.evaluate_on_ema:
            return super().evaluate(*args, **kwargs)
        if self.ema is None:
            raise RuntimeError("EMATrainer(evaluate_on_ema=True): there is no EMA to evaluate on before train() "
                               "builds the optimizer; pass evaluate_on_ema=False")
        if self._on_ema:  # a dict of eval datasets: Trainer.evaluate calls evaluate() once for each, inside this swap
            return super().evaluate(*args, **kwargs)
        self._on_ema = True
        try:
            with self.ema.swap_ema():
                return super().evaluate(*args, **kwargs)
        finally:
            self._on_ema = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's ``save_model``; with ``save_ema_model=True`` the user's call writes the EMA weights.

        Args:
            output_dir: As for ``Trainer.save_model``.
            _internal_call: Set by the Trainer for its own checkpoints, which keep
                the training weights.

        Raises:
            RuntimeError: ``save_ema_model=True`` before ``train()`` built the
                optimizer (there is no EMA yet).
        """
        if not self.save_ema_model or _internal_call:
            return super().save_model(output_dir, _internal_call)
        if self.ema is None:
            raise RuntimeError("EMATrainer(save_ema_model=True): there is no EMA to save before train() builds the "
                               "optimizer; pass save_ema_model=False")
        with self.ema.swap_ema():
            return super().save_model(output_dir, _internal_call)


class BestEMA(transformers.TrainerCallback):
    """With ``load_best_model_at_end=True``: once the Trainer has loaded the best checkpoint's weights (before
    ``on_train_end``), the EMA of that checkpoint, from its ``optimizer.pt``: the EMA that was evaluated there is
    the one ``evaluate()`` and ``save_model()`` use afterwards."""

    def __init__(self, trainer: EMATrainerMixin) -> None:
        self.trainer = trainer

    # Under FSDP2: the EMA's shards beside each checkpoint, and back from the one resumed from.
    def on_train_begin(self, args: transformers.TrainingArguments, state: transformers.TrainerState,
                       control: transformers.TrainerControl, **kwargs: Any) -> None:
        resumed, ema = self.trainer._resume_from, self.trainer.ema
        if self.trainer.is_fsdp_enabled and ema is not None and resumed and not load_sharded_ema(ema, resumed):
            raise FileNotFoundError(f"resume_from_checkpoint={resumed}: under FSDP2 the EMA is saved in "
                                    f"{EMA_FOLDER}/ beside the optimizer, and this checkpoint has none (saved "
                                    "without EMATrainer?)")

    def on_save(self, args: transformers.TrainingArguments, state: transformers.TrainerState,
                control: transformers.TrainerControl, **kwargs: Any) -> None:
        if self.trainer.is_fsdp_enabled and self.trainer.ema is not None:
            save_sharded_ema(self.trainer.ema, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))

    def on_train_end(self, args: transformers.TrainingArguments, state: transformers.TrainerState,
                     control: transformers.TrainerControl, **kwargs: Any) -> None:
        ema, best = self.trainer.ema, state.best_model_checkpoint
        if not args.load_best_model_at_end or best is None or ema is None:  # the Trainer's own condition
            return
        if self.trainer.is_deepspeed_enabled:
            return  # the Trainer loaded the best checkpoint with the engine's load_checkpoint: the EMA came with it
        if self.trainer.is_fsdp_enabled:
            if not load_sharded_ema(ema, best):
                warnings.warn(f"load_best_model_at_end: {best} holds no {EMA_FOLDER}/ folder: the model has the best "
                              "checkpoint's weights, the EMA stays the last step's", UserWarning, stacklevel=2)
            return
        path = os.path.join(best, OPTIMIZER_NAME)
        saved = torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else {}
        if "ema" not in saved:
            warnings.warn(f"load_best_model_at_end: {path} {'holds no EMA' if saved else 'does not exist'} "
                          "(save_only_model=True writes none): the model has the best checkpoint's weights, the EMA "
                          "stays the last step's", UserWarning, stacklevel=2)
            return
        ema.ema_checkpoint.load_state_dict(saved["ema"])


class EMATrainer(EMATrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with the EMA of :class:`EMATrainerMixin`.

    Takes the ``Trainer``'s arguments and :class:`EMATrainerMixin`'s
    (``ema_momentum``, ``ema_kwargs``, ``evaluate_on_ema``, ``save_ema_model``).
    """
