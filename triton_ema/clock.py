"""The step count and the momenta on the device, for CUDA-graph capture (``capturable=True``).

Every step reads the step counter, a 0-dim int64 tensor beside the shadows,
evaluates each profile's schedule from it with tensor ops (``on_device``),
and advances it in place: no host sync, so a captured step replays with the
schedule moving on. Steps between updates (``interval > 1``) run the update
with a device flag that makes it write nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .schedules import Schedule, device_schedule


class DeviceClock:
    def __init__(self, schedules: Sequence[Schedule], interval: int, device: torch.device) -> None:
        self.evaluate = [device_schedule(s) for s in schedules]  # a user callable without on_device: an error
        self.interval = interval
        self.step = torch.zeros((), dtype=torch.int64, device=device)

    def momenta(self) -> tuple[Tensor, Tensor | None]:
        """This step's momentum for every profile (float32, ``[K]``), and a flag
        (int32) that is set when this step does not update (``interval``)."""
        momenta = torch.stack([evaluate(self.step) for evaluate in self.evaluate])
        skip = None if self.interval == 1 else (self.step % self.interval != 0).to(torch.int32)
        return momenta, skip

    def advance(self) -> None:
        self.step.add_(1)

    def set(self, step: int) -> None:
        self.step.fill_(step)  # in place: a captured graph keeps reading the same tensor

    def read(self) -> int:
        return int(self.step)  # waits for the device
