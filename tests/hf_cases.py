"""A tiny model and data for the transformers Trainer and accelerate tests (tests/test_transformers.py,
tests/accelerate_loop.py), and a float64 reference EMA."""

import torch
from torch import nn

MOMENTUM = 0.3


class Regressor(nn.Module):
    """Takes the Trainer's batches ({"x", "labels"}) and returns {"loss", "logits"}."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": (out - labels).square().mean(), "logits": out}


def dataset(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True).sin() + 0.1 * torch.randn(n, 1, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def loss_with(weights, rows):
    model = Regressor()
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
        return model(torch.stack([r["x"] for r in rows]), torch.stack([r["labels"] for r in rows]))["loss"].item()


class Float64EMA:
    """s <- s + m (p - s) in float64, from the weights after each optimizer step."""

    def __init__(self, params, momentum=MOMENTUM):
        self.momentum = momentum
        self.ema = [p.detach().double().clone() for p in params]

    def update(self, params):
        m = self.momentum
        self.ema = [s + m * (p.detach().double() - s) for s, p in zip(self.ema, params)]
