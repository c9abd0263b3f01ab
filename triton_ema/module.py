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

from .buckets import default_shadow_dtype
from .sharding import is_dtensor
from .swap import bitwise_equal

if TYPE_CHECKING:
    from .ema import EMA
    from .store import ShadowStore


def ema_module(ema: EMA, profile: int) -> nn.Module:
    """Profile ``profile``'s EMA module: the one ``ema`` keeps if it is alive, else a new one."""
    model = ema.model
    if model is None:
        raise RuntimeError("ema_module() needs the model: pass model= to EMAOptimizer")
    ema.refuse_while_swapped("ema_module()")
    link = ema.module_links.get(profile)
    module = None if link is None else link.alive()
    if module is None:
        with torch.no_grad():
            ema.sync()
        module, ema.module_links[profile] = new_ema_module(ema, model, profile)
    return module


def new_ema_module(ema: EMA, model: nn.Module, profile: int) -> tuple[nn.Module, EMAModuleLink]:
    """A module with the structure of ``model`` (``ema``'s) on profile ``profile``'s shadows, and what keeps it there."""
    store = ema.store
    if any(is_dtensor(t) for t in ema.tracking.objects):
        raise NotImplementedError(
            "ema_module() is not available for sharded (DTensor, FSDP2) parameters: a forward needs FSDP's "
            "all-gathers, which belong to the training model; use swap_ema() for forward passes, or "
            "ema_state_dict(full=True) to build a separate model")
    index = ema.tracking.positions()
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
    return module, EMAModuleLink(ema, profile, module, model)


class EMAModuleLink:
    """Keeps one EMA module on the storage of one profile: its averaged tensors
    re-aliased when the shadows are laid out anew, the rest refreshed from the model."""

    def __init__(self, ema: EMA, profile: int, module: nn.Module, model: nn.Module) -> None:
        self.ema, self.profile = ema, profile
        # (EMA module's submodule, "_parameters" or "_buffers", attribute, the model's submodule)
        self.slots = [(target, kind, attr, source)
                      for (_, source), (_, target) in zip(model.named_modules(), module.named_modules())
                      for kind in ("_parameters", "_buffers")
                      for attr, value in getattr(source, kind).items() if value is not None]
        self._sort()
        self.generation = ema.store.generation
        self.module = weakref.ref(module)
        self._kept: dict[int, Tensor] = {}
        module.register_forward_pre_hook(self._before_forward)
        module.register_forward_hook(self._after_forward, always_call=True)
        module.register_state_dict_pre_hook(lambda module, prefix, keep_vars: self.check())

    def alive(self) -> nn.Module | None:
        return self.module()

    def _sort(self) -> None:
        """Slots of averaged tensors, with their index among them (``aliased``), and the others (``unaveraged``)."""
        index = self.ema.tracking.positions()
        self.aliased, self.unaveraged = [], []
        for slot in self.slots:
            _, kind, attr, source = slot
            i = index.get(id(getattr(source, kind)[attr]))
            if i is None:
                self.unaveraged.append(slot)
            else:
                self.aliased.append((slot, i))

    def follow(self, *, strict: bool) -> None:
        """Refresh what follows the model; re-alias the averaged tensors if the shadows were
        laid out anew. ``strict`` (before a forward or a state dict) also checks that every
        averaged tensor still is the EMA storage: one that someone else replaced is an error.
        Without it (after a step) the averaged tensors are not looked at unless the shadows moved,
        so a step costs nothing per averaged tensor."""
        store = self.ema.store
        relaid = store.generation != self.generation
        if relaid:  # params may have joined the optimizer (add_param_group)
            self._sort()
        with torch.no_grad():
            for slot in self.unaveraged:
                self._refresh(*slot)
            if relaid or strict:
                for (target, kind, attr, _), i in self.aliased:
                    self._alias(target, kind, attr, store.ema(i, self.profile), store.names[i], refuse=not relaid)
        self.generation = store.generation

    @staticmethod
    def _alias(target: nn.Module, kind: str, attr: str, ema: Tensor, name: str, *, refuse: bool) -> None:
        current = getattr(target, kind)[attr]
        if current.data_ptr() == ema.data_ptr() and current.dtype == ema.dtype:
            return
        if refuse:
            raise RuntimeError(
                f"ema_module(): {name} ({attr} of {type(target).__name__}) no longer is the EMA storage (was the "
                "module moved with .to() or its tensors replaced?); it would not show the EMA any more. Leave the "
                "EMA module where it is, and copy it if you need another placement; to start over, drop every "
                "reference to it and call ema_module() again")
        _rebind(target, kind, attr, ema)

    def _refresh(self, target: nn.Module, kind: str, attr: str, source: nn.Module) -> None:
        """A tensor the optimizer does not average takes the model's value, in the shadows' placement."""
        current = getattr(target, kind)[attr]
        model_tensor = getattr(source, kind)[attr]
        value = _placed(self.ema.store, model_tensor, copy=False)
        fresh = value.data_ptr() != model_tensor.data_ptr()  # converted: a copy already
        if kind == "_parameters" and not fresh:  # a frozen param in the shadows' placement: aliased
            if current.data_ptr() != value.data_ptr():
                current.data = value
        elif _same_place(current, value) and current.data_ptr() != model_tensor.data_ptr():
            current.copy_(value)
        else:
            _rebind(target, kind, attr, value if fresh else value.clone())

    def check(self) -> None:
        """Before the module is read (a forward, a state dict): the EMA as of now, or an error."""
        ema = self.ema
        if ema.swapped:
            raise RuntimeError("the EMA module was used inside swap_ema(): there the model holds the EMA and the "
                               "shadows may hold the training weights; use it outside the with-block")
        with torch.no_grad():
            ema.sync()
        self.follow(strict=True)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        self.check()
        self._kept = {j: target._buffers[attr].clone()
                      for j, ((target, kind, attr, _), _) in enumerate(self.aliased)
                      if kind == "_buffers" and target.training}

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        changed = []
        with torch.no_grad():
            for j, kept in self._kept.items():
                (target, _, attr, _), i = self.aliased[j]
                buf = target._buffers[attr]
                if not bitwise_equal(buf, kept):
                    buf.copy_(kept)
                    changed.append(self.ema.names[i])
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
        param = target._parameters[attr]
        assert param is not None, "a slot is a tensor: its caller has read it"
        param.data = ema
    else:
        target._buffers[attr] = ema
