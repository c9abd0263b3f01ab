"""Coming from a framework's EMA: mmengine's ``EMAHook`` (and mmpretrain's
``CosineEMA`` through it) inside a real mmengine ``Runner``, and Lightning's
``EMAWeightAveraging`` inside a real ``Trainer``.

The framework trains with ``EMAOptimizer`` as its optimizer (mmengine wraps
it in an ``OptimWrapper``, Lightning calls ``step(closure)``), its own EMA
watches the same model, and a last hook records both EMAs after every step."""

import math

import pytest
import torch
import torch.nn.functional as F
from migration_cases import (
    STEPS,
    Net,
    assert_one_step_off_fails,
    assert_same_trajectory,
    base_optimizer,
    data,
    flat,
    load_file,
)

from triton_ema import EMAOptimizer
from triton_ema.schedules import Constant, CopyUntil, Cosine, HoldUntil, MomentumAnnealing

# --- mmengine -------------------------------------------------------------------


def run_mmengine(tmp_path, ema_hook: dict, schedule, interval: int = 1) -> tuple[list, list]:
    mmengine = pytest.importorskip("mmengine")
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.optim import OptimWrapper
    from mmengine.runner import Runner

    class Model(BaseModel):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = Net().double()

        def forward(self, x, y, mode="loss"):
            return {"loss": F.mse_loss(self.net(x), y)}

    class Recorder(Hook):
        priority = "LOWEST"  # after EMAHook's after_train_iter

        def __init__(self):
            self.ours, self.theirs = [], []

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            hook = next(h for h in runner.hooks if type(h).__name__ == "EMAHook")
            self.ours.append(flat(opt.ema_state_dict().values()))
            self.theirs.append(flat(hook.ema_model.module.parameters()))

    model = Model()
    opt = EMAOptimizer(base_optimizer(model.parameters()), momentum=schedule, interval=interval, model=model)
    recorder = Recorder()
    loader = torch.utils.data.DataLoader([{"x": x, "y": y} for x, y in data()], batch_size=None, shuffle=False)
    runner = Runner(
        model=model, work_dir=str(tmp_path), train_dataloader=loader, optim_wrapper=OptimWrapper(opt),
        train_cfg=dict(by_epoch=False, max_iters=STEPS), custom_hooks=[dict(type="EMAHook", **ema_hook), recorder],
        default_hooks=dict(checkpoint=None, logger=None, timer=None, param_scheduler=None, sampler_seed=None),
        log_level="ERROR", experiment_name=f"ema-{id(recorder)}")
    runner.train()
    assert mmengine.__version__ and len(recorder.ours) == STEPS
    return recorder.ours, recorder.theirs


MMENGINE = [
    # (EMAHook arguments, EMAOptimizer schedule, interval): the row of the README for each.
    (dict(momentum=0.002), CopyUntil(Constant(0.002)), 1),
    (dict(momentum=0.01, interval=3), CopyUntil(Constant(0.01)), 3),
    (dict(momentum=0.01, begin_iter=50), CopyUntil(Constant(0.01), 49), 1),
    (dict(ema_type="MomentumAnnealingEMA", momentum=0.001, gamma=100), MomentumAnnealing(0.001, 100), 1),
    (dict(ema_type="MomentumAnnealingEMA", momentum=0.005, gamma=20, interval=2), MomentumAnnealing(0.005, 20), 2),
    # With interval > 1, mmengine copies the weights at *every* step before begin_iter, this library
    # at every interval-th: the two agree from step begin_iter - 1 on (a multiple of interval here).
    (dict(ema_type="MomentumAnnealingEMA", momentum=0.005, gamma=20, interval=2, begin_iter=31),
     CopyUntil(MomentumAnnealing(0.005, 20), 30), 2),
]


@pytest.mark.parametrize("hook, schedule, interval", MMENGINE,
                         ids=["ema", "ema-interval", "ema-begin_iter", "annealing", "annealing-interval",
                              "annealing-interval-begin_iter"])
def test_mmengine_ema_hook(tmp_path, hook, schedule, interval):
    ours, theirs = run_mmengine(tmp_path, hook, schedule, interval)
    begin = max(hook.get("begin_iter", 0) - 1, 0)
    assert_same_trajectory(ours, theirs, first=begin if interval > 1 else 0)
    if hook.get("begin_iter", 0) or "gamma" in hook:
        assert_one_step_off_fails(schedule, theirs, interval=interval)


def _mmpretrain_cosine_ema():
    """mmpretrain's ``CosineEMA``, loaded from its installed file (its ``__init__`` needs mmcv 2)."""
    try:
        import mmpretrain  # noqa: F401
    except ImportError as err:
        pytest.skip(f"mmpretrain does not import here ({err}): it needs mmcv>=2, which has no wheel for this "
                    "torch and builds C++ ops from source; test_mmpretrain_cosine_ema_formula covers CosineEMA "
                    "from its source")
    return load_file("mmpretrain_ema", "mmpretrain", "models/utils/ema.py").CosineEMA


def _cosine_ema_from_source():
    """mmpretrain 1.2.0's ``CosineEMA``, transcribed from mmpretrain/models/utils/ema.py: an
    mmengine ``ExponentialMovingAverage`` whose ``avg_func`` reads ``max_iters`` from the
    ``MessageHub`` and does ``mul_(1 - m).add_(param, alpha=m)`` with the cosine momentum
    ``m = e - (e - m0) * (cos(pi * steps / max_iters) + 1) / 2``, ``cos`` and ``pi`` from
    ``math`` and ``steps`` its step-count tensor (so the angle is a float32 tensor)."""
    from mmengine.logging import MessageHub
    from mmengine.model import ExponentialMovingAverage

    class CosineEMA(ExponentialMovingAverage):
        def __init__(self, model, momentum=0.004, end_momentum=0.0, interval=1, device=None, update_buffers=False):
            super().__init__(model=model, momentum=momentum, interval=interval, device=device,
                             update_buffers=update_buffers)
            self.end_momentum = end_momentum

        def avg_func(self, averaged_param, source_param, steps):
            max_iters = MessageHub.get_current_instance().get_info("max_iters")
            cosine_annealing = (math.cos(math.pi * steps / float(max_iters)) + 1) / 2
            momentum = self.end_momentum - (self.end_momentum - self.momentum) * cosine_annealing
            averaged_param.mul_(1 - momentum).add_(source_param, alpha=momentum)

    return CosineEMA


def _check_cosine_ema(tmp_path, cosine_ema):
    schedule = CopyUntil(Cosine(0.05, 0.001, total_steps=STEPS))  # mmengine's first update copies
    ours, theirs = run_mmengine(tmp_path, dict(ema_type=cosine_ema, momentum=0.05, end_momentum=0.001), schedule)
    # CosineEMA computes its angle in float32 (pi * steps, a tensor): agreement within that rounding.
    assert_same_trajectory(ours, theirs, tol=1e-7)
    assert_one_step_off_fails(schedule, theirs, tol=1e-7)


def test_mmpretrain_cosine_ema(tmp_path):
    _check_cosine_ema(tmp_path, _mmpretrain_cosine_ema())


def test_mmpretrain_cosine_ema_formula(tmp_path):
    _check_cosine_ema(tmp_path, _cosine_ema_from_source())


# --- Lightning -------------------------------------------------------------------


def run_lightning(callback_args: dict, schedule, interval: int) -> tuple[list, list]:
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import EMAWeightAveraging

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = Net().double()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return EMAOptimizer(base_optimizer(self.parameters()), momentum=schedule, interval=interval, model=self)

    class Recorder(pl.Callback):
        def __init__(self):
            self.ours, self.theirs = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ours.append(flat(trainer.optimizers[0].ema_state_dict().values()))
            self.theirs.append(flat(averaging._average_model.module.parameters()))

    averaging, recorder = EMAWeightAveraging(**callback_args), Recorder()
    trainer = pl.Trainer(max_steps=STEPS, callbacks=[averaging, recorder], accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(data(), batch_size=None, shuffle=False)
    trainer.fit(Module(), loader)
    return recorder.ours, recorder.theirs


LIGHTNING = [
    (dict(decay=0.99), CopyUntil(Constant(0.01)), 1),
    (dict(decay=0.95, update_every_n_steps=3, update_starting_at_step=10),
     HoldUntil(CopyUntil(Constant(0.05), 12), 12), 3),  # the first update at a multiple of 3 from step 10: 12
]


@pytest.mark.parametrize("args, schedule, interval", LIGHTNING, ids=["defaults", "every-starting_at"])
def test_lightning_ema_weight_averaging(args, schedule, interval):
    ours, theirs = run_lightning(args, schedule, interval)
    # Lightning averages with get_ema_avg_fn: decay * ema + (1 - decay) * param, two roundings.
    assert_same_trajectory(ours, theirs)
    assert_one_step_off_fails(schedule, theirs, interval=interval)
