"""Optimizers that training frameworks wrap in their own objects: which wrappers an EMA
is attached through (to the optimizer inside), and the error for every other case.

A framework's wrapper is no ``torch.optim.Optimizer`` of its own (accelerate's
subclass never runs ``Optimizer.__init__``, so it has no hooks; mmengine's is
no optimizer at all). Attaching through it is right where the wrapper's
``step()``, ``state_dict()`` and ``load_state_dict()`` call the inner
optimizer's: the hooks on the inner one then run inside the framework's step
(and not in a step it skips) and ride in its checkpoints. Wrapping it in an
``EMAOptimizer`` is never right: the framework steps its own wrapper, and a
wrapper around it could not tell the steps it skips.
"""

from __future__ import annotations

from typing import Any

import torch

# Wrappers whose step(), state_dict() and load_state_dict() reach the inner optimizer, read in their source:
# class -> (its name in messages, where an EMAOptimizer goes instead).
THROUGH = {
    # step: self.optimizer.step(closure), or scaler.step(self.optimizer); (load_)state_dict: self.optimizer's
    "accelerate.optimizer.AcceleratedOptimizer": (
        "accelerate's AcceleratedOptimizer", "wrap the optimizer before accelerator.prepare()"),
    # step: strategy.optimizer_step(self._optimizer, ...); everything else is the inner one's (__getattr__)
    "lightning.pytorch.core.optimizer.LightningOptimizer": (
        "Lightning's LightningOptimizer", "return the EMAOptimizer from configure_optimizers(), or use EMACallback"),
    "pytorch_lightning.core.optimizer.LightningOptimizer": (
        "Lightning's LightningOptimizer", "return the EMAOptimizer from configure_optimizers(), or use EMACallback"),
    # step: self.optimizer.step(), or loss_scaler.step(self.optimizer) (AmpOptimWrapper); (load_)state_dict: the
    # inner one's with entries of their own beside
    "mmengine.optim.optimizer.optimizer_wrapper.OptimWrapper": (
        "mmengine's OptimWrapper", "use TritonEMAHook (triton_ema.integrations.mmengine)"),
}
# Subclasses of those that hold no single optimizer to attach to.
REFUSED = {
    "mmengine.optim.optimizer.optimizer_wrapper_dict.OptimWrapperDict":
        "mmengine's OptimWrapperDict holds several optimizers: attach to one of them (optim_wrapper['name'])",
    "mmengine._strategy.colossalai.ColossalAIOptimWrapper":
        "mmengine's ColossalAIOptimWrapper steps ColossalAI's optimizer, not a torch one: not supported",
}


def _known(optimizer: Any) -> str | None:
    """The first class of ``optimizer``'s MRO that is in THROUGH or REFUSED (Lightning's wrapper is an instance of
    a class made on the fly, a subclass of LightningOptimizer and of the optimizer's class)."""
    for cls in type(optimizer).__mro__:
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in THROUGH or name in REFUSED:
            return name
    return None


def _inner(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer a wrapper holds as ``.optimizer`` (each of the wrappers above does), if any."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else None


def _is_hookable(optimizer: Any) -> bool:
    """A torch optimizer whose ``Optimizer.__init__`` ran (it holds the step hooks)."""
    return isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "_optimizer_step_post_hooks")


def unwrap_optimizer(optimizer: Any) -> Any:
    """What ``attach(optimizer)`` attaches to: ``optimizer`` itself, or the optimizer inside a framework's
    wrapper whose step and checkpoints reach it (``THROUGH``); an error for a wrapper that is not known to."""
    while True:
        known = _known(optimizer)
        if known in REFUSED:
            raise TypeError(f"attach(): {REFUSED[known]}")
        if known is None:
            break
        inner = _inner(optimizer)
        if inner is None:
            raise TypeError(f"attach(): this {THROUGH[known][0]} holds no torch optimizer as .optimizer")
        optimizer = inner
    inner = None if _is_hookable(optimizer) else _inner(optimizer)
    if inner is not None:
        wrapper, base = type(optimizer).__name__, type(inner).__name__
        raise TypeError(f"attach(): optimizer is a {wrapper} around a {base}, which torch's optimizer hooks cannot "
                        f"be attached to; attach to the {base} before {wrapper} wraps it (its step then runs the "
                        f"EMA), or pass {wrapper}.optimizer if {wrapper}'s step(), state_dict() and load_state_dict() "
                        f"call the {base}'s")
    return optimizer


def refuse_wrapped(optimizer: Any) -> None:
    """``EMAOptimizer(optimizer)``: an error naming the framework's wrapper and where the EMA goes instead."""
    known = _known(optimizer)
    inner = _inner(optimizer) if known is not None or not _is_hookable(optimizer) else None
    if inner is None:
        return
    base = type(inner).__name__
    if known in THROUGH:
        name, instead = THROUGH[known]
    else:
        name = type(optimizer).__name__
        instead = f"wrap the {base} before {name} wraps it"
    raise TypeError(f"EMAOptimizer(optimizer): optimizer is {name} around a {base}; the framework steps its "
                    f"wrapper, and an EMAOptimizer around that could not tell the steps it skips (GradScaler, "
                    f"gradient accumulation): {instead}, or attach(optimizer, ...) to keep the EMA of the {base} "
                    "inside it")
