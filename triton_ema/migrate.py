"""Bring an EMA kept by another library into :class:`EMAOptimizer`.

``opt.load_ema_state_dict(state_dict, num_steps=n)`` takes a model-keyed
dict, as ``model.state_dict()`` or ``opt.ema_state_dict()`` key it; keys
match the model's once wrapper prefixes (``module.``, ``_orig_mod.``, ...)
are removed, so a dict of the bare model loads into a wrapped one and the
reverse. Most
libraries hold one already (timm's ``model_ema.module.state_dict()``,
ema-pytorch's ``ema.ema_model.state_dict()``, the ``"state_dict"`` of an
mmengine checkpoint saved with its ``EMAHook``); the functions here convert
the other formats:

- :func:`from_shadow_params`: a list in ``model.parameters()`` order
  (``torch_ema``'s and diffusers' ``state_dict()["shadow_params"]``);
- :func:`strip_prefix`: the entries under a prefix (mmengine's live
  ``hook.ema_model.state_dict()``, ``"module."``; ema-pytorch's
  ``ema.state_dict()``, ``"ema_model."``);
- :func:`from_mmcv`: mmcv 1.x ``EMAHook``'s ``ema_*`` buffers in the model's
  state dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

from .checkpoint import averaged_keys
from .names import rekeyed, unwrapped, wrapper_hint
from .sharding import local_value

if TYPE_CHECKING:
    from .ema import EMA

__all__ = ["from_mmcv", "from_shadow_params", "strip_prefix"]


def from_shadow_params(shadow_params: Sequence[Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Name a list of EMA tensors in ``model.parameters()`` order by the model's parameter names.

    Args:
        shadow_params: The EMA tensors, one per parameter, in ``model.parameters()``
            order (``torch_ema``'s and diffusers' ``state_dict()["shadow_params"]``).
        model: The model they average.

    Returns:
        A dict keyed like ``model.state_dict()`` (parameters only).

    Raises:
        ValueError: The list's length differs from the model's parameter count.
    """
    names = [name for name, _ in model.named_parameters()]
    if len(shadow_params) != len(names):
        raise ValueError(f"shadow_params holds {len(shadow_params)} tensors, the model has {len(names)} parameters")
    return dict(zip(names, shadow_params))


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries whose key starts with ``prefix``, with the prefix removed; others are dropped.

    Args:
        state_dict: A state dict (ema-pytorch's ``ema.state_dict()``, mmengine's
            live ``hook.ema_model.state_dict()``, ``AveragedModel``'s).
        prefix: The prefix, e.g. ``"ema_model."`` or ``"module."``.

    Returns:
        The entries under ``prefix``, renamed.

    Raises:
        ValueError: No key starts with ``prefix`` (the error shows the first keys).
    """
    out = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not out:
        raise ValueError(f"no key of the state dict starts with {prefix!r} (first keys: {list(state_dict)[:3]})")
    return out


def from_mmcv(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The EMA mmcv 1.x's ``EMAHook`` keeps in a model's state dict, keyed by parameter name.

    mmcv 1.x ``EMAHook`` keeps the EMA of parameter ``a.b`` in the buffer ``ema_a_b``
    (``a.b`` as the unwrapped model names it: the hook reads the module inside a
    DDP wrapper).

    Args:
        state_dict: The checkpoint's ``"state_dict"`` (with the ``ema_*`` buffers).
        model: The model without those buffers.

    Returns:
        A dict keyed like ``model.state_dict()`` (parameters only).

    Raises:
        ValueError: A parameter has no ``ema_*`` buffer (naming the first).
    """
    out, missing = {}, []
    buffers = {unwrapped(str(k)): v for k, v in state_dict.items()}  # also a wrapped model's state dict
    for name, _ in model.named_parameters():
        key = "ema_" + unwrapped(name).replace(".", "_")
        if key in buffers:
            out[name] = buffers[key]
        else:
            missing.append(key)
    if missing:
        raise ValueError(f"the state dict has no mmcv EMA buffer {missing[0]!r} ({len(missing)} missing)")
    return out


def checked_values(ema: EMA, state_dict: Mapping[str, Tensor]) -> list[Tensor]:
    """The value for every tensor ``ema`` averages, from a model-keyed dict, in the
    store's order; or an error naming the culprit. Nothing is changed here."""
    if ema.model is None:
        raise RuntimeError("load_ema_state_dict() needs the model: pass model= to EMAOptimizer")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict keyed like model.state_dict(), got {type(state_dict).__name__}")
    model_entries = ema.model.state_dict(keep_vars=True)
    state_dict = rekeyed(state_dict, model_entries, "the EMA state dict")  # names match without wrapper prefixes
    unknown = [key for key in state_dict if key not in model_entries]
    if unknown:
        why = wrapper_hint(str(unknown[0]), model_entries) or f" (the model's first are {list(model_entries)[:3]})"
        raise ValueError(f"the EMA state dict has entries the model does not: {unknown[:5]}{why}")
    index = averaged_keys(ema, model_entries)
    objects = ema.tracking.objects
    values: list[Tensor | None] = [None] * len(objects)
    for name, target in model_entries.items():
        i = index.get(name)
        if i is None:
            continue  # not averaged: the model's own business
        if name not in state_dict:
            raise ValueError(f"the EMA state dict has no entry for {name}, which this EMA averages")
        value, shadow = state_dict[name], ema.store.shadow_view(i)
        if not isinstance(value, Tensor):
            raise TypeError(f"the EMA of {name} is a {type(value).__name__}, not a tensor")
        if value.shape != target.shape:
            raise ValueError(f"the EMA of {name} has shape {tuple(value.shape)}, the model's has {tuple(target.shape)}")
        if value.dtype not in (target.dtype, shadow.dtype):
            raise ValueError(f"the EMA of {name} has dtype {value.dtype}; expected the model's {target.dtype} "
                             f"or the shadow's {shadow.dtype}")
        values[i] = value
    present = [v for v in values if v is not None]
    if len(present) < len(values):
        absent = [ema.names[i] for i, v in enumerate(values) if v is None]
        raise ValueError(f"{absent[0]} is averaged but not in model.state_dict(): its EMA cannot be named")
    return [local_value(v, t) for v, t in zip(present, objects)]
