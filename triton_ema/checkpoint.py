"""The EMA's part of a checkpoint: the ``"ema"`` entry of ``state_dict()``, and
every check a load makes before anything changes."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from numbers import Integral
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import Tensor

from .names import by_unwrapped, canonical, rekeyed, unwrapped, wrapper_difference, wrapper_hint
from .schedules import PowerFunction
from .sharding import like, local_value

if TYPE_CHECKING:
    from .ema import EMA


class Checked(NamedTuple):
    """A saved ``"ema"`` entry, checked: what :meth:`EMA.load <triton_ema.ema.EMA.load>` takes."""

    step: int
    skipped: int
    values: list[list[Tensor]]  # [profile][tensor], this rank's values
    run: str | None


def ema_state(ema: EMA) -> dict[str, Any]:
    """The "ema" entry of ``opt.state_dict()``. Names are saved without wrapper prefixes
    (:func:`~triton_ema.names.canonical`), so that a checkpoint of a wrapped model and one of
    the bare model are alike (``torch.distributed.checkpoint`` matches the keys it loads)."""
    ema.adopt_new_params()
    n = ema.num_params
    state: dict[str, Any] = {"step": ema.num_steps, "interval": ema.interval, "skipped_updates": ema.store.skipped()}
    if None in ema.schedules:
        state.update(profile_state(ema, 0))
    else:
        state["profiles"] = {name: profile_state(ema, k) for k, name in enumerate(ema.schedules)}
    if ema.model is not None:
        state["names"] = canonical(ema.names[:n])
    if any(isinstance(s, PowerFunction) for s in ema.schedules.values()):
        state["run"] = ema.run_id  # post-hoc snapshots of a resumed run stay one run
    return state


def profile_state(ema: EMA, profile: int) -> dict[str, dict[Any, Tensor]]:
    """One profile's shadows: ``shadow`` keyed like the optimizer's state, ``buffers`` by name."""
    n, store, objects = ema.num_params, ema.store, ema.tracking.objects
    # Inside swap_ema() the EMA sits in the model until the block ends: copies, so the dict keeps it.
    copy = store.swapped
    shadow = [like(store.ema(i, profile).detach().clone() if copy else store.ema(i, profile).detach(), objects[i])
              for i in range(len(store))]
    return {"shadow": dict(enumerate(shadow[:n])),
            "buffers": dict(zip(canonical(ema.tracking.buffer_names), shadow[n:]))}


def check_load(ema: EMA, state_dict: dict[str, Any], match_names: bool) -> Checked | None:
    """The checked ``"ema"`` entry of an optimizer state dict, or None (with a warning) when it has none."""
    if "ema" in state_dict:
        return check_ema(ema, state_dict["ema"], match_names)
    warnings.warn("state_dict has no 'ema' entry (saved from a bare optimizer?): the optimizer state is "
                  f"loaded and the EMA restarts from the current weights at step {ema.num_steps}", stacklevel=4)
    return None


def check_ema(core: EMA, ema: Any, match_names: bool = True) -> Checked:
    """The step, skip count, shadow values (per profile) and run id of a saved
    ``"ema"`` entry, or an error naming the culprit."""
    if not isinstance(ema, dict):
        raise TypeError(f"state_dict['ema'] must be a dict, got {type(ema).__name__}")
    single = None in core.schedules
    missing = {"step"} | ({"shadow", "buffers"} if single else {"profiles"})
    missing -= ema.keys()
    if missing:
        saved = f"profiles {list(ema['profiles'])}" if isinstance(ema.get("profiles"), dict) else "one unnamed profile"
        ours = "one unnamed profile" if single else f"profiles {list(core.schedules)}"
        raise ValueError(f"state_dict['ema'] lacks {sorted(missing)} (it was saved with {saved}; this EMA has {ours})")
    for key in ("step", "skipped_updates"):
        value = ema.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(f"state_dict['ema']['{key}'] must be a non-negative integer, got {value!r}")
    run = ema.get("run")
    if run is not None and not isinstance(run, str):
        raise TypeError(f"state_dict['ema']['run'] must be a str, got {type(run).__name__}")
    if ema.get("interval", core.interval) != core.interval:
        warnings.warn(f"the checkpoint was saved with interval={ema['interval']}; continuing with "
                      f"interval={core.interval}", stacklevel=4)
    if match_names:
        _check_names(core, ema.get("names"))
    if single:
        values = [_check_profile(core, ema, 0, "state_dict['ema']", match_names)]
    else:
        profiles = ema["profiles"]
        if not isinstance(profiles, dict) or set(profiles) != set(core.schedules):
            held = sorted(profiles) if isinstance(profiles, dict) else type(profiles).__name__
            raise ValueError(f"state_dict['ema']['profiles'] holds {held}; this EMA has profiles "
                             f"{sorted(map(str, core.schedules))}")
        values = [_check_profile(core, profiles[name], k, f"state_dict['ema']['profiles'][{name!r}]", match_names)
                  for k, name in enumerate(core.schedules)]
    return Checked(int(ema["step"]), int(ema.get("skipped_updates", 0)), values, run)

def _check_profile(core: EMA, entry: Any, profile: int, where: str, match_names: bool) -> list[Tensor]:
    """One profile's saved shadows (``shadow`` and ``buffers``), checked, as this rank's values."""
    if not isinstance(entry, dict) or not {"shadow", "buffers"} <= entry.keys():
        raise ValueError(f"{where} must be a dict with 'shadow' and 'buffers'")
    n, store, objects = core.num_params, core.store, core.tracking.objects
    # (key, the saved entries, the keys expected: parameter indices for shadow, buffer names for buffers)
    saved: list[tuple[str, Any, list[Any]]] = [("shadow", entry["shadow"], list(range(n))),
                                               ("buffers", entry["buffers"], core.tracking.buffer_names)]
    values: list[Tensor] = []
    for key, entries, expected in saved:
        if not isinstance(entries, dict):
            raise TypeError(f"{where}['{key}'] must be a dict, got {type(entries).__name__}")
        if key == "buffers" and not match_names and len(entries) == len(expected):
            entries = dict(zip(expected, entries.values()))
        elif key == "buffers":
            entries = rekeyed(entries, expected, f"{where}['buffers']")
        unexpected = [k for k in entries if k not in set(expected)]
        if unexpected:
            raise ValueError(f"{where}['{key}'] has entries this EMA does not track: {unexpected[:5]}"
                             f"{wrapper_hint(str(unexpected[0]), map(str, expected))}")
        for k in expected:
            i = len(values)
            name = store.names[i]
            if k not in entries:
                raise ValueError(f"{where}['{key}'] has no shadow for {name} (key {k!r})")
            value, shadow, target = entries[k], store.shadow_view(i, profile), objects[i]
            if not isinstance(value, Tensor):
                raise TypeError(f"the saved shadow of {name} is a {type(value).__name__}, not a tensor")
            if value.shape != target.shape:
                raise ValueError(f"the saved shadow of {name} has shape {tuple(value.shape)}, "
                                 f"the parameter has {tuple(target.shape)}")
            if value.dtype != shadow.dtype:
                raise ValueError(f"the saved shadow of {name} has dtype {value.dtype}, this EMA keeps "
                                 f"{shadow.dtype} (shadow_dtype=)")
            values.append(value)
    # Shards last: taking a rank's shard of a full or differently sharded value may communicate.
    return [local_value(v, t) for v, t in zip(values, objects)]

def _check_names(core: EMA, saved: Any) -> None:
    """The checkpoint's parameter names, where it has them (and ``model=`` gives ours), are ours
    once wrapper prefixes are removed."""
    if saved is None or core.model is None:
        return  # saved without model=, or before names were saved: matched by position
    ours = core.names[:core.num_params]
    if not isinstance(saved, (list, tuple)) or not all(isinstance(name, str) for name in saved):
        raise TypeError(f"state_dict['ema']['names'] must be a list of parameter names, got {saved!r:.80}")
    for i, (theirs, mine) in enumerate(zip(saved, ours)):
        if theirs != mine and unwrapped(theirs) != unwrapped(mine):
            why = wrapper_difference(theirs, mine) or " (a checkpoint of another model?)"
            raise ValueError(f"the checkpoint's shadow {i} is for {theirs!r}, this model's parameter {i} is {mine!r}"
                             f"{why}; after a deliberate rename, load with match_names=False")
    if len(saved) != len(ours):
        raise ValueError(f"the checkpoint has shadows for {len(saved)} parameters, this optimizer has {len(ours)}")


class EMACheckpoint:
    """A ``Stateful`` view of one EMA's state, for ``torch.distributed.checkpoint``."""

    def __init__(self, ema: EMA) -> None:
        self._ema = ema

    def state_dict(self) -> dict[str, Any]:
        return ema_state(self._ema)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._ema.refuse_while_swapped("loading the EMA checkpoint")
        self._ema.load(*check_ema(self._ema, state_dict))


def averaged_keys(ema: EMA, entries: dict[str, Any]) -> dict[str, int]:
    """Each key of ``model.state_dict(keep_vars=True)`` whose value is an averaged tensor, and its
    index: by identity (the buffers the model holds now), else by name once wrapper prefixes are
    removed, where the shapes agree (a wrapper whose state dict holds copies: FSDP1)."""
    index = ema.tracking.positions()
    out = {key: index[id(value)] for key, value in entries.items() if id(value) in index}
    found, objects = set(out.values()), ema.tracking.objects
    unmatched = by_unwrapped((name, i) for i, name in enumerate(ema.names) if i not in found)
    if not unmatched:
        return out
    for key, value in entries.items():
        match = unmatched.get(unwrapped(key)) if key not in out and isinstance(key, str) else None
        if match is not None and isinstance(value, Tensor) and value.shape == objects[match].shape:
            out[key] = match
    return out


def model_keyed(ema: EMA, name: str | None, what: str) -> Iterator[tuple[str, Any, Tensor | None]]:
    """(key, the model's value, profile ``name``'s EMA of it as stored or None) for ``model.state_dict()``."""
    profile = ema.profile(name)
    if ema.model is None:
        raise RuntimeError(f"{what} needs the model: pass model= to EMAOptimizer")
    ema.adopt_new_params()
    entries = ema.model.state_dict(keep_vars=True)
    index = averaged_keys(ema, entries)
    for key, value in entries.items():
        i = index.get(key)
        yield key, value, None if i is None else ema.store.ema(i, profile)


def snapshot_state(ema: EMA, name: str | None) -> tuple[dict[str, Tensor], set[str]]:
    """Profile ``name``'s EMA keyed like ``model.state_dict()`` without wrapper prefixes
    (:func:`~triton_ema.names.canonical`) in the shadows' dtype (no copy), and the keys that are averaged."""
    entries = list(model_keyed(ema, name, "a post-hoc snapshot"))
    keys = canonical([key for key, _, _ in entries])
    out = {key: value.detach() if e is None else like(e.detach(), value) for key, (_, value, e) in zip(keys, entries)}
    return out, {key for key, (_, _, e) in zip(keys, entries) if e is not None}
