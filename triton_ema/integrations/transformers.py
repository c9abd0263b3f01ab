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
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import transformers
from transformers.trainer import OPTIMIZER_NAME

from ..hooks import attach, attached_ema
from ..optimizer import EMAOptimizer
from ..schedules import Schedule
from ..wrapped import unwrap_optimizer

__all__ = ["EMATrainer", "EMATrainerMixin"]


class EMATrainerMixin:
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

    def __init__(self, *args: Any, ema_momentum: float | Schedule | None = None, ema_kwargs: dict | None = None,
                 evaluate_on_ema: bool = True, save_ema_model: bool = False, **kwargs: Any) -> None:
        ema_kwargs = dict(ema_kwargs or {})
        if "model" in ema_kwargs:
            raise TypeError("EMATrainer takes no model= in ema_kwargs: the EMA is of the Trainer's model")
        self.ema_momentum, self.ema_kwargs = ema_momentum, ema_kwargs
        self.evaluate_on_ema, self.save_ema_model = evaluate_on_ema, save_ema_model
        self.ema: EMAOptimizer | None = None
        self._on_ema = False  # inside evaluate()'s swap
        super().__init__(*args, **kwargs)
        # First, so that every other callback's on_train_end sees the best checkpoint's EMA too.
        self.callback_handler.callbacks.insert(0, BestEMA(self))

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The Trainer's ``create_optimizer``, with the EMA attached to the optimizer it returns."""
        optimizer = super().create_optimizer(*args, **kwargs)
        self.ema = attached_ema(unwrap_optimizer(optimizer))  # already wrapped by accelerate on a second train()
        if self.ema is None:
            self.ema = attach(optimizer, self.ema_momentum, model=self.model, **self.ema_kwargs)
        return optimizer

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

    def on_train_end(self, args: transformers.TrainingArguments, state: transformers.TrainerState,
                     control: transformers.TrainerControl, **kwargs: Any) -> None:
        ema, best = self.trainer.ema, state.best_model_checkpoint
        if not args.load_best_model_at_end or best is None or ema is None:  # the Trainer's own condition
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
