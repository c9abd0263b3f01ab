"""Writes the checkpoints in this folder: ``python tests/data/make_checkpoints.py``.

They were written by triton-ema at d9aa0da (before the EMA core was split out of
``EMAOptimizer``) and are kept as they are: ``tests/test_checkpoint_formats.py``
builds the same wrappers with :data:`BUILDS`, loads them with today's code and
requires every value back bitwise. Run this again only to add a new format, into
a new file.
"""

from pathlib import Path

import torch
from torch import nn

from triton_ema import EMAOptimizer, schedules

HERE = Path(__file__).parent


def model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(dtype)


def single_profile() -> tuple[nn.Module, EMAOptimizer]:
    net = model()
    return net, EMAOptimizer(torch.optim.AdamW(net.parameters(), lr=0.1), momentum=schedules.Warmup(0.3),
                             interval=2, model=net, update_buffers=True, skip_nonfinite=True)


def two_profiles_bf16() -> tuple[nn.Module, EMAOptimizer]:
    net = model(torch.bfloat16)
    return net, EMAOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                             momentum={"short": schedules.PowerFunction(sigma_rel=0.05), "long": 0.1}, model=net)


def no_model() -> tuple[nn.Module, EMAOptimizer]:
    net = model()
    return net, EMAOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), momentum=0.25)  # no model=: no names


BUILDS = {"single_profile": (single_profile, 5), "two_profiles_bf16": (two_profiles_bf16, 3), "no_model": (no_model, 2)}


def train(net: nn.Module, opt: EMAOptimizer, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = next(net.parameters()).dtype
    for _ in range(steps):
        net(torch.randn(5, 3, generator=g).to(dtype)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()


def main() -> None:
    for name, (build, steps) in BUILDS.items():
        net, opt = build()
        train(net, opt, steps)
        torch.save(opt.state_dict(), HERE / f"{name}.pt")


if __name__ == "__main__":
    main()
