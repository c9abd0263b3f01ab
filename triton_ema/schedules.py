"""Momentum schedules: pure functions of the 0-based optimizer step ``t``.

Each schedule is a frozen dataclass holding only its settings, so a resumed
run gets the same momentum at the same step with nothing extra to save.
Momentum is the weight of the new parameters: ``shadow += m * (param - shadow)``
(``m = 1 - decay``).

Every built-in schedule also evaluates on the device: ``schedule.on_device(t)``
takes an int64 step tensor and returns the momentum as a float32 tensor beside
it, with tensor ops only (no host sync), so that a captured CUDA graph advances
the schedule at every replay (see :func:`device_schedule`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch

from .formulas import Formula, device_schedule

__all__ = [
    "Constant", "Warmup", "Cosine", "Power", "Ramp", "MomentumAnnealing",
    "CopyUntil", "HoldUntil", "Recount", "Max", "Min",
    "PowerFunction", "Schedule", "as_schedule", "momentum_at", "device_schedule", "profile_schedules",
]

Schedule = Callable[[int], float]
"""A momentum schedule: any callable ``t -> momentum`` of the 0-based optimizer step ``t``.

Its value must lie in ``[0, 1]`` (NaN is an error, naming the step and the value).
The built-in schedules are frozen dataclasses, and also evaluate on the device
(``on_device``) for ``capturable=True``."""


def _check_unit(name: str, value: float, *, allow_zero: bool) -> float:
    value = float(value)
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value <= 1.0):  # also rejects NaN
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def _check_count(name: str, value: int, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, Real) or int(value) != value or value < low:
        kind = "a non-negative integer" if low == 0 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def _check_warm_up(warm_up: int) -> int:
    return _check_count("warm_up", warm_up)


def _check_schedule(name: str, schedule: Schedule) -> Schedule:
    if not callable(schedule):
        raise TypeError(f"{name} must be a schedule (a callable step -> momentum), got {type(schedule).__name__}")
    return schedule


def _warm_up_ramp(t, warm_up: int):
    """mmcv's ramp ``(1 + t) / (warm_up + t)``, for ``warm_up > 0`` (0 means no ramp)."""
    return (1 + t) / (warm_up + t)


@dataclass(frozen=True)
class Constant(Formula):
    """The same momentum at every step (mmengine, NeMo, ``AveragedModel``).

    Args:
        momentum: The momentum, in ``(0, 1]``.
    """

    momentum: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "momentum", _check_unit("momentum", self.momentum, allow_zero=False))

    def _momentum(self, t, xp):
        return self.momentum


@dataclass(frozen=True)
class Warmup(Formula):
    """mmcv ``EMAHook``: ``min(momentum, (1 + t) / (warm_up + t))``.

    Bit-exact with mmcv, whose ramp only ever *lowers* the momentum (the EMA
    moves more slowly at first). It is a no-op, the same momentum at every
    step as ``Constant(momentum)``, whenever ``momentum <= 1 / warm_up`` (the
    ramp starts at ``1 / warm_up`` and grows), e.g. ``Warmup(2e-4, 100)``. For
    a warm-up that forgets the random initial weights fast, see :class:`Ramp`,
    :class:`Power`, :class:`CopyUntil` and :class:`Max`.

    Args:
        momentum: The momentum after the ramp, in ``(0, 1]``.
        warm_up: The ramp's length parameter, an integer >= 0 (0: no ramp).
    """

    momentum: float
    warm_up: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "momentum", _check_unit("momentum", self.momentum, allow_zero=False))
        object.__setattr__(self, "warm_up", _check_warm_up(self.warm_up))

    def _momentum(self, t, xp):
        return self.momentum if self.warm_up == 0 else xp.min(_warm_up_ramp(t, self.warm_up), self.momentum)


@dataclass(frozen=True)
class Cosine(Formula):
    """mmpretrain ``CosineEMA``: momentum goes from ``momentum`` to
    ``end_momentum`` along a half cosine over ``total_steps`` steps, then stays.

    The momentum at step t is ``e - (e - m) * (cos(pi * t / K) + 1) / 2`` with
    ``K = total_steps`` and t clipped to K. With ``warm_up > 0`` it is also
    capped by the :class:`Warmup` ramp (the min of the two).

    Args:
        momentum: The momentum at t = 0, in ``[0, 1]``.
        end_momentum: The momentum from t = ``total_steps`` on, in ``[0, 1]``
            (0: the EMA stops moving at the end).
        total_steps: The cosine's length in optimizer steps, a positive integer
            (required).
        warm_up: The :class:`Warmup` ramp's length, an integer >= 0 (0: none).
    """

    momentum: float = 0.004
    end_momentum: float = 0.0
    total_steps: int | None = None
    warm_up: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "momentum", _check_unit("momentum", self.momentum, allow_zero=True))
        object.__setattr__(self, "end_momentum", _check_unit("end_momentum", self.end_momentum, allow_zero=True))
        steps = self.total_steps
        if steps is None or isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {self.total_steps!r}")
        object.__setattr__(self, "total_steps", int(steps))
        object.__setattr__(self, "warm_up", _check_warm_up(self.warm_up))

    def _momentum(self, t, xp):
        k = self.total_steps
        m, e = self.momentum, self.end_momentum
        cosine = e - (e - m) * (xp.cos(math.pi * xp.min(t, k) / k) + 1) / 2
        return cosine if self.warm_up == 0 else xp.min(cosine, _warm_up_ramp(t, self.warm_up))


@dataclass(frozen=True)
class Power(Formula):
    """Power-law warm-up of timm ``ModelEmaV3``, ema-pytorch and diffusers:
    ``decay_t = clamp(1 - (1 + t / inv_gamma) ** -power, min_decay, decay)``,
    momentum ``1 - decay_t``. ``power=2/3`` suits long runs, ``3/4`` short ones.

    Args:
        decay: The largest decay (the smallest momentum is ``1 - decay``), in
            ``[0, 1)``.
        inv_gamma: The warm-up's time scale, > 0.
        power: The warm-up's exponent, > 0.
        min_decay: The smallest decay (the largest momentum is
            ``1 - min_decay``), at most ``decay``.
    """

    decay: float = 0.9999
    inv_gamma: float = 1.0
    power: float = 2 / 3
    min_decay: float = 0.0

    def __post_init__(self) -> None:
        decay = _check_unit("decay", self.decay, allow_zero=True)
        min_decay = _check_unit("min_decay", self.min_decay, allow_zero=True)
        if decay >= 1.0:
            raise ValueError(f"decay must be < 1 (a momentum of 0 never moves the EMA), got {decay}")
        if min_decay > decay:
            raise ValueError(f"min_decay ({min_decay}) must not exceed decay ({decay})")
        if not float(self.inv_gamma) > 0:
            raise ValueError(f"inv_gamma must be > 0, got {self.inv_gamma}")
        if not float(self.power) > 0:
            raise ValueError(f"power must be > 0, got {self.power}")
        settings = {"decay": decay, "min_decay": min_decay, "inv_gamma": float(self.inv_gamma), "power": float(self.power)}
        for name, value in settings.items():
            object.__setattr__(self, name, value)

    def _momentum(self, t, xp):
        decay_t = 1.0 - (1.0 + t / self.inv_gamma) ** -self.power
        return 1.0 - xp.min(xp.max(decay_t, self.min_decay), self.decay)


@dataclass(frozen=True)
class Ramp(Formula):
    """The TensorFlow decay ramp of ``torch_ema`` and diffusers (without
    ``use_ema_warmup``): ``decay_t = clamp((1 + t) / (10 + t), min_decay, decay)``,
    momentum ``1 - decay_t``. It starts at momentum 0.9 and falls like
    ``9 / (10 + t)`` until it reaches ``1 - decay``; ``decay=1`` (the default)
    leaves the ramp uncapped, to combine with another schedule by :class:`Max`.

    The libraries evaluate it at their own counter, not at this library's
    ``t``: ``torch_ema`` at the number of updates including the current one
    (``Recount(Ramp(d), start=1)``), diffusers at the steps after
    ``update_after_step`` (``CopyUntil(Ramp(d), update_after_step)``).

    Args:
        decay: The largest decay, in ``[0, 1]``; 1 leaves the ramp uncapped.
        min_decay: The smallest decay, in ``[0, 1]``, at most ``decay``.
    """

    decay: float = 1.0
    min_decay: float = 0.0

    def __post_init__(self) -> None:
        decay = _check_unit("decay", self.decay, allow_zero=True)
        min_decay = _check_unit("min_decay", self.min_decay, allow_zero=True)
        if min_decay > decay:
            raise ValueError(f"min_decay ({min_decay}) must not exceed decay ({decay})")
        object.__setattr__(self, "decay", decay)
        object.__setattr__(self, "min_decay", min_decay)

    def _momentum(self, t, xp):
        return 1.0 - xp.max(xp.min((1 + t) / (10 + t), self.decay), self.min_decay)


@dataclass(frozen=True)
class MomentumAnnealing(Formula):
    """mmengine ``MomentumAnnealingEMA``: ``max(momentum, gamma / (gamma + t))``.
    The first update (t = 0) copies the weights; the momentum then falls like
    ``gamma / (gamma + t)`` until it reaches ``momentum``. mmengine's ``t``
    counts optimizer steps (every ``update_parameters`` call, updating or not).

    Args:
        momentum: The smallest momentum, in ``(0, 1]``.
        gamma: The annealing's time scale, a finite number > 0.
    """

    momentum: float = 2e-4
    gamma: float = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "momentum", _check_unit("momentum", self.momentum, allow_zero=False))
        gamma = self.gamma
        if isinstance(gamma, bool) or not isinstance(gamma, Real) or not gamma > 0 or math.isinf(gamma):
            raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")

    def _momentum(self, t, xp):
        return xp.max(self.gamma / (self.gamma + t), self.momentum)


@dataclass(frozen=True)
class _Until:
    """A schedule and the step where it takes over, both checked."""

    schedule: Schedule
    step: int = 0

    def __post_init__(self) -> None:
        _check_schedule("schedule", self.schedule)
        object.__setattr__(self, "step", _check_count("step", self.step))


@dataclass(frozen=True)
class CopyUntil(_Until):
    """A start delay: every update at ``t <= step`` copies the weights
    (momentum 1), and ``schedule``'s clock starts at ``step``: later updates
    use ``schedule(t - step)``. ``CopyUntil(s, 0)`` makes the first update copy.

    This is ema-pytorch's and diffusers' ``update_after_step=step``, timm's
    ``update_after_step`` as timm's train script calls it, mmengine's
    ``begin_iter=b`` with ``step = max(b - 1, 0)``, and the first-update copy
    of mmengine, ``AveragedModel`` and Lightning.

    Args:
        schedule: The schedule after the copies, evaluated at ``t - step``.
        step: The last step that copies, an integer >= 0.
    """

    def __call__(self, t: int) -> float:
        return 1.0 if t <= self.step else self.schedule(t - self.step)

    def on_device(self, t: torch.Tensor) -> torch.Tensor:
        return torch.where(t <= self.step, 1.0, self.schedule.on_device((t - self.step).clamp_min(0)))  # type: ignore[attr-defined]  # device_schedule() checked it


@dataclass(frozen=True)
class HoldUntil(_Until):
    """Momentum 0 (the EMA keeps its value) at every ``t < step``, then
    ``schedule(t)``. Lightning's ``update_starting_at_step`` keeps the initial
    weights until its first update, which copies:
    ``HoldUntil(CopyUntil(Constant(1 - decay), s), s)``.

    Args:
        schedule: The schedule from ``step`` on, evaluated at ``t``.
        step: The first step that updates, an integer >= 0.
    """

    def __call__(self, t: int) -> float:
        return 0.0 if t < self.step else self.schedule(t)

    def on_device(self, t: torch.Tensor) -> torch.Tensor:
        return torch.where(t < self.step, 0.0, self.schedule.on_device(t))  # type: ignore[attr-defined]  # device_schedule() checked it


@dataclass(frozen=True)
class Recount:
    """``schedule`` evaluated at another library's counter: ``schedule(t // every + start)``.

    Args:
        schedule: The schedule to evaluate at the other counter.
        every: The library counts EMA updates, one per ``every`` optimizer steps
            (give the same value as ``interval=``); an integer >= 1.
        start: Its counter at the first update (``torch_ema`` counts the update
            being made, so 1); an integer >= 0.
    """

    schedule: Schedule
    every: int = 1
    start: int = 0

    def __post_init__(self) -> None:
        _check_schedule("schedule", self.schedule)
        object.__setattr__(self, "every", _check_count("every", self.every, low=1))
        object.__setattr__(self, "start", _check_count("start", self.start))

    def __call__(self, t: int) -> float:
        return self.schedule(t // self.every + self.start)

    def on_device(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.on_device(t // self.every + self.start)  # type: ignore[attr-defined]  # device_schedule() checked it


@dataclass(frozen=True)
class _Pair:
    """Two schedules, both checked."""

    first: Schedule
    second: Schedule

    def __post_init__(self) -> None:
        _check_schedule("first", self.first)
        _check_schedule("second", self.second)


@dataclass(frozen=True)
class Max(_Pair):
    """The larger momentum of two schedules at each step (the smaller decay):
    ``Max(Cosine(...), Ramp())`` is a cosine that really warms up.

    Args:
        first: A schedule.
        second: Another schedule.
    """

    def __call__(self, t: int) -> float:
        return max(self.first(t), self.second(t))

    def on_device(self, t: torch.Tensor) -> torch.Tensor:
        return torch.maximum(self.first.on_device(t), self.second.on_device(t))  # type: ignore[attr-defined]  # device_schedule() checked it


@dataclass(frozen=True)
class Min(_Pair):
    """The smaller momentum of two schedules at each step (the larger decay).

    Args:
        first: A schedule.
        second: Another schedule.
    """

    def __call__(self, t: int) -> float:
        return min(self.first(t), self.second(t))

    def on_device(self, t: torch.Tensor) -> torch.Tensor:
        return torch.minimum(self.first.on_device(t), self.second.on_device(t))  # type: ignore[attr-defined]  # device_schedule() checked it


def sigma_rel_of(gamma: float) -> float:
    """EDM2's relative standard deviation of the power-function profile with exponent ``gamma`` (Eq. 123).

    Args:
        gamma: The profile's exponent.

    Returns:
        ``sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))``.
    """
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel: float) -> float:
    """The exponent of the power-function profile of width ``sigma_rel``: the largest real root of
    ``g**3 + 7 g**2 + (16 - sigma_rel**-2) g + (12 - sigma_rel**-2)`` (EDM2 Eq. 126, Algorithm 2).

    Args:
        sigma_rel: The profile's width relative to the run's length.

    Returns:
        The exponent gamma.
    """
    import torch  # the companion matrix's eigenvalues, as numpy.roots finds them

    c = sigma_rel**-2
    companion = torch.tensor([[-7.0, c - 16.0, c - 12.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    roots = torch.linalg.eigvals(companion)
    return max(r.real.item() for r in roots if abs(r.imag.item()) <= 1e-9 * max(1.0, abs(r.real.item())))


_MAX_SIGMA_REL = sigma_rel_of(0.0)  # gamma > 0: the profile weighs later steps more (sqrt(1/12))


@dataclass(frozen=True)
class PowerFunction(Formula):
    """The power-function EMA of EDM2 (Karras et al. 2024): momentum at step t is
    ``1 - (t / (t + 1)) ** (gamma + 1)``, so the first update copies the params and the
    EMA after T steps weighs step t's params in proportion to ``t ** gamma``.
    Give ``gamma`` (> 0) or ``sigma_rel``, the profile's width relative to the run's length.

    ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))`` (EDM2
    Eq. 123); from ``sigma_rel``, gamma is the largest real root of EDM2's Eq. 126.
    Post-hoc snapshots (:mod:`triton_ema.posthoc`) need these profiles.

    Args:
        gamma: The exponent, a positive finite number.
        sigma_rel: The width, in ``(0, 0.2887)`` (``sqrt(1/12)``, gamma > 0).
            Give exactly one of the two; the other is computed.
    """

    gamma: float | None = None
    sigma_rel: float | None = None

    def __post_init__(self) -> None:
        if (self.gamma is None) == (self.sigma_rel is None):
            raise ValueError("PowerFunction takes exactly one of gamma and sigma_rel")
        if self.sigma_rel is not None:
            sigma_rel = float(self.sigma_rel)
            if not 0.0 < sigma_rel < _MAX_SIGMA_REL:
                raise ValueError(f"sigma_rel must lie in (0, {_MAX_SIGMA_REL:.4f}) (gamma > 0), got {self.sigma_rel}")
            object.__setattr__(self, "sigma_rel", sigma_rel)
            object.__setattr__(self, "gamma", gamma_of(sigma_rel))
            return
        assert self.gamma is not None  # sigma_rel is None, and exactly one of the two is given
        gamma = float(self.gamma)
        if not 0.0 < gamma < math.inf:
            raise ValueError(f"gamma must be a positive finite number, got {self.gamma}")
        object.__setattr__(self, "gamma", gamma)
        object.__setattr__(self, "sigma_rel", sigma_rel_of(gamma))

    def _momentum(self, t, xp):
        return 1.0 - (t / (t + 1)) ** (self.gamma + 1)


def as_schedule(momentum: float | Schedule | None, decay: float | None) -> Schedule:
    """The schedule for the ``momentum=`` / ``decay=`` constructor arguments.

    Args:
        momentum: A float (a :class:`Constant`) or a schedule, or None.
        decay: A float in ``[0, 1)`` (``Constant(1 - decay)``), or None.

    Returns:
        The schedule.

    Raises:
        TypeError: A value that is neither a float nor a callable.
        ValueError: Both or neither given; a value out of range.
    """
    if momentum is not None and decay is not None:
        raise ValueError("give either momentum or decay (momentum = 1 - decay), not both")
    if decay is not None:
        if isinstance(decay, bool) or not isinstance(decay, Real):
            raise TypeError(f"decay must be a float in [0, 1), got {type(decay).__name__}")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        return Constant(1.0 - float(decay))
    if momentum is None:
        raise ValueError("give momentum (a float or a schedule) or decay")
    if callable(momentum):
        return momentum
    if isinstance(momentum, bool) or not isinstance(momentum, Real):
        raise TypeError(f"momentum must be a float or a callable step -> momentum, got {type(momentum).__name__}")
    return Constant(momentum)


def profile_schedules(momentum: Any, decay: Any) -> dict[str | None, Schedule]:
    """The EMA profiles for the ``momentum=`` / ``decay=`` arguments.

    Args:
        momentum: A float, a schedule or a dict ``{name: float or schedule}`` (any
            ``Mapping``), or None.
        decay: A float or a dict ``{name: float}`` (any ``Mapping``), or None.

    Returns:
        A dict of named schedules, or ``{None: schedule}`` for a single float or schedule.

    Raises:
        TypeError: A profile name that is not a non-empty string, or a bad value
            (the message names the profile).
        ValueError: An empty dict, both or neither given, a value out of range.
    """
    given = momentum if decay is None else decay
    if not isinstance(given, Mapping):
        return {None: as_schedule(momentum, decay)}
    if momentum is not None and decay is not None:
        raise ValueError("give either momentum or decay (momentum = 1 - decay), not both")
    if not given:
        raise ValueError("the dict of EMA profiles is empty; give at least one")
    for name in given:
        if not isinstance(name, str) or not name:
            raise TypeError(f"EMA profile names must be non-empty strings, got {name!r}")
    out: dict[str | None, Schedule] = {}
    for name, value in given.items():
        try:
            out[name] = as_schedule(None, value) if decay is not None else as_schedule(value, None)
        except (TypeError, ValueError) as err:
            raise type(err)(f"EMA profile {name!r}: {err}") from None
    return out


def momentum_at(schedule: Schedule, t: int) -> float:
    """Evaluate ``schedule(t)`` and check it is a momentum in ``[0, 1]``.

    Args:
        schedule: A schedule.
        t: The 0-based optimizer step.

    Returns:
        The momentum, a float.

    Raises:
        TypeError: The schedule returned something that is not a float.
        ValueError: The value lies outside ``[0, 1]`` or is NaN (naming the
            schedule, the step and the value).
    """
    value = schedule(t)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"momentum schedule {schedule!r} returned {value!r} at step {t}, not a float") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"momentum schedule {schedule!r} gave {value} at step {t}; a momentum must lie in [0, 1]")
    return value
