"""What the user gives ``EMAOptimizer``: every argument checked, naming the culprit, and
what is averaged found (parameter names, floating buffers)."""

from __future__ import annotations

import warnings
from numbers import Integral
from typing import Any

import torch
from torch import Tensor, nn

from .backends import BACKENDS
from .schedules import Constant, Schedule, momentum_at, profile_schedules

SHADOW_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_arguments(param_groups: list[dict], momentum: Any, decay: Any, interval: Any, model: Any,
                    update_buffers: bool, shadow_dtype: Any, device: Any,
                    backend: Any) -> tuple[dict[str | None, Schedule], torch.device | None]:
    """The EMA profiles' schedules and the shadows' device, or an error naming the bad argument."""
    schedules = check_momentum(momentum, decay)
    for profile, schedule in schedules.items():
        warn_if_decay_like(schedule, decay is not None, profile)
    if isinstance(interval, bool) or not isinstance(interval, Integral) or interval < 1:
        raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if update_buffers and model is None:
        raise ValueError("update_buffers=True needs model= (the module whose buffers to average)")
    if model is not None and not shares_params(model, param_groups):
        raise ValueError(f"model= ({type(model).__name__}) shares no parameter with the optimizer (a copy of the "
                         "model?); pass the module whose parameters the optimizer updates")
    if shadow_dtype is not None and shadow_dtype not in SHADOW_DTYPES:
        raise TypeError(f"shadow_dtype must be one of {SHADOW_DTYPES} or None, got {shadow_dtype!r}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device must name a torch device, got {device!r}") from err
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return schedules, device


def check_params(params: list[Tensor], names: list[str]) -> None:
    """Every averaged parameter is floating point and listed once."""
    seen: dict[int, str] = {}  # id(param) -> its name
    for p, name in zip(params, names):
        if not p.is_floating_point():
            raise TypeError(f"{name} has dtype {p.dtype}; only floating-point parameters can be averaged")
        if id(p) in seen:  # a swap would exchange it twice, i.e. not at all
            raise ValueError(f"{name} is the same tensor as {seen[id(p)]}; list each parameter once")
        seen[id(p)] = name


def param_names(param_groups: list[dict], model: nn.Module | None) -> list[str]:
    """Each parameter's name in ``model``, or its place in the optimizer's groups."""
    known = {id(p): name for name, p in model.named_parameters()} if model is not None else {}
    return [known.get(id(p), f"param_groups[{g}]['params'][{i}]")
            for g, group in enumerate(param_groups) for i, p in enumerate(group["params"])]


def find_buffers(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(module, attribute, name) of every floating buffer in the model's state_dict."""
    slots, seen = [], set()
    for prefix, module in model.named_modules():
        for attr, buf in module._buffers.items():
            persistent = attr not in module._non_persistent_buffers_set
            if buf is not None and buf.is_floating_point() and persistent and id(buf) not in seen:
                seen.add(id(buf))
                slots.append((module, attr, f"{prefix}.{attr}" if prefix else attr))
    return slots


def warn_if_decay_like(schedule: Schedule, given_as_decay: bool, profile: str | None = None) -> None:
    """A constant momentum above 0.5 is nearly always a decay passed as momentum (mmengine warns too)."""
    if not isinstance(schedule, Constant) or schedule.momentum <= 0.5:
        return
    m = schedule.momentum
    which = "" if profile is None else f" (profile {profile!r})"
    if given_as_decay:
        hint = f"decay={1 - m:g} is momentum {m:g}; if you meant a momentum of {1 - m:g}, pass momentum={1 - m:g}"
    elif m == 1:
        hint = ("momentum=1 is the weight of the new parameters: every update copies them, so the EMA is the "
                "weights themselves (a decay of 1, an EMA that never moves, is not an EMA)")
        warnings.warn(hint + which, UserWarning, stacklevel=5)
        return
    else:
        hint = (f"momentum={m:g} is the weight of the new parameters; if you meant a decay (timm, torch_ema, "
                f"diffusers), pass decay={m:g} (momentum = 1 - decay)")
    warnings.warn(f"{hint}: with momentum {m:g} each update keeps only {1 - m:g} of the EMA, which then nearly "
                  f"copies the weights{which}", UserWarning, stacklevel=5)


def shares_params(model: nn.Module, param_groups: list[dict]) -> bool:
    """The model has no parameters, or at least one of them is in the param groups."""
    ours = {id(p) for group in param_groups for p in group["params"]}
    params = list(model.parameters())
    return not params or any(id(p) in ours for p in params)


def check_momentum(momentum: Any, decay: Any, *, given_to: str | None = None) -> dict[str | None, Schedule]:
    """The EMA profiles' schedules of ``momentum`` / ``decay``, each evaluated at t = 0, or an error naming the
    culprit; ``given_to`` names the front end whose arguments they were (its own names for them)."""
    try:
        schedules = profile_schedules(momentum, decay)
        check_schedules(schedules)
    except (TypeError, ValueError) as err:
        if given_to is None:
            raise
        raise type(err)(f"{given_to}: {err}") from None
    return schedules


def check_schedules(schedules: dict[str | None, Schedule]) -> None:
    """Each profile's schedule is no module (a model passed where the momentum goes: a module is callable) and
    gives a momentum in [0, 1] at t = 0: a schedule that raises or leaves [0, 1] there fails now, not in step()."""
    for profile, schedule in schedules.items():
        which = "momentum" if profile is None else f"EMA profile {profile!r}: momentum"
        if isinstance(schedule, nn.Module):
            raise TypeError(f"{which} is an nn.Module ({type(schedule).__name__}), not a float or a schedule; "
                            "pass the model as model= (EMAOptimizer(optimizer, momentum, model=model))")
        try:
            momentum_at(schedule, 0)
        except (TypeError, ValueError) as err:
            if profile is None:
                raise
            raise type(err)(f"EMA profile {profile!r}: {err}") from None
