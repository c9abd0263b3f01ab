"""A tiny mmengine model, data and Runner for tests/test_mmengine.py and the DDP script it launches
(tests/mmengine_ddp.py)."""

import torch
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn

ITERS_PER_EPOCH = 4


class Regressor(BaseModel):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x, y, mode="loss"):
        loss = (self.net(x) - y).square().mean()
        return {"loss": loss} if mode == "loss" else [dict(loss=loss)]


class LossMetric(BaseMetric):
    """The mean validation loss."""

    def process(self, data_batch, data_samples):
        self.results += [s["loss"].item() for s in data_samples]

    def compute_metrics(self, results):
        return {"loss": sum(results) / len(results)}


def samples(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True).sin() + 0.1 * torch.randn(n, 1, generator=g)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def batches(n, seed):
    rows = samples(n, seed)
    return [{k: torch.stack([r[k] for r in rows[i:i + 4]]) for k in rows[0]} for i in range(0, n, 4)]


def loader(n, seed):
    return dict(dataset=samples(n, seed), sampler=dict(type="DefaultSampler", shuffle=False), batch_size=4,
                collate_fn=dict(type="default_collate"))


class Float64EMA(Hook):
    """A float64 EMA of the weights after every iteration, with ``schedule(t)``; and the weights at validation."""

    priority = "LOWEST"

    def __init__(self, schedule, interval=1):
        self.schedule, self.interval, self.ema, self.at_validation = schedule, interval, None, []

    def before_train(self, runner):
        self.ema = [p.detach().double().clone() for p in _module(runner).parameters()]

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        t = runner.iter
        if t % self.interval == 0:
            m = self.schedule(t)
            self.ema = [s + m * (p.detach().double() - s) for s, p in zip(self.ema, _module(runner).parameters())]

    def before_val_epoch(self, runner):
        self.at_validation.append([p.detach().clone() for p in _module(runner).parameters()])


def _module(runner):
    return getattr(runner.model, "module", runner.model)


def runner(work_dir, hooks, max_epochs, seed=0, name="run", **kw):
    args = dict(
        model=Regressor(seed), work_dir=str(work_dir), experiment_name=name,
        train_dataloader=loader(4 * ITERS_PER_EPOCH, 0), val_dataloader=loader(16, 1), val_evaluator=[LossMetric()],
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs, val_interval=1), val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9)), custom_hooks=hooks,
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1), logger=None, timer=None,
                           param_scheduler=None, sampler_seed=None),
        log_level="ERROR", default_scope="mmengine")
    args.update(kw)
    return Runner(**args)
