"""A tiny mmengine model, data and Runner for tests/test_mmengine.py and the DDP script it launches
(tests/mmengine_ddp.py)."""

from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from models import float64_ema_step, regression_data, regression_net

ITERS_PER_EPOCH = 4


class Regressor(BaseModel):
    def __init__(self, seed=0):
        super().__init__()
        self.net = regression_net(seed)

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
    x, y = regression_data(n, seed)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


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
            self.ema = float64_ema_step(self.ema, _module(runner).parameters(), self.schedule(t))

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
