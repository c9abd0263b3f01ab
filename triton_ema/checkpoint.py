"""The EMA's part of a checkpoint: the ``"ema"`` entry of ``state_dict()``, and
every check a load makes before anything changes."""

from __future__ import annotations

import warnings
from numbers import Integral
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import Tensor

from . import sharding
from .schedules import PowerFunction

if TYPE_CHECKING:
    from .optimizer import EMAOptimizer


class Checked(NamedTuple):
    """A saved ``"ema"`` entry, checked: what :meth:`EMAOptimizer._load_ema` takes."""

    step: int
    skipped: int
    values: list[list[Tensor]]  # [profile][tensor], this rank's values
    run: str | None


def ema_state(opt: EMAOptimizer) -> dict[str, Any]:
    """The "ema" entry of ``opt.state_dict()``."""
    opt._adopt_new_params()
    n = opt._tracking.num_params
    state = {"step": opt.num_steps, "interval": opt.interval, "skipped_updates": opt._store.skipped()}
    if None in opt.schedules:
        state.update(profile_state(opt, 0))
    else:
        state["profiles"] = {name: profile_state(opt, k) for k, name in enumerate(opt.schedules)}
    if opt.model is not None:
        state["names"] = opt._store.names[:n]
    if any(isinstance(s, PowerFunction) for s in opt.schedules.values()):
        state["run"] = opt.run_id  # post-hoc snapshots of a resumed run stay one run
    return state


def profile_state(opt: EMAOptimizer, profile: int) -> dict[str, dict]:
    """One profile's shadows: ``shadow`` keyed like the optimizer's state, ``buffers`` by name."""
    n = opt._tracking.num_params
    # Inside swap_ema() the EMA sits in the model until the block ends: copies, so the dict keeps it.
    copy = opt._store.swapped
    shadow = [sharding.like(opt._store.ema(i, profile).detach().clone() if copy
                            else opt._store.ema(i, profile).detach(), opt._tracking.objects[i])
              for i in range(len(opt._store))]
    return {"shadow": dict(enumerate(shadow[:n])),
            "buffers": {name: shadow[n + j] for j, (_, _, name) in enumerate(opt._tracking.buffer_slots)}}


def check_load(opt: EMAOptimizer, state_dict: dict[str, Any], match_names: bool) -> Checked | None:
    """The checked ``"ema"`` entry of an optimizer state dict, or None (with a warning) when it has none."""
    if "ema" in state_dict:
        return check_ema(opt, state_dict["ema"], match_names)
    warnings.warn("state_dict has no 'ema' entry (saved from a bare optimizer?): the optimizer state is "
                  f"loaded and the EMA restarts from the current weights at step {opt.num_steps}", stacklevel=4)
    return None


def check_ema(opt: EMAOptimizer, ema: Any, match_names: bool = True) -> Checked:
    """The step, skip count, shadow values (per profile) and run id of a saved
    ``"ema"`` entry, or an error naming the culprit."""
    if not isinstance(ema, dict):
        raise TypeError(f"state_dict['ema'] must be a dict, got {type(ema).__name__}")
    single = None in opt.schedules
    missing = {"step"} | ({"shadow", "buffers"} if single else {"profiles"})
    missing -= ema.keys()
    if missing:
        saved = f"profiles {list(ema['profiles'])}" if isinstance(ema.get("profiles"), dict) else "one unnamed profile"
        ours = "one unnamed profile" if single else f"profiles {list(opt.schedules)}"
        raise ValueError(f"state_dict['ema'] lacks {sorted(missing)} (it was saved with {saved}; this EMA has {ours})")
    for key in ("step", "skipped_updates"):
        value = ema.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(f"state_dict['ema']['{key}'] must be a non-negative integer, got {value!r}")
    run = ema.get("run")
    if run is not None and not isinstance(run, str):
        raise TypeError(f"state_dict['ema']['run'] must be a str, got {type(run).__name__}")
    if ema.get("interval", opt.interval) != opt.interval:
        warnings.warn(f"the checkpoint was saved with interval={ema['interval']}; continuing with "
                      f"interval={opt.interval}", stacklevel=4)
    if match_names:
        _check_names(opt, ema.get("names"))
    if single:
        values = [_check_profile(opt, ema, 0, "state_dict['ema']", match_names)]
    else:
        profiles = ema["profiles"]
        if not isinstance(profiles, dict) or set(profiles) != set(opt.schedules):
            saved = sorted(profiles) if isinstance(profiles, dict) else type(profiles).__name__
            raise ValueError(f"state_dict['ema']['profiles'] holds {saved}; this EMA has profiles "
                             f"{sorted(opt.schedules)}")
        values = [_check_profile(opt, profiles[name], k, f"state_dict['ema']['profiles'][{name!r}]", match_names)
                  for k, name in enumerate(opt.schedules)]
    return Checked(int(ema["step"]), int(ema.get("skipped_updates", 0)), values, run)

def _check_profile(opt: EMAOptimizer, entry: Any, profile: int, where: str, match_names: bool) -> list[Tensor]:
    """One profile's saved shadows (``shadow`` and ``buffers``), checked, as this rank's values."""
    if not isinstance(entry, dict) or not {"shadow", "buffers"} <= entry.keys():
        raise ValueError(f"{where} must be a dict with 'shadow' and 'buffers'")
    n = opt._tracking.num_params
    saved = [("shadow", entry["shadow"], list(range(n))),
             ("buffers", entry["buffers"], opt._tracking.buffer_names)]
    values = []
    for key, entries, expected in saved:
        if not isinstance(entries, dict):
            raise TypeError(f"{where}['{key}'] must be a dict, got {type(entries).__name__}")
        if key == "buffers" and not match_names and len(entries) == len(expected):
            entries = dict(zip(expected, entries.values()))
        unexpected = [k for k in entries if k not in set(expected)]
        if unexpected:
            raise ValueError(f"{where}['{key}'] has entries this EMA does not track: {unexpected[:5]}")
        for k in expected:
            i = len(values)
            name = opt._store.names[i]
            if k not in entries:
                raise ValueError(f"{where}['{key}'] has no shadow for {name} (key {k!r})")
            value, shadow, target = entries[k], opt._store.shadow_view(i, profile), opt._tracking.objects[i]
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
    return [sharding.local_value(v, t) for v, t in zip(values, opt._tracking.objects)]

def _check_names(opt: EMAOptimizer, saved: Any) -> None:
    """The checkpoint's parameter names, where it has them (and ``model=`` gives ours), are ours."""
    if saved is None or opt.model is None:
        return  # saved without model=, or before names were saved: matched by position
    ours = opt._store.names[:opt._tracking.num_params]
    if not isinstance(saved, (list, tuple)) or not all(isinstance(name, str) for name in saved):
        raise TypeError(f"state_dict['ema']['names'] must be a list of parameter names, got {saved!r:.80}")
    for i, (theirs, mine) in enumerate(zip(saved, ours)):
        if theirs != mine:
            raise ValueError(f"the checkpoint's shadow {i} is for {theirs!r}, this model's parameter {i} is {mine!r} "
                             "(a checkpoint of another model?); after a deliberate rename, load with "
                             "match_names=False")
    if len(saved) != len(ours):
        raise ValueError(f"the checkpoint has shadows for {len(saved)} parameters, this optimizer has {len(ours)}")


class EMACheckpoint:
    """A ``Stateful`` view of one wrapper's EMA state, for ``torch.distributed.checkpoint``."""

    def __init__(self, opt: EMAOptimizer) -> None:
        self._opt = opt

    def state_dict(self) -> dict[str, Any]:
        return ema_state(self._opt)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._opt._refuse_while_swapped("loading the EMA checkpoint")
        self._opt._load_ema(*check_ema(self._opt, state_dict))


def model_keyed(opt: EMAOptimizer, name: str | None, what: str):
    """(key, the model's value, profile ``name``'s EMA of it as stored or None) for ``model.state_dict()``."""
    profile = opt._profile(name)
    if opt.model is None:
        raise RuntimeError(f"{what} needs the model: pass model= to EMAOptimizer")
    opt._adopt_new_params()
    index = opt._tracking.positions()
    for key, value in opt.model.state_dict(keep_vars=True).items():
        i = index.get(id(value))
        yield key, value, None if i is None else opt._store.ema(i, profile)


def snapshot_state(opt: EMAOptimizer, name: str | None) -> tuple[dict[str, Tensor], set[str]]:
    """Profile ``name``'s EMA keyed like ``model.state_dict()`` in the shadows' dtype (no copy),
    and the keys that are averaged."""
    entries = list(model_keyed(opt, name, "a post-hoc snapshot"))
    out = {key: value.detach() if ema is None else sharding.like(ema.detach(), value) for key, value, ema in entries}
    return out, {key for key, _, ema in entries if ema is not None}
