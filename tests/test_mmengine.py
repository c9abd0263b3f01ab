"""mmengine: TritonEMAHook in a real Runner on CPU: the EMA against a float64 reference, validation on EMA
weights, EMAHook's checkpoint layout, resume (from its own checkpoints and from EMAHook's), DDP on 2 processes."""

import io
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_ulps
from models import regression_data, regression_loss

pytestmark = pytest.mark.integration
pytest.importorskip("mmengine", reason="mmengine is not installed (pip install -e '.[test]')")

import mmengine_cases as cases  # noqa: E402

from triton_ema.integrations.mmengine import TritonEMAHook  # noqa: E402


def mmengine_momentum(momentum, start=0, gamma=None, end=None, total=None):
    """EMAHook's momentum at step t, written out: copies up to its first update at ``start``, then counts from there."""
    def at(t):
        s = t - start
        if s <= 0:
            return 1.0
        if gamma is not None:
            return max(momentum, gamma / (gamma + s))
        if end is not None:
            return end - (end - momentum) * (math.cos(math.pi * s / total) + 1) / 2
        return momentum
    return at

EPOCHS, MOMENTUM = 3, 0.3
STEPS = EPOCHS * cases.ITERS_PER_EPOCH


def assert_close_to(reference, tensors, ulps=16):
    for t, r in zip(tensors, reference):
        assert_ulps(t, r, scale=r.abs().max().expand_as(r), ulps=ulps)


@pytest.fixture
def trusted_checkpoints(monkeypatch):
    """mmengine 0.10 resumes with torch.load's default, which is weights_only=True since torch 2.6, and its
    message hub does not pass (test_only_mmengines_message_hub_needs_full_unpickling): resuming needs full
    unpickling, for files one trusts."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def params(runner):
    return [p.detach().clone() for p in runner.model.parameters()]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    work = tmp_path_factory.mktemp("mmengine")
    reference = cases.Float64EMA(mmengine_momentum(MOMENTUM))
    hook = TritonEMAHook(momentum=MOMENTUM)
    runner = cases.runner(work, [hook, reference], EPOCHS)
    runner.train()
    return dict(runner=runner, hook=hook, reference=reference, work=work,
                final={"params": params(runner), "ema": [v.clone() for v in hook.ema.ema_state_dict().values()]})


def test_train_keeps_the_ema_and_validates_on_it(ran):
    hook, reference, runner = ran["hook"], ran["reference"], ran["runner"]
    assert hook.ema.attached and hook.ema.num_steps == STEPS == runner.iter
    assert_close_to(reference.ema, hook.ema.ema_state_dict().values())
    assert len(reference.at_validation) == EPOCHS
    assert_close_to(reference.ema, reference.at_validation[-1])  # the model held the EMA during validation
    assert all(torch.equal(a, b) for a, b in zip(params(runner), ran["final"]["params"]))  # and training weights after
    logged = runner.message_hub.get_scalar("val/loss").current()
    assert logged == pytest.approx(regression_loss(reference.ema, *regression_data(16, 1)), rel=1e-5)


def test_cosine_ema_from_begin_epoch_follows_the_mapped_schedule(tmp_path):
    # mmpretrain's CosineEMA over max_iters, started at epoch 2: copies up to the first iteration of epoch 2.
    hook = TritonEMAHook(ema_type="CosineEMA", momentum=0.5, end_momentum=0.01, begin_epoch=2)
    reference = cases.Float64EMA(mmengine_momentum(0.5, cases.ITERS_PER_EPOCH, end=0.01, total=STEPS))
    cases.runner(tmp_path, [hook, reference], EPOCHS, default_hooks=dict(checkpoint=None)).train()
    assert_close_to(reference.ema, hook.ema.ema_state_dict().values())


def test_checkpoint_has_ema_hooks_layout(ran):
    ckpt = torch.load(ran["work"] / f"epoch_{EPOCHS}.pth", weights_only=False)
    ema = dict(zip(ckpt["state_dict"], ran["final"]["ema"]))
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in ema.items())  # state_dict: the EMA weights
    training = [ckpt["ema_state_dict"][f"module.{k}"] for k, _ in ran["runner"].model.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(training, ran["final"]["params"]))
    assert int(ckpt["ema_state_dict"]["steps"]) == STEPS and ckpt["optimizer"]["ema"]["step"] == STEPS


def test_only_mmengines_message_hub_needs_full_unpickling(ran):
    ckpt = torch.load(ran["work"] / f"epoch_{EPOCHS}.pth", weights_only=False)
    refused = set()
    for key, entry in ckpt.items():  # each entry alone, through a file as torch.load reads it
        buffer = io.BytesIO()
        torch.save(entry, buffer)
        buffer.seek(0)
        try:
            torch.load(buffer, weights_only=True)
        except pickle.UnpicklingError as error:
            assert "HistoryBuffer" in str(error)  # mmengine's logged scalars (numpy arrays inside)
            refused.add(key)
    assert refused == {"message_hub"} and {"optimizer", "state_dict", "ema_state_dict"} <= ckpt.keys()


def test_runner_test_with_load_from_tests_the_ema_and_needs_full_unpickling(ran, tmp_path, monkeypatch):
    def tested():
        hook = TritonEMAHook(momentum=MOMENTUM)
        runner = cases.runner(tmp_path, [hook], EPOCHS, seed=5, load_from=str(ran["work"] / f"epoch_{EPOCHS}.pth"),
                              test_dataloader=cases.loader(16, 1), test_evaluator=[cases.LossMetric()], test_cfg=dict())
        return runner.test()

    # mmengine's own loader reads the whole file with torch.load's default (weights_only=True since torch 2.6),
    # and the message hub in it does not pass: load_from needs full unpickling too, for files one trusts.
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    with pytest.raises(pickle.UnpicklingError, match="HistoryBuffer"):
        tested()
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    ema = ran["final"]["ema"]  # the checkpoint's state_dict holds the EMA weights: the test runs on them
    assert tested()["loss"] == pytest.approx(regression_loss(ema, *regression_data(16, 1)), rel=1e-5)


def test_resume_ends_bitwise_where_the_uninterrupted_run_ends(ran, tmp_path, trusted_checkpoints):
    hook = TritonEMAHook(momentum=MOMENTUM)
    runner = cases.runner(tmp_path, [hook], EPOCHS, seed=5, resume=True, load_from=str(ran["work"] / "epoch_2.pth"))
    runner.train()
    assert hook.ema.num_steps == STEPS
    assert all(torch.equal(a, b) for a, b in zip(params(runner), ran["final"]["params"]))
    assert all(torch.equal(a, b) for a, b in zip(hook.ema.ema_state_dict().values(), ran["final"]["ema"]))


@pytest.mark.parametrize("ema_hook, schedule", [
    (dict(momentum=MOMENTUM), mmengine_momentum(MOMENTUM)),
    (dict(ema_type="MomentumAnnealingEMA", momentum=0.05, gamma=4), mmengine_momentum(0.05, gamma=4)),
], ids=["ExponentialMovingAverage", "MomentumAnnealingEMA"])
def test_a_checkpoint_of_mmengines_ema_hook_loads_and_continues(tmp_path, ema_hook, schedule, trusted_checkpoints):
    theirs = cases.runner(tmp_path / "theirs", [dict(type="EMAHook", **ema_hook)], EPOCHS, name="theirs")
    theirs.train()
    their_hook = next(h for h in theirs.hooks if type(h).__name__ == "EMAHook")
    their_ema = [p.detach().clone() for p in their_hook.ema_model.module.parameters()]

    hook = TritonEMAHook(**ema_hook)
    reference = cases.Float64EMA(schedule)
    ours = cases.runner(tmp_path / "ours", [hook, reference], EPOCHS, seed=5, resume=True,
                        load_from=str(tmp_path / "theirs" / "epoch_2.pth"))
    ours.train()
    assert hook.ema.num_steps == STEPS
    assert all(torch.equal(a, b) for a, b in zip(params(ours), params(theirs)))
    # Their lerp_ and ours round differently: equal within float32 rounding, not bitwise.
    assert_close_to([e.double() for e in their_ema], hook.ema.ema_state_dict().values(), ulps=64)


def test_ddp_on_two_cpu_processes_keeps_identical_emas(tmp_path):
    script = Path(__file__).with_name("mmengine_ddp.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ("ema", "params"):
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][key], ranks[1][key])), key
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["steps"] == 2 * cases.ITERS_PER_EPOCH // 2
        assert_close_to(rank["reference"], rank["ema"])
