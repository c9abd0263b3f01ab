"""Momentum schedules: pure functions of the 0-based optimizer step ``t``.

Each schedule is a frozen dataclass holding only its settings, so a resumed
run gets the same momentum at the same step with nothing extra to save.
Momentum is the weight of the new parameters: ``shadow += m * (param - shadow)``
(``m = 1 - decay``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real

__all__ = ["Constant", "Warmup", "Cosine", "Power", "Schedule", "as_schedule", "momentum_at"]

Schedule = Callable[[int], float]


def _check_unit(name: str, value: float, *, allow_zero: bool) -> float:
    value = float(value)
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value <= 1.0):  # also rejects NaN
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def _check_warm_up(warm_up: int) -> int:
    if isinstance(warm_up, bool) or int(warm_up) != warm_up or warm_up < 0:
        raise ValueError(f"warm_up must be a non-negative integer, got {warm_up!r}")
    return int(warm_up)


def _warm_up_ramp(t: int, warm_up: int) -> float:
    """mmcv's ramp ``(1 + t) / (warm_up + t)``; ``warm_up=0`` means no ramp."""
    return math.inf if warm_up == 0 else (1 + t) / (warm_up + t)


@dataclass(frozen=True)
class Constant:
    """The same momentum at every step (mmengine, NeMo, ``AveragedModel``)."""

    momentum: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "momentum", _check_unit("momentum", self.momentum, allow_zero=False))

    def __call__(self, t: int) -> float:
        return self.momentum


@dataclass(frozen=True)
class Warmup:
    """mmcv ``EMAHook``: ``min(momentum, (1 + t) / (warm_up + t))``."""

    momentum: float
    warm_up: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "momentum", _check_unit("momentum", self.momentum, allow_zero=False))
        object.__setattr__(self, "warm_up", _check_warm_up(self.warm_up))

    def __call__(self, t: int) -> float:
        return min(self.momentum, _warm_up_ramp(t, self.warm_up))


@dataclass(frozen=True)
class Cosine:
    """mmpretrain ``CosineEMA``: momentum goes from ``momentum`` to
    ``end_momentum`` along a half cosine over ``total_steps`` steps, then stays.
    With ``warm_up > 0`` it is also capped by the :class:`Warmup` ramp."""

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
        object.__setattr__(self, "total_steps", int(self.total_steps))
        object.__setattr__(self, "warm_up", _check_warm_up(self.warm_up))

    def __call__(self, t: int) -> float:
        k = self.total_steps
        m, e = self.momentum, self.end_momentum
        cosine = e - (e - m) * (math.cos(math.pi * min(t, k) / k) + 1) / 2
        return min(cosine, _warm_up_ramp(t, self.warm_up))


@dataclass(frozen=True)
class Power:
    """Power-law warm-up of timm ``ModelEmaV3``, ema-pytorch and diffusers:
    ``decay_t = clamp(1 - (1 + t / inv_gamma) ** -power, min_decay, decay)``,
    momentum ``1 - decay_t``. ``power=2/3`` suits long runs, ``3/4`` short ones."""

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

    def __call__(self, t: int) -> float:
        decay_t = 1.0 - (1.0 + t / self.inv_gamma) ** -self.power
        return 1.0 - min(max(decay_t, self.min_decay), self.decay)


def as_schedule(momentum: float | Schedule | None, decay: float | None) -> Schedule:
    """The schedule for the ``momentum=`` / ``decay=`` constructor arguments."""
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


def momentum_at(schedule: Schedule, t: int) -> float:
    """Evaluate ``schedule(t)`` and check it is a momentum in ``[0, 1]``."""
    value = schedule(t)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"momentum schedule {schedule!r} returned {value!r} at step {t}, not a float") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"momentum schedule {schedule!r} gave {value} at step {t}; a momentum must lie in [0, 1]")
    return value
