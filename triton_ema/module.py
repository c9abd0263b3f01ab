"""``ema_module()``: the EMA as an ``nn.Module``, to run forward every step.

The module has the model's structure (a deep copy of everything but its
tensors). Its averaged parameters and buffers *are* one profile's shadows,
aliased, not copied: after every ``step()`` it shows the new EMA, and a write
to them writes the EMA (as inside ``swap_ema()``). The shadows are used as
they are stored, so a bfloat16 model's EMA module holds float32 tensors
(run it under autocast) and ``device="cpu"`` puts it on the CPU.

What the optimizer does not average follows the model, in the dtype and on
the device the shadows use (float32 for 16-bit tensors by default), so the
module is all of one placement: parameters it does not update (frozen ones)
are aliased to the model's where that placement is theirs, copied otherwise;
buffers are copies. Copies are taken again after every step and before every
forward, so a forward in train mode (BatchNorm statistics) never writes the
training model.
Averaged buffers are the EMA storage: a train-mode forward that changes them
is undone after the forward, with a warning, as in ``swap_ema()``.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import sharding
from .buckets import default_shadow_dtype
from .swap import bitwise_equal

if TYPE_CHECKING:
    from .optimizer import EMAOptimizer
    from .store import ShadowStore


def ema_module(opt: EMAOptimizer, profile: int) -> tuple[nn.Module, EMAModuleLink]:
    """A module with the model's structure on profile ``profile``'s shadows, and what keeps it there."""
    model, store = opt.model, opt._store
    if any(sharding.is_dtensor(t) for t in opt._objects):
        raise NotImplementedError(
            "ema_module() is not available for sharded (DTensor, FSDP2) parameters: a forward needs FSDP's "
            "all-gathers, which belong to the training model; use swap_ema() for forward passes, or "
            "ema_state_dict(full=True) to build a separate model")
    index = {id(t): i for i, t in enumerate(opt._objects)}
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for p in model.parameters():
            i = index.get(id(p))
            data = _placed(store, p, copy=False) if i is None else store.ema(i, profile)
            memo[id(p)] = nn.Parameter(data, requires_grad=False)
        for b in model.buffers():
            i = index.get(id(b))
            memo[id(b)] = _placed(store, b, copy=True) if i is None else store.ema(i, profile)
        module = copy.deepcopy(model, memo)
    return module, EMAModuleLink(opt, profile, module)


class EMAModuleLink:
    """Keeps one EMA module on the storage of one profile: its averaged tensors
    re-aliased when the shadows are laid out anew, the rest refreshed from the model."""

    def __init__(self, opt: EMAOptimizer, profile: int, module: nn.Module) -> None:
        self.opt, self.profile = opt, profile
        # (EMA module's submodule, "_parameters" or "_buffers", attribute, the model's submodule)
        self.slots = [(target, kind, attr, source)
                      for (_, source), (_, target) in zip(opt.model.named_modules(), module.named_modules())
                      for kind in ("_parameters", "_buffers")
                      for attr, value in getattr(source, kind).items() if value is not None]
        self.averaged = self._averaged()
        self.generation = opt._store.generation
        self.module = weakref.ref(module)
        self._kept: dict[int, Tensor] = {}
        module.register_forward_pre_hook(self._before_forward)
        module.register_forward_hook(self._after_forward, always_call=True)

    def alive(self) -> nn.Module | None:
        return self.module()

    def _averaged(self) -> list[int | None]:
        """For every slot, the index of its tensor among the averaged ones (None: not averaged)."""
        index = {id(t): i for i, t in enumerate(self.opt._objects)}
        return [index.get(id(getattr(source, kind)[attr])) for _, kind, attr, source in self.slots]

    def follow(self, *, strict: bool) -> None:
        """Re-alias the averaged tensors if the shadows moved, refresh what follows the model.
        ``strict``: an averaged tensor that someone else replaced in the module is an error."""
        opt = self.opt
        store = opt._store
        relaid = store.generation != self.generation
        if relaid:  # params may have joined the optimizer (add_param_group)
            self.averaged = self._averaged()
        with torch.no_grad():
            for (target, kind, attr, source), i in zip(self.slots, self.averaged):
                current = getattr(target, kind)[attr]
                if i is not None:
                    ema = store.ema(i, self.profile)
                    if current.data_ptr() == ema.data_ptr() and current.dtype == ema.dtype:
                        continue
                    if strict and not relaid:
                        raise RuntimeError(
                            f"ema_module(): {attr} of {type(target).__name__} no longer is the EMA storage (was the "
                            "module moved with .to() or its tensors replaced?); it would not show the EMA any more. "
                            "Leave the EMA module where it is, and copy it if you need another placement")
                    _rebind(target, kind, attr, ema)
                    continue
                model_tensor = getattr(source, kind)[attr]
                value = _placed(store, model_tensor, copy=False)
                fresh = value.data_ptr() != model_tensor.data_ptr()  # converted: a copy already
                if kind == "_parameters" and not fresh:  # a frozen param in the shadows' placement: aliased
                    if current.data_ptr() != value.data_ptr():
                        current.data = value
                elif _same_place(current, value) and current.data_ptr() != model_tensor.data_ptr():
                    current.copy_(value)
                else:
                    _rebind(target, kind, attr, value if fresh else value.clone())
        self.generation = store.generation

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        opt = self.opt
        if opt._store.swapped:
            raise RuntimeError("the EMA module was run inside swap_ema(): there the model holds the EMA and the "
                               "shadows may hold the training weights; run it outside the with-block")
        with torch.no_grad():
            opt._sync()
        self.follow(strict=True)
        self._kept = {j: target._buffers[attr].clone()
                      for j, ((target, kind, attr, _), i) in enumerate(zip(self.slots, self.averaged))
                      if kind == "_buffers" and i is not None and target.training}

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        changed = []
        with torch.no_grad():
            for j, kept in self._kept.items():
                target, _, attr, _ = self.slots[j]
                buf = target._buffers[attr]
                if not bitwise_equal(buf, kept):
                    buf.copy_(kept)
                    changed.append(self.opt._store.names[self.averaged[j]])
        self._kept = {}
        if changed:
            warnings.warn(f"{', '.join(changed)} changed in a forward of the EMA module in train mode; the EMA of "
                          "averaged buffers is kept as it was (call .eval() on the EMA module)", UserWarning,
                          stacklevel=2)


def _placed(store: ShadowStore, t: Tensor, *, copy: bool) -> Tensor:
    """``t`` in the shadows' dtype and on their device (floating tensors), aliased unless ``copy``."""
    dtype = (store.shadow_dtype or default_shadow_dtype(t.dtype)) if t.is_floating_point() else t.dtype
    return t.detach().to(store.device or t.device, dtype, copy=copy)


def _same_place(a: Tensor, b: Tensor) -> bool:
    return (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)


def _rebind(target: nn.Module, kind: str, attr: str, ema: Tensor) -> None:
    if kind == "_parameters":
        target._parameters[attr].data = ema
    else:
        target._buffers[attr] = ema
