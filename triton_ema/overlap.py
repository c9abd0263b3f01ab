"""``overlap=True``: the update on a side CUDA stream, ordered by events, never by a host wait.

The side stream first waits for everything the current stream has queued
(the base optimizer's step); the update is queued there and an event marks
its end. Whatever reads or writes the params or the shadows afterwards
through the optimizer (the next step, ``swap_ema()``, a forward of
``ema_module()``, state dicts, loads, snapshots, ``add_param_group``) first
makes the current stream wait for that event, so the next forward and
backward, which only read the params, run beside the update. Tensors the
current stream made for the update (the momenta of ``capturable=True``) are
recorded on the side stream for the caching allocator; the storages of the
averaged tensors are held by the store until the next step has waited, so a
param replaced meanwhile (``p.data = ...``) is not reused under the update.
Inside a CUDA-graph capture the current stream joins the side stream at the
end of the step, as a capture requires.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class SideStream:
    """One CUDA device's side stream and the event that ends the update queued on it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.done: torch.cuda.Event | None = None

    def run(self, update: Callable[[], None], used: tuple[Tensor | None, ...] = ()) -> None:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)  # after the base step's writes
        for t in used:
            if t is not None and t.device.type == "cuda":
                t.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            update()
        if torch.cuda.is_current_stream_capturing():
            current.wait_stream(self.stream)  # a capture must join every stream it forked
            self.done = None
            return
        self.done = torch.cuda.Event()
        self.done.record(self.stream)

    def wait(self) -> None:
        """The current stream waits for the queued update (the host does not)."""
        if self.done is not None:
            torch.cuda.current_stream(self.device).wait_event(self.done)


def side_stream(devices: set[torch.device]) -> SideStream | None:
    """The side stream for ``overlap=True``: None where no bucket is on a CUDA device."""
    cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)
    if not cuda:
        return None
    if len(cuda) > 1 or len(devices) > 1:
        raise ValueError(f"overlap=True needs the params and their shadows on one CUDA device, got "
                         f"{sorted(map(str, devices))}")
    return SideStream(cuda[0])
