"""Coming from another EMA library: each README row, side by side with the real package.

The same float64 training drives EMAOptimizer (with the row's arguments) and
the peer, called the way its documentation and training scripts call it; the
two EMAs must agree at every one of 300 steps, warm-up and interval included."""

import pytest
from migration_cases import (
    assert_one_step_off_fails,
    assert_same_trajectory,
    load_file,
    side_by_side,
)

from triton_ema.schedules import Constant, CopyUntil, Power, Ramp, Recount, Warmup


@pytest.mark.parametrize("decay, use_num_updates, every", [(0.99, True, 1), (0.99, False, 1), (0.995, True, 4)])
def test_torch_ema(decay, use_num_updates, every):
    torch_ema = pytest.importorskip("torch_ema")

    def peer(model):
        ema = torch_ema.ExponentialMovingAverage(model.parameters(), decay=decay, use_num_updates=use_num_updates)
        return (lambda t: ema.update() if t % every == 0 else None), lambda: ema.shadow_params

    # torch_ema counts its updates, the current one included: 1 at the first.
    schedule = Recount(Ramp(decay), every=every, start=1) if use_num_updates else Constant(1 - decay)
    ours, theirs = side_by_side(schedule, peer, interval=every)
    assert_same_trajectory(ours, theirs)
    if use_num_updates:
        assert_one_step_off_fails(schedule, theirs, interval=every, shift=every)


EMA_PYTORCH = [
    dict(),  # the defaults: beta=0.9999, update_after_step=100, update_every=10, inv_gamma=1, power=2/3
    dict(beta=0.999, update_after_step=20, update_every=1, power=3 / 4, inv_gamma=2.0),
    dict(beta=0.99, update_after_step=7, update_every=3, min_value=0.9),
]


@pytest.mark.parametrize("settings", EMA_PYTORCH, ids=["defaults", "power-inv_gamma", "min_value-every3"])
def test_ema_pytorch(settings):
    ema_pytorch = pytest.importorskip("ema_pytorch")
    s = {"beta": 0.9999, "update_after_step": 100, "update_every": 10, "inv_gamma": 1.0, "power": 2 / 3,
         "min_value": 0.0, **settings}

    def peer(model):
        ema = ema_pytorch.EMA(model, include_online_model=False, **settings)
        return (lambda t: ema.update()), lambda: list(ema.ema_model.parameters())

    schedule = CopyUntil(Power(s["beta"], s["inv_gamma"], s["power"], s["min_value"]), s["update_after_step"])
    ours, theirs = side_by_side(schedule, peer, interval=s["update_every"])
    # ema-pytorch computes its decay in float32 (its step counter is a tensor), then lerps in
    # float64: each momentum differs by that rounding, a few 1e-8, times |param - EMA| (< 0.5
    # here) per update. A schedule one step off is 1e-3 to 1e-1 away.
    assert_same_trajectory(ours, theirs, tol=1e-7)
    assert_one_step_off_fails(schedule, theirs, interval=s["update_every"], tol=1e-7)


DIFFUSERS = [
    dict(),  # decay=0.9999, use_ema_warmup=False: the TensorFlow ramp
    dict(decay=0.999, use_ema_warmup=True, power=3 / 4),
    dict(decay=0.99, update_after_step=25, min_decay=0.5),
    dict(decay=0.999, update_after_step=10, use_ema_warmup=True, inv_gamma=3.0, power=2 / 3, foreach=True),
]


@pytest.mark.parametrize("settings", DIFFUSERS, ids=["defaults", "warmup", "after-min_decay", "warmup-after-foreach"])
def test_diffusers(settings):
    training_utils = pytest.importorskip("diffusers.training_utils")
    s = {"decay": 0.9999, "min_decay": 0.0, "update_after_step": 0, "use_ema_warmup": False, "inv_gamma": 1.0,
         "power": 2 / 3, **settings}

    def peer(model):
        ema = training_utils.EMAModel(model.parameters(), **settings)
        return (lambda t: ema.step(model.parameters())), lambda: ema.shadow_params

    ramp = (Power(s["decay"], s["inv_gamma"], s["power"], s["min_decay"]) if s["use_ema_warmup"]
            else Ramp(s["decay"], s["min_decay"]))
    schedule = CopyUntil(ramp, s["update_after_step"])
    ours, theirs = side_by_side(schedule, peer)
    assert_same_trajectory(ours, theirs)
    assert_one_step_off_fails(schedule, theirs)


TIMM = [
    dict(decay=0.998),
    dict(decay=0.999, use_warmup=True),
    dict(decay=0.999, use_warmup=True, warmup_gamma=2.0, warmup_power=3 / 4, min_decay=0.5, update_after_step=30),
    dict(decay=0.99, update_after_step=50),
]


@pytest.mark.parametrize("settings", TIMM, ids=["plain", "warmup", "warmup-all-settings", "after"])
def test_timm_model_ema_v3(settings):
    # timm's __init__ imports torchvision, which this CPU torch cannot have: load its EMA file alone.
    model_ema = load_file("timm_model_ema", "timm", "utils/model_ema.py")
    s = {"min_decay": 0.0, "update_after_step": 0, "use_warmup": False, "warmup_gamma": 1.0, "warmup_power": 2 / 3,
         **settings}

    def peer(model):
        ema = model_ema.ModelEmaV3(model, **settings)
        # As timm's train.py calls it: num_updates counts optimizer steps, incremented before the call.
        return (lambda t: ema.update(model, step=t + 1)), lambda: list(ema.module.parameters())

    after = (Power(s["decay"], s["warmup_gamma"], s["warmup_power"], s["min_decay"]) if s["use_warmup"]
             else Constant(1 - s["decay"]))
    schedule = CopyUntil(after, s["update_after_step"])
    ours, theirs = side_by_side(schedule, peer)
    assert_same_trajectory(ours, theirs)
    assert_one_step_off_fails(schedule, theirs)


@pytest.mark.parametrize("decay, every", [(0.999, 1), (0.99, 5)])
def test_averaged_model_with_get_ema_multi_avg_fn(decay, every):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def peer(model):
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
        return (lambda t: ema.update_parameters(model) if t % every == 0 else None), lambda: list(ema.module.parameters())

    schedule = CopyUntil(Constant(1 - decay))  # the first update_parameters copies
    ours, theirs = side_by_side(schedule, peer, interval=every)
    assert_same_trajectory(ours, theirs)
    assert_one_step_off_fails(schedule, theirs, interval=every)


def _mmcv_ema_hook(momentum, interval, warm_up):
    """mmcv 1.x ``EMAHook``, transcribed from its source (mmcv/runner/hooks/ema.py, 1.7.2):
    ``__init__`` sets ``self.momentum = momentum**interval``; ``after_train_iter``,
    with ``curr_step = runner.iter`` (the 0-based step just done), computes
    ``min(self.momentum, (1 + curr_step) / (self.warm_up + curr_step))`` and, when
    ``curr_step % interval == 0``, does ``buffer.mul_(1 - momentum).add_(param, alpha=momentum)``."""
    def peer(model):
        params = list(model.parameters())
        buffers = [p.detach().clone() for p in params]  # before_run: ema_* buffers registered as clones
        power = momentum**interval

        def after_train_iter(curr_step):
            m = min(power, (1 + curr_step) / (warm_up + curr_step))
            if curr_step % interval != 0:
                return
            for buffer, param in zip(buffers, params):
                buffer.mul_(1 - m).add_(param.data, alpha=m)

        return after_train_iter, lambda: buffers
    return peer


@pytest.mark.parametrize("momentum, interval, warm_up", [(0.5, 2, 100), (0.02, 1, 10), (0.0002, 1, 100)])
def test_mmcv_ema_hook(momentum, interval, warm_up):
    try:
        import mmcv.runner  # noqa: F401
    except ImportError:
        pytest.skip("mmcv 1.x does not install here: it ships a source distribution whose setup.py needs "
                    "pkg_resources and builds against torch; test_mmcv_ema_hook_formula covers its EMAHook "
                    "from its source")
    pytest.fail("mmcv 1.x is installed: drive its EMAHook through an mmcv runner here")


@pytest.mark.parametrize("momentum, interval, warm_up", [(0.5, 2, 100), (0.02, 1, 10), (0.0002, 1, 100)])
def test_mmcv_ema_hook_formula(momentum, interval, warm_up):
    schedule = Warmup(momentum**interval, warm_up)
    ours, theirs = side_by_side(schedule, _mmcv_ema_hook(momentum, interval, warm_up), interval=interval)
    assert_same_trajectory(ours, theirs)
    if momentum > 1 / warm_up:  # otherwise the warm-up is a no-op and a step off changes nothing
        assert_one_step_off_fails(schedule, theirs, interval=interval)
