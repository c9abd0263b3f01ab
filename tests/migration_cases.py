"""Side-by-side runs against peer EMA libraries: one tiny training drives
``EMAOptimizer`` and the peer's EMA from the same weights after every step."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from triton_ema import EMAOptimizer
from triton_ema.schedules import Recount

STEPS = 300
# Float64 runs: every peer's update is one or two roundings of the same lerp, so
# the EMAs agree to a few ulp of float64 per update. 1e-12 on values of order 1
# is a thousand times looser than that and a million times tighter than a
# schedule one step off (test_a_schedule_one_step_off_fails_the_check).
TOL64 = 1e-12


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_net(dtype: torch.dtype = torch.float64) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def data(dtype: torch.dtype = torch.float64, steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g, dtype=dtype), torch.randn(16, 3, generator=g, dtype=dtype))
            for _ in range(steps)]


def base_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)  # a noisy run: the EMA has something to smooth


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten().double() for t in tensors])


def ours_alone(schedule, interval: int = 1, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """The EMA after every step of the same training, without a peer."""
    model = make_net(dtype)
    opt = EMAOptimizer(base_optimizer(model.parameters()), momentum=schedule, interval=interval, model=model)
    trajectory = []
    for x, y in data(dtype):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        trajectory.append(flat(opt.ema_state_dict().values()))
    return trajectory


def side_by_side(schedule, peer: Callable[[nn.Module], tuple[Callable[[int], None], Callable[[], list]]],
                 interval: int = 1, dtype: torch.dtype = torch.float64) -> tuple[list, list]:
    """Train once; after each step ``update(t)`` runs the peer, then both EMAs are recorded.

    ``peer(model)`` builds the peer's EMA and returns ``(update, ema)``: ``ema()``
    lists the peer's averaged tensors in ``model.parameters()`` order."""
    model = make_net(dtype)
    opt = EMAOptimizer(base_optimizer(model.parameters()), momentum=schedule, interval=interval, model=model)
    update, ema = peer(model)
    ours, theirs = [], []
    for t, (x, y) in enumerate(data(dtype)):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        update(t)
        ours.append(flat(opt.ema_state_dict().values()))
        theirs.append(flat(ema()))
    return ours, theirs


def worst(ours: list, theirs: list, first: int = 0) -> tuple[float, int]:
    """The largest difference over the steps from ``first`` on, and the step where it is."""
    diffs = [float((a - b).abs().max()) for a, b in zip(ours, theirs)]
    step = max(range(first, len(diffs)), key=diffs.__getitem__)
    return diffs[step], step


def assert_same_trajectory(ours: list, theirs: list, tol: float = TOL64, first: int = 0) -> None:
    assert len(ours) == len(theirs) == STEPS
    diff, step = worst(ours, theirs, first)
    assert diff <= tol, f"EMAs differ by {diff:.3g} at step {step} (tolerance {tol:.1g})"


def assert_one_step_off_fails(schedule, theirs: list, interval: int = 1, tol: float = TOL64, shift: int = 1) -> None:
    """The check can fail: the same schedule read ``shift`` steps late (one step, or one
    update of a schedule that counts updates) differs from the peer by far more than tol."""
    diff, _ = worst(ours_alone(Recount(schedule, start=shift), interval), theirs)
    assert diff > 100 * tol, f"a schedule one step off is only {diff:.3g} away: the check would not see it"


def load_file(module: str, package: str, relative: str):
    """One source file of an installed package, without importing the package
    (timm's and mmpretrain's ``__init__`` import torchvision or mmcv)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (pip install -e '.[test]' installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    file_spec = importlib.util.spec_from_file_location(module, path)
    loaded = importlib.util.module_from_spec(file_spec)
    sys.modules[module] = loaded
    file_spec.loader.exec_module(loaded)
    return loaded
