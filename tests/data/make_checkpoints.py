"""Writes the checkpoints in this folder: ``python tests/data/make_checkpoints.py``.

They were written by triton-ema at d9aa0da (before the EMA core was split out of
``EMAOptimizer``) and are kept as they are: ``tests/test_checkpoint_fixtures.py``
loads them with today's code and requires every value back bitwise. Run this
again only to add a new format, into a new file.
"""

from pathlib import Path

import torch
from torch import nn

from triton_ema import EMAOptimizer, schedules

HERE = Path(__file__).parent


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def train(opt: EMAOptimizer, net: nn.Module, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        net(torch.randn(5, 3, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def main() -> None:
    net = model()
    opt = EMAOptimizer(torch.optim.AdamW(net.parameters(), lr=0.1), momentum=schedules.Warmup(0.3), interval=2,
                       model=net, update_buffers=True, skip_nonfinite=True)
    train(opt, net, 5)
    torch.save(opt.state_dict(), HERE / "single_profile.pt")

    net = model().to(torch.bfloat16)
    opt = EMAOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                       momentum={"short": schedules.PowerFunction(sigma_rel=0.05), "long": 0.1}, model=net)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        net(torch.randn(5, 3, generator=g).bfloat16()).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    torch.save(opt.state_dict(), HERE / "two_profiles_bf16.pt")

    net = model()
    opt = EMAOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), momentum=0.25)  # no model=: no names
    train(opt, net, 2)
    torch.save(opt.state_dict(), HERE / "no_model.pt")


if __name__ == "__main__":
    main()
