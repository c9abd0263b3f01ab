"""Small models and training loops shared by the tests."""

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
