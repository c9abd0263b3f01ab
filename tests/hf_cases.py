"""A tiny model and data for the transformers Trainer and accelerate tests (tests/test_transformers.py,
tests/accelerate_loop.py), and a float64 reference EMA."""

from models import float64_ema_step, regression_data, regression_net
from torch import nn

MOMENTUM = 0.3


class Regressor(nn.Module):
    """Takes the Trainer's batches ({"x", "labels"}) and returns {"loss", "logits"}."""

    def __init__(self, seed=0):
        super().__init__()
        self.net = regression_net(seed)

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": (out - labels).square().mean(), "logits": out}


def dataset(n, seed, sign=1):
    """``n`` rows of the regression data; ``sign=-1`` negates the labels (an eval set that training moves away from)."""
    x, y = regression_data(n, seed)
    return [{"x": x[i], "labels": sign * y[i]} for i in range(n)]


class Float64EMA:
    """s <- s + m (p - s) in float64, from the weights after each optimizer step."""

    def __init__(self, params, momentum=MOMENTUM):
        self.momentum = momentum
        self.ema = [p.detach().double().clone() for p in params]

    def update(self, params):
        self.ema = float64_ema_step(self.ema, params, self.momentum)
