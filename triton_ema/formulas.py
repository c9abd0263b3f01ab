"""A schedule's formula, written once and evaluated on the host or on the device.

On the host, ``schedule(t)`` takes a Python int and returns a Python float.
On the device, ``schedule.on_device(t)`` takes an int64 step tensor (the
optimizer's counter, 0-dim; any shape evaluates element-wise) and returns the
momentum as a float32 tensor of the same shape on the same device, with
tensor ops only: no ``.item()``, no Python branch on a tensor's value, no
host-to-device copy. A captured CUDA graph that increments the counter thus
advances the schedule at every replay.

Accuracy: the device evaluates the same formula in float64 and rounds it
once to float32, so it is within one float32 ulp of ``schedule(t)`` (for
steps below 2**53, which float64 holds exactly).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields, is_dataclass

import torch

__all__ = ["Formula", "device_schedule"]


class HostMath:
    """The operations of a formula on Python numbers: what ``schedule(t)`` returns."""

    min, max, cos = staticmethod(min), staticmethod(max), staticmethod(math.cos)


class DeviceMath:
    """The same operations on float64 tensors, the first argument of ``min`` and ``max`` a tensor."""

    cos = staticmethod(torch.cos)

    @staticmethod
    def min(a: torch.Tensor, b) -> torch.Tensor:
        return torch.clamp(a, max=b)

    @staticmethod
    def max(a: torch.Tensor, b) -> torch.Tensor:
        return torch.clamp(a, min=b)


class Formula:
    """A schedule given by one formula, ``_momentum(t, xp)``: ``t`` an int with ``xp=HostMath``, or a
    float64 tensor with ``xp=DeviceMath``; Python operators and ``xp``'s functions serve both."""

    def _momentum(self, t, xp):
        raise NotImplementedError

    def __call__(self, t: int) -> float:
        return self._momentum(t, HostMath)

    def on_device(self, t: torch.Tensor) -> torch.Tensor:
        """The momentum at the int64 step tensor ``t``, as a float32 tensor beside it (float64, rounded once).

        Args:
            t: An int64 step tensor (0-dim, or any shape element-wise).

        Returns:
            A float32 tensor of ``t``'s shape on ``t``'s device.

        Raises:
            TypeError: ``t`` is not int64.
        """
        if t.dtype != torch.int64:
            raise TypeError(f"{type(self).__name__}.on_device() takes an int64 step tensor, got {t.dtype}")
        value = self._momentum(t.double(), DeviceMath)
        if isinstance(value, torch.Tensor):
            return value.float()
        return torch.full_like(t, value, dtype=torch.float32)  # a constant: a fill, no host-to-device copy


def device_schedule(schedule: Callable[[int], float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The device evaluator ``schedule.on_device`` of a momentum schedule, once checked.

    Every built-in schedule has one, and so does any object with an ``on_device(t)`` method (an int64
    step tensor in, the momentum as a float32 tensor of its shape and device out, tensor ops only).
    It is tried once on a step tensor on the "meta" device, which holds no data: ``.item()`` or a
    Python branch on a tensor's value fail there.

    Args:
        schedule: A momentum schedule.

    Returns:
        ``schedule.on_device``.

    Raises:
        TypeError: The schedule (a plain function), or one inside a combinator,
            has no ``on_device``, or its ``on_device`` fails on the meta device or
            returns something other than a float32 tensor of the step's shape
            (naming the schedule).
    """
    missing = _without_on_device(schedule)
    if missing:
        raise TypeError(f"momentum schedule {missing} cannot run on the device (capturable=True): it has no on_device(t). "
                        "Use a built-in schedule of triton_ema.schedules, or give it an on_device(t) method: an int64 "
                        "step tensor in, the momentum as a float32 tensor of the same shape and device out, tensor ops only")
    step = torch.zeros((), dtype=torch.int64, device="meta")
    try:
        value = schedule.on_device(step)  # type: ignore[attr-defined]  # _without_on_device found it
    except Exception as error:
        raise TypeError(f"momentum schedule {_name(schedule)}: on_device(t) must use tensor ops only (no .item(), no "
                        f"Python branch on a tensor's value); on a meta step tensor it raised {error!r}") from error
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.shape == ()
            and value.device == step.device):
        got = (f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}" if isinstance(value, torch.Tensor)
               else type(value).__name__)
        raise TypeError(f"momentum schedule {_name(schedule)}: on_device(t) must return a float32 tensor of t's shape "
                        f"on t's device; for a 0-dim meta step it returned {got}")
    return schedule.on_device  # type: ignore[attr-defined]  # _without_on_device found it


def _name(schedule) -> str:
    return getattr(schedule, "__name__", type(schedule).__name__)


def _without_on_device(schedule, where: str = "") -> str:
    """The schedule in ``schedule`` (itself, or one a combinator holds) with no ``on_device``, named; or ''."""
    if not callable(getattr(schedule, "on_device", None)):
        return f"{_name(schedule)} ({where})" if where else _name(schedule)
    if is_dataclass(schedule):
        for field in fields(schedule):
            child = getattr(schedule, field.name)
            if callable(child):
                missing = _without_on_device(child, f"{where or type(schedule).__name__}.{field.name}")
                if missing:
                    return missing
    return ""
