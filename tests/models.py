"""Small models and training loops shared by the tests."""

import io

import torch
from torch import nn


class Net(nn.Module):
    """Several parameter shapes (4-d, 2-d, 1-d, 0-d) and BatchNorm buffers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5 * 2 * 2, 7)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().flatten(1)) * self.scale


def make_model(dtype=torch.float32, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return Net().to(device=device, dtype=dtype)


def batches(n, dtype=torch.float32, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 4, 4, generator=g).to(device, dtype), torch.randn(8, 7, generator=g).to(device, dtype))
            for _ in range(n)]


def train_step(model, opt, batch):
    x, y = batch
    loss = (model(x).float() - y.float()).square().mean()
    loss.backward()
    opt.step()
    assert all(p.isfinite().all() for p in model.parameters()), "the test model diverged"
    opt.zero_grad()
    return loss


def make_base(kind, params, **kw):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1, eps=1e-3, **kw)  # eps: float16-safe
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, **kw)
    raise ValueError(kind)


def shadows(opt):
    """Copies of the EMA of every parameter, in the optimizer's order."""
    return [s.clone() for s in opt.state_dict()["ema"]["shadow"].values()]


# The toy regression that the framework integration tests fit (tests/*_cases.py): 4 features, one target.

def regression_data(n, seed):
    """``n`` rows of x (4 features) and y = sin(sum of x) + noise, the same for a given seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x.sum(1, keepdim=True).sin() + 0.1 * torch.randn(n, 1, generator=g)


def regression_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def regression_loss(weights, x, y):
    """The mean squared error over the rows ``x``, ``y`` of a :func:`regression_net` holding ``weights``."""
    net = regression_net()
    with torch.no_grad():
        for p, w in zip(net.parameters(), weights):
            p.copy_(w)
        return (net(x) - y).square().mean().item()


def float64_ema_step(ema, params, momentum):
    """One update of a float64 reference EMA: ``s + m (p - s)`` for each shadow ``s`` and weight ``p``."""
    return [s + momentum * (p.detach().double() - s) for s, p in zip(ema, params)]


def roundtrip(obj):
    """``obj`` saved with torch.save and loaded back with ``weights_only=True``, as a checkpoint is."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
