"""A saved ``"ema"`` entry as model-keyed weights: the profile chosen, the shadows
named, and, where the model's own weights are at hand, the entries not averaged
filled in and the EMA cast to the model's dtypes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .names import unwrapped

__all__ = ["Candidate", "Found", "choose_profile", "completed", "is_ema_entry", "keyed_weights", "mapping_candidate"]


class Candidate(NamedTuple):
    """Where the model's weights may be: their names (unwrapped; None until loaded) and how to load them."""

    keys: frozenset[str] | None
    load: Callable[[], Mapping[str, Tensor]]


class Found(NamedTuple):
    """What a checkpoint holds: its ``"ema"`` entry, the optimizer's ``param_groups`` (for naming by position),
    where it was found (for errors), and the candidates for the model's weights; the first that holds every
    name the EMA has is used, and with ``complete`` one must."""

    ema: Mapping[str, Any]
    param_groups: Sequence[Mapping] | None
    where: str
    models: Sequence[Candidate]
    complete: bool = False


def is_ema_entry(d: Any) -> bool:
    return isinstance(d, Mapping) and "step" in d and ("shadow" in d or "profiles" in d)


def mapping_candidate(weights: Mapping[str, Tensor]) -> Candidate:
    return Candidate(frozenset(unwrapped(str(k)) for k in weights), lambda: weights)


def choose_profile(profiles: Sequence[str] | None, profile: str | None, where: str) -> str | None:
    """The profile to read: ``profile``, or the only one; None for a checkpoint of one unnamed profile."""
    if profiles is None:
        if profile is not None:
            raise ValueError(f"no EMA profile named {profile!r}: {where} has one unnamed profile (call without "
                             "profile=)")
        return None
    if profile is None:
        if len(profiles) != 1:
            raise ValueError(f"{where} has several EMA profiles {list(profiles)}: pass profile= the one you want")
        return profiles[0]
    if profile not in profiles:
        raise ValueError(f"no EMA profile named {profile!r}; the profiles of {where} are {list(profiles)}")
    return profile


def keyed_weights(found: Found, profile: str | None, model: nn.Module | None) -> dict[str, Tensor]:
    """The EMA of ``found`` keyed like the unwrapped model's state dict (see ``load_ema_weights``)."""
    entry, where = found.ema, found.where
    if "profiles" in entry:
        profiles = entry["profiles"]
        if not isinstance(profiles, Mapping):
            raise TypeError(f"{where}: the EMA's 'profiles' must be a dict, got {type(profiles).__name__}")
        entry = profiles[choose_profile([str(k) for k in profiles], profile, where)]
    else:
        choose_profile(None, profile, where)
    shadow, buffers = entry.get("shadow"), entry.get("buffers", {})
    if not isinstance(shadow, Mapping) or not isinstance(buffers, Mapping):
        raise ValueError(f"{where}: the EMA entry has no 'shadow' and 'buffers' dicts")
    order = sorted(shadow, key=_index(where))
    if [_index(where)(k) for k in order] != list(range(len(order))):
        raise ValueError(f"{where}: the EMA's shadows are keyed {order[:5]}..., not 0 to {len(order) - 1}")
    names = found.ema.get("names")
    if names is None:
        names = _names_by_position(found, [shadow[k] for k in order], model)
    elif not isinstance(names, Sequence) or len(names) != len(order) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: the EMA's 'names' must list the {len(order)} parameter names, got {names!r:.80}")
    ema = {}
    for name, value in [*zip(names, (shadow[k] for k in order)), *buffers.items()]:
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: the EMA of {name} is a {type(value).__name__}, not a tensor")
        if unwrapped(name) in ema:
            raise ValueError(f"{where}: two shadows are for {unwrapped(name)!r} once wrapper prefixes are removed")
        ema[unwrapped(name)] = value
    candidates = [mapping_candidate(model.state_dict())] if model is not None else found.models
    return _completed(ema, candidates, found, model is not None)


def completed(weights: Mapping[str, Tensor], model: nn.Module | None, where: str) -> dict[str, Tensor]:
    """Model-keyed EMA weights a reader of its own returned, as :func:`keyed_weights` finishes them: names
    unwrapped, and with ``model`` its other entries filled in and its dtypes taken; copies."""
    ema = {unwrapped(k): v for k, v in weights.items()}
    candidates = [mapping_candidate(model.state_dict())] if model is not None else []
    return _completed(ema, candidates, Found({}, None, where, ()), model is not None)


def _index(where: str) -> Callable[[Any], int]:
    def index(key: Any) -> int:
        try:
            return int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: the EMA's shadows must be keyed by position, got {key!r}") from None
    return index


def _names_by_position(found: Found, shadows: list[Any], model: nn.Module | None) -> list[str]:
    """Names for the shadows of a checkpoint saved without ``model=``: the model's parameters, in order, where
    the optimizer had one group of exactly those parameters (shapes checked)."""
    where = found.where
    if model is None:
        raise ValueError(f"{where}: the EMA was saved without parameter names (EMAOptimizer or attach without "
                         "model=), so its shadows are known only by their place in the optimizer: pass model= (the "
                         "model the optimizer was built from) to name them by position, or save with model=")
    groups = found.param_groups
    params = list(model.named_parameters())
    if groups is None or len(groups) != 1 or not len(groups[0].get("params", ())) == len(params) == len(shadows):
        count = "unknown" if groups is None else len(groups)
        raise ValueError(f"{where}: the EMA has no parameter names, and its optimizer's {count} param groups are not "
                         f"one group of the model's {len(params)} parameters: which shadow is which parameter is "
                         "unknown (save with model= to name them)")
    for (name, p), s in zip(params, shadows):
        if isinstance(s, Tensor) and s.shape != p.shape:
            raise ValueError(f"{where}: the EMA has no parameter names, and by position its shadow for {name} has "
                             f"shape {tuple(s.shape)}, the parameter {tuple(p.shape)}: not the optimizer of this "
                             "model's parameters in order")
    return [name for name, _ in params]


def _completed(ema: dict[str, Tensor], candidates: Sequence[Candidate], found: Found,
               given: bool) -> dict[str, Tensor]:
    """The model's state dict with the EMA in place of what is averaged, or the EMA alone; copies."""
    for candidate in candidates:
        if candidate.keys is not None and not ema.keys() <= candidate.keys:
            continue
        weights = {unwrapped(str(k)): v for k, v in candidate.load().items()}
        if ema.keys() <= weights.keys():
            return _filled(ema, weights, found.where)
    if given or found.complete:
        keys = set().union(*(c.keys or c.load().keys() for c in candidates)) if candidates else set()
        missing = sorted(k for k in ema if k not in {unwrapped(str(x)) for x in keys})
        whose = "the model given lacks" if given else "the model's weights it holds lack"
        raise ValueError(f"{found.where}: the EMA has entries {missing[:5]} that {whose} ({len(missing)} missing; "
                         "a checkpoint of another model?)")
    return {k: _copy(v, v.dtype) for k, v in ema.items()}


def _filled(ema: dict[str, Tensor], weights: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    # Tied weights: a key whose tensor shares its storage with an averaged one (torch.save keeps such sharing).
    averaged = {_identity(weights[k]): k for k in ema if isinstance(weights[k], Tensor) and weights[k].numel()}
    out = {}
    for key, value in weights.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: the model's entry {key} is a {type(value).__name__}, not a tensor")
        source = key if key in ema else averaged.get(_identity(value)) if value.numel() else None
        if source is None:
            out[key] = _copy(value, value.dtype)
            continue
        if ema[source].shape != value.shape:
            raise ValueError(f"{where}: the EMA of {key} has shape {tuple(ema[source].shape)}, the model's "
                             f"{tuple(value.shape)}")
        out[key] = _copy(ema[source], value.dtype)
    return out


def _identity(t: Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype


def _copy(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
