"""Lightning: EMACallback with the real Trainer on CPU: the EMA against a float64
reference, validation and testing on EMA weights, ckpt_path= resume, DDP, FSDP2
(ModelParallelStrategy, distributed checkpoints) and DeepSpeedStrategy (ZeRO 2 and 3) on 2 processes."""

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_ulps
from models import regression_loss

pytestmark = pytest.mark.integration
pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed (pip install -e '.[test]')")

import lightning_cases as cases  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from triton_ema import load_ema_weights  # noqa: E402
from triton_ema.integrations.lightning import EMACallback  # noqa: E402

EPOCHS = 4


def assert_close_to(reference, tensors):
    for t, r in zip(tensors, reference):
        assert_ulps(t, r, scale=r.abs().max().expand_as(r), ulps=16)


def loss_with(weights, batches):
    return regression_loss(weights, torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One 4-epoch fit that validates every epoch and checkpoints every epoch (ModelCheckpoint, and the module's
    own on_validation_epoch_end)."""
    ckpts = tmp_path_factory.mktemp("ckpts")
    ema, reference = EMACallback(cases.MOMENTUM), cases.Reference()
    saver = ModelCheckpoint(dirpath=ckpts, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    # ModelCheckpoint first: Lightning runs checkpoint callbacks after all others whatever the list says
    trainer = cases.trainer([saver, ema, reference], EPOCHS, enable_checkpointing=True)
    model = cases.Sampling(ckpts)
    val = cases.loader(16, seed=1)
    trainer.fit(model, cases.loader(), val)
    final = {"model": clones(model.state_dict()), "ema": clones(ema.ema.ema_state_dict())}
    return dict(trainer=trainer, model=model, ema=ema, reference=reference, val=val, ckpts=ckpts, final=final)


def clones(state):
    return {k: v.clone() for k, v in state.items()}


def bitwise_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_keeps_the_ema_of_every_step(fitted):
    ema = fitted["ema"].ema
    assert ema.attached and ema.num_steps == EPOCHS * 4 == fitted["trainer"].global_step
    assert_close_to(fitted["reference"].ema, ema.ema_state_dict().values())


def test_validation_runs_on_ema_weights_and_training_weights_come_back(fitted):
    reference = fitted["reference"]
    assert len(reference.at_validation) == EPOCHS
    for (held, ema64), (after, training) in zip(reference.at_validation, reference.after_validation):
        assert_close_to(ema64, held)  # the model held the EMA during validation
        assert all(torch.equal(a, t) for a, t in zip(after, training))  # and the training weights, bitwise, after
    logged = fitted["trainer"].callback_metrics["val_loss"].item()
    assert logged == pytest.approx(loss_with(reference.ema, list(fitted["val"])), rel=1e-5)
    assert logged != pytest.approx(loss_with(reference.training, list(fitted["val"])), rel=1e-3)


def test_the_modules_epoch_end_hooks_run_on_the_ema(fitted):
    reference, model = fitted["reference"], fitted["model"]
    assert len(model.at_epoch_end["validate"]) == EPOCHS
    n = len(reference.ema)
    for held, (_, ema64) in zip(model.at_epoch_end["validate"], reference.at_validation):
        assert_close_to(ema64, held[:n])  # on_validation_epoch_end of the module: the EMA
        assert all(torch.equal(a, b) for a, b in zip(held[n:], held[:n]))  # still, after it saved a checkpoint
    before = len(model.at_epoch_end["test"])
    fitted["trainer"].test(model, fitted["val"], verbose=False)
    (held,) = model.at_epoch_end["test"][before:]
    assert_close_to(reference.ema, held)  # on_test_epoch_end of the module: the EMA
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fitted["final"]["model"].values()))


def test_checkpoints_hold_the_training_weights(fitted):
    # ModelCheckpoint's at each epoch's end, and the module's own from its on_validation_epoch_end
    names = list(fitted["final"]["model"])
    for epoch, (_, training) in enumerate(fitted["reference"].after_validation):
        for name in (f"epoch={epoch}.ckpt", f"epoch_end={epoch}.ckpt"):
            ckpt = torch.load(fitted["ckpts"] / name, weights_only=True)
            assert all(torch.equal(ckpt["state_dict"][k], t) for k, t in zip(names, training)), name
            assert ckpt["optimizer_states"][0]["ema"]["step"] == 4 * (epoch + 1)


def test_test_runs_on_ema_weights_also_of_a_loaded_checkpoint(fitted):
    trainer, reference, val = fitted["trainer"], fitted["reference"], list(fitted["val"])
    (result,) = trainer.test(fitted["model"], fitted["val"], verbose=False)
    assert result["test_loss"] == pytest.approx(loss_with(reference.ema, val), rel=1e-5)
    # The EMA of epoch 2's checkpoint, as validation at the end of epoch 2 saw it.
    (result,) = trainer.test(fitted["model"], fitted["val"], ckpt_path=str(fitted["ckpts"] / "epoch=1.ckpt"),
                             verbose=False)
    assert result["test_loss"] == pytest.approx(loss_with(reference.at_validation[1][1], val), rel=1e-5)


def test_ckpt_path_resume_ends_bitwise_where_the_uninterrupted_run_ends(fitted):
    ckpt = torch.load(fitted["ckpts"] / "epoch=1.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["ema"]["step"] == 8  # Lightning's own checkpoint carries the EMA
    ema = EMACallback(cases.MOMENTUM)
    model = cases.Regressor(seed=5)  # other initial weights: everything must come from the checkpoint
    cases.trainer([ema], EPOCHS).fit(model, cases.loader(), cases.loader(16, seed=1),
                                     ckpt_path=str(fitted["ckpts"] / "epoch=1.ckpt"))
    assert ema.ema.num_steps == EPOCHS * 4
    assert bitwise_equal(model.state_dict(), fitted["final"]["model"])
    assert bitwise_equal(ema.ema.ema_state_dict(), fitted["final"]["ema"])


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """The 2-process scripts under Lightning's own launcher, started together: script name -> (folder, process).

    The launcher starts the second rank when the first reaches fit, so a script's ranks import Lightning
    one after the other, on one core; two scripts at once keep both cores busy."""
    runs = {}
    scripts = ["lightning_ddp.py", "lightning_fsdp2.py"]
    if importlib.util.find_spec("deepspeed") is not None:
        scripts.append("lightning_deepspeed.py")
    for script in scripts:
        out = tmp_path_factory.mktemp(script.removesuffix(".py"))
        with (out / "stdout.txt").open("w") as stdout, (out / "stderr.txt").open("w") as stderr:
            runs[script] = out, subprocess.Popen([sys.executable, str(Path(__file__).with_name(script)), str(out)],
                                                 stdout=stdout, stderr=stderr, start_new_session=True)
    yield runs
    for _, process in runs.values():
        if process.poll() is None:  # a test stopped before its script ended: end the script and its second rank
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_two_ranks(runs, script):
    """What each rank of ``script`` saved, and the script's stderr."""
    out, process = runs[script]
    returncode = process.wait(timeout=600)
    stdout, stderr = (out / "stdout.txt").read_text(), (out / "stderr.txt").read_text()
    assert returncode == 0, stdout[-3000:] + stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)], stderr


def test_ddp_on_two_cpu_processes_keeps_identical_emas(two_rank_runs):
    ranks, _ = run_two_ranks(two_rank_runs, "lightning_ddp.py")
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    for key in ("ema", "model"):
        assert all(torch.equal(ranks[0][key][k], ranks[1][key][k]) for k in ranks[0][key])
    for rank in ranks:
        assert rank["steps"] == 2 * 2  # 32 rows over 2 ranks, batches of 8, two epochs
        assert_close_to(rank["reference"], rank["ema"].values())
        assert all(torch.equal(rank["model"][k], v) for k, v in rank["ema"].items())  # ema_at_end=True


def test_fsdp2_model_parallel_strategy_on_two_cpu_processes(two_rank_runs):
    ranks, stderr = run_two_ranks(two_rank_runs, "lightning_fsdp2.py")
    assert "has no 'ema' entry" not in stderr  # the resume found the EMA (no restart from the weights)
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["ema"], ranks[1]["ema"]))
    val = list(cases.loader(16, seed=1))
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["sharded"]
        assert rank["steps"] == rank["resumed_steps"] == 3 * 2  # 32 rows over 2 ranks, batches of 8, 3 epochs
        assert_close_to(rank["reference"], rank["ema"])
        for (held, ema64), (after, training) in zip(rank["at_validation"], rank["after_validation"]):
            assert_close_to(ema64, held)  # the model held the EMA during validation
            assert all(torch.equal(a, t) for a, t in zip(after, training))  # and the training weights after
        assert rank["val_loss"] == pytest.approx(loss_with(rank["reference"], val), rel=1e-5)
        # test(ckpt_path=) of epoch 2's distributed checkpoint: its EMA, as validation at the end of epoch 2 saw it
        assert rank["test_loss_epoch_1"] == pytest.approx(loss_with(rank["at_validation"][1][1], val), rel=1e-5)
        # fit(ckpt_path=) from that checkpoint, other initial weights: bitwise where the uninterrupted fit ended
        assert all(torch.equal(a, b) for a, b in zip(rank["resumed_ema"], rank["ema"]))
        assert all(torch.equal(a, b) for a, b in zip(rank["resumed_model"], rank["model"]))
        # validating on the EMA changed nothing in the training; ema_at_end=True puts the EMA in the model
        assert all(torch.equal(a, b) for a, b in zip(rank["ema_validated_on_training_weights"], rank["ema"]))
        assert all(torch.equal(a, b) for a, b in zip(rank["model_at_end"], rank["ema"]))


def test_load_ema_weights_of_a_model_parallel_distributed_checkpoint(two_rank_runs):
    ranks, _ = run_two_ranks(two_rank_runs, "lightning_fsdp2.py")
    out, _ = two_rank_runs["lightning_fsdp2.py"]
    weights = load_ema_weights(out / "ckpts" / "epoch=2.ckpt")  # the last of 3 epochs: both ranks' shards
    model = cases.Regressor(seed=5)
    assert list(weights) == list(model.state_dict())
    assert all(torch.equal(w, e) for w, e in zip(weights.values(), ranks[0]["ema"]))  # the EMA when fit ended
    model.load_state_dict(weights, strict=True)


def deepspeed_ranks(two_rank_runs):
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    ranks, _ = run_two_ranks(two_rank_runs, "lightning_deepspeed.py")
    return ranks


def in_module_order(weights):
    return [weights[n] for n, _ in cases.Regressor().named_parameters()]


def probe_with(weights, dtype):
    """What a plain regression net holding ``weights`` (cast to ``dtype``) computes on the scripts' probe batch."""
    import lightning_deepspeed

    net = cases.Regressor().net
    net.load_state_dict({k.removeprefix("net."): v for k, v in weights.items()})
    with torch.no_grad():
        return net.to(dtype)(lightning_deepspeed.PROBE.to(dtype)).float()


@pytest.mark.parametrize("name", ["stage2-fp32", "stage3-bf16"])
def test_deepspeed_strategy_on_two_cpu_processes(two_rank_runs, name):
    ranks = deepspeed_ranks(two_rank_runs)
    assert all(torch.equal(ranks[0][name]["ema"][k], v) for k, v in ranks[1][name]["ema"].items())
    val = list(cases.loader(16, seed=1))
    for rank in ranks:
        r = rank[name]
        dtype = getattr(torch, r["dtype"].removeprefix("torch."))
        assert r["world_size"] == 2 and r["steps"] == r["resumed_steps"] == 3 * 2  # 32 rows, 2 ranks, batches of 8
        assert r["optimizer"] == ("DeepSpeedZeroOptimizer_Stage3" if "stage3" in name else "DeepSpeedZeroOptimizer")
        assert r["partitioned"] == ("stage3" in name) and dtype == (torch.bfloat16 if "bf16" in name else torch.float32)
        # the EMA of the full fp32 master weights, against a float64 EMA of them after every step
        assert r["ema"].keys() == set(cases.Regressor().state_dict())
        assert_close_to(r["reference"], in_module_order(r["ema"]))
        for validation, probed in zip(r["validations"], r["probed_validation"], strict=True):
            assert_close_to(validation["reference"], in_module_order(validation["ema"]))
            # the module computed with the EMA during validation, and holds the training masters after it, bitwise
            assert torch.equal(probed, probe_with(validation["ema"], dtype))
            assert not torch.equal(probed, probe_with(dict(zip(r["ema"], validation["masters"])), dtype))
            assert all(torch.equal(a, b) for a, b in zip(validation["masters_after"], validation["masters"]))
        if dtype == torch.float32:
            assert r["val_loss"] == pytest.approx(loss_with(r["validations"][-1]["reference"], val), rel=1e-5)
        # test() after the fit runs on the EMA; test(ckpt_path=) on that checkpoint's EMA (also in a fresh
        # Trainer, ZeRO 0-2); the training weights come back after both
        assert torch.equal(r["probed_test"][0], probe_with(r["ema"], dtype))
        if "fresh_test" in r:
            epoch_1 = r["validations"][1]["saved"]
            assert torch.equal(r["probed_test"][1], probe_with(epoch_1, dtype))
            assert torch.equal(r["fresh_test"][0], probe_with(epoch_1, dtype))
        assert all(torch.equal(a, b) for a, b in zip(r["after_test"], r["masters"]))
        # fit(ckpt_path=) of epoch 0's checkpoint, other initial weights: bitwise where the uninterrupted fit ended
        assert all(torch.equal(r["resumed_ema"][k], v) for k, v in r["ema"].items())
        assert all(torch.equal(a, b) for a, b in zip(r["resumed_masters"], r["masters"]))
        # validating on the EMA changed nothing in the training; ema_at_end=True makes the EMA the training weights
        assert all(torch.equal(r["ema_validated_on_training_weights"][k], v) for k, v in r["ema"].items())
        assert all(torch.equal(m, e) for m, e in zip(r["masters_at_end"], r["ema"].values()))


@pytest.mark.parametrize("name", ["stage2-fp32", "stage3-bf16"])
def test_load_ema_weights_of_a_deepspeed_strategy_checkpoint(two_rank_runs, name):
    ranks = deepspeed_ranks(two_rank_runs)
    out, _ = two_rank_runs["lightning_deepspeed.py"]
    for epoch, validation in enumerate(ranks[0][name]["validations"]):
        weights = load_ema_weights(out / name / f"epoch={epoch}.ckpt")  # the EMA the ModelCheckpoint saved
        assert weights.keys() == validation["saved"].keys()
        assert all(torch.equal(weights[k], v) for k, v in validation["saved"].items())
    model = cases.Regressor(seed=5)
    model.load_state_dict(weights, strict=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's own DeepSpeedStrategy (without the CPU run's "
                    "subclass) needs a CUDA GPU: its setup_environment refuses any other accelerator")
def test_deepspeed_strategy_as_lightning_ships_it_on_cuda(tmp_path):
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("lightning_deepspeed.py")), str(tmp_path), "cuda"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cuda"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    gpus = min(2, torch.cuda.device_count())
    for rank in range(gpus):
        for name, r in torch.load(tmp_path / f"rank{rank}.pt", map_location="cpu", weights_only=True).items():
            assert r["steps"] == r["resumed_steps"] > 0, name
            assert_close_to(r["reference"], in_module_order(r["ema"]))
            for validation in r["validations"]:
                assert all(torch.equal(a, b) for a, b in zip(validation["masters_after"], validation["masters"]))
            assert all(torch.equal(r["resumed_ema"][k], v) for k, v in r["ema"].items())
            assert all(torch.equal(a, b) for a, b in zip(r["resumed_masters"], r["masters"]))
            assert all(torch.equal(r["ema_validated_on_training_weights"][k], v) for k, v in r["ema"].items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy needs a CUDA GPU (it refuses "
                    "accelerator='cpu')")
def test_fsdp1_strategy_is_refused_when_fit_sets_up():
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = pl.Trainer(strategy=FSDPStrategy(), accelerator="cuda", devices=1, logger=False)
    with pytest.raises(NotImplementedError, match="EMACallback under FSDPStrategy: its checkpoints save the optimizer"):
        EMACallback(cases.MOMENTUM).setup(trainer, cases.Regressor(), "fit")
