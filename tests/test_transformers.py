"""Hugging Face: EMATrainer with the real transformers Trainer on CPU, and a bare accelerate
loop under `accelerate launch` with 2 CPU processes (gloo)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_ulps
from models import regression_data, regression_loss
from safetensors.torch import load_file

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")
pytest.importorskip("accelerate", reason="accelerate is not installed (pip install -e '.[test]')")

import hf_cases as cases  # noqa: E402

from triton_ema.integrations.transformers import EMATrainer  # noqa: E402

EPOCHS, STEPS_PER_EPOCH = 3, 4


class Reference(transformers.TrainerCallback):
    def __init__(self):
        self.ema = None

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.ema = self.ema or cases.Float64EMA(model.parameters())

    def on_step_end(self, args, state, control, model=None, **kw):
        self.ema.update(model.parameters())


def make_trainer(out, seed=0, eval_dataset=None, args=None, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=16, num_train_epochs=EPOCHS,
        learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", eval_strategy="epoch", save_strategy="epoch",
        logging_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True, **(args or {}))
    return EMATrainer(model=cases.Regressor(seed), args=args, train_dataset=cases.dataset(16, 0),
                      eval_dataset=cases.dataset(16, 1) if eval_dataset is None else eval_dataset,
                      ema_momentum=cases.MOMENTUM, **kw)


def assert_close_to(reference, tensors):
    for t, r in zip(tensors, reference):
        assert_ulps(t, r, scale=r.abs().max().expand_as(r), ulps=16)


def clones(state):
    return {k: v.clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    reference = Reference()
    trainer = make_trainer(out, callbacks=[reference], save_ema_model=True)
    trainer.train()
    final = {"model": clones(trainer.model.state_dict()), "ema": clones(trainer.ema.ema_state_dict())}
    return dict(trainer=trainer, reference=reference, out=out, final=final)


def test_train_keeps_the_ema_and_evaluates_on_it(trained):
    trainer, reference = trained["trainer"], trained["reference"]
    assert trainer.ema.attached and trainer.ema.num_steps == EPOCHS * STEPS_PER_EPOCH == trainer.state.global_step
    assert_close_to(reference.ema.ema, trainer.ema.ema_state_dict().values())
    metrics = trainer.evaluate()
    rows = regression_data(16, 1)
    assert metrics["eval_loss"] == pytest.approx(regression_loss(reference.ema.ema, *rows), rel=1e-5)
    assert metrics["eval_loss"] != pytest.approx(regression_loss(list(trainer.model.parameters()), *rows), rel=1e-3)
    assert all(torch.equal(v, trained["final"]["model"][k]) for k, v in trainer.model.state_dict().items())


def test_save_model_writes_the_ema_weights_and_checkpoints_the_training_weights(trained):
    trainer, out = trained["trainer"], trained["out"]
    trainer.save_model(str(out / "export"))
    saved = load_file(out / "export" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in trained["final"]["ema"].items())
    last = load_file(out / f"checkpoint-{EPOCHS * STEPS_PER_EPOCH}" / "model.safetensors")
    assert all(torch.equal(last[k], v) for k, v in trained["final"]["model"].items())


def test_resume_from_checkpoint_ends_bitwise_where_the_uninterrupted_run_ends(trained, tmp_path):
    ckpt = tmp_path / f"checkpoint-{2 * STEPS_PER_EPOCH}"
    shutil.copytree(trained["out"] / ckpt.name, ckpt)
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert saved["ema"]["step"] == 2 * STEPS_PER_EPOCH  # the Trainer's own optimizer.pt carries the EMA
    trainer = make_trainer(tmp_path, seed=5)
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.ema.num_steps == EPOCHS * STEPS_PER_EPOCH
    for key, state in (("model", trainer.model.state_dict()), ("ema", trainer.ema.ema_state_dict())):
        assert all(torch.equal(v, trained["final"][key][k]) for k, v in state.items()), key


def test_a_dict_of_eval_datasets_is_evaluated_on_the_ema_swapped_once(tmp_path):
    reference = Reference()
    seeds = {"a": 1, "b": 2}
    trainer = make_trainer(tmp_path, callbacks=[reference], eval_dataset={k: cases.dataset(16, s) for k, s in seeds.items()})
    trainer.train()  # evaluates both at every epoch's end
    logged = {name: [row[f"eval_{name}_loss"] for row in trainer.state.log_history if f"eval_{name}_loss" in row]
              for name in seeds}
    assert all(len(losses) == EPOCHS for losses in logged.values())
    metrics = trainer.evaluate()
    for name, seed in seeds.items():
        ema_loss = regression_loss(reference.ema.ema, *regression_data(16, seed))
        assert metrics[f"eval_{name}_loss"] == pytest.approx(ema_loss, rel=1e-5)
        assert logged[name][-1] == pytest.approx(ema_loss, rel=1e-5)  # the last epoch's: the same EMA
        assert ema_loss != pytest.approx(regression_loss(list(trainer.model.parameters()), *regression_data(16, seed)),
                                         rel=1e-3)


def test_load_best_model_at_end_brings_back_the_best_checkpoints_ema(tmp_path):
    # An eval set with negated labels: training moves away from it, so the best evaluation is not the last.
    trainer = make_trainer(tmp_path, eval_dataset=cases.dataset(16, 1, sign=-1), save_ema_model=True,
                           args=dict(load_best_model_at_end=True, metric_for_best_model="eval_loss"))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != f"checkpoint-{EPOCHS * STEPS_PER_EPOCH}"
    saved = torch.load(best / "optimizer.pt", weights_only=True)["ema"]
    assert trainer.ema.num_steps == saved["step"] < EPOCHS * STEPS_PER_EPOCH
    kept = trainer.ema.ema_checkpoint.state_dict()["shadow"]
    assert all(torch.equal(kept[k], v) for k, v in saved["shadow"].items())
    assert all(torch.equal(v, load_file(best / "model.safetensors")[k]) for k, v in trainer.model.state_dict().items())
    # What was measured at that checkpoint is what evaluate() measures now, and what save_model() exports.
    assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric, rel=1e-6)
    ema = clones(trainer.ema.ema_state_dict())
    trainer.save_model(str(tmp_path / "export"))
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], v) for k, v in ema.items())


def launch(script, out, mixed_precision="no", gpus=0):
    """``script`` under ``accelerate launch``: on 2 CPU processes, or on ``gpus`` GPUs."""
    # accelerate's --cpu launcher needs mpirun for more than one process; its torchrun launcher
    # with ACCELERATE_USE_CPU starts CPU ranks on gloo.
    processes = ["--num_processes", str(gpus)] if gpus else ["--multi_gpu", "--num_processes", "2"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *processes, "--num_machines", "1",
           "--mixed_precision", mixed_precision, "--dynamo_backend", "no", str(script), str(out)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "false" if gpus else "true"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(gpus or 2)]


def test_trainer_ddp_on_two_cpu_processes_keeps_identical_emas(tmp_path):
    ranks = launch(Path(__file__).with_name("hf_trainer_ddp.py"), tmp_path)
    assert all(torch.equal(ranks[0]["ema"][k], ranks[1]["ema"][k]) for k in ranks[0]["ema"])
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["steps"] == 4  # 16 rows over 2 ranks, batches of 4, two epochs
        assert_close_to(rank["reference"], rank["ema"].values())


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_accelerate_launch_two_cpu_processes(tmp_path, mixed_precision):
    ranks = launch(Path(__file__).with_name("accelerate_loop.py"), tmp_path, mixed_precision)
    for key in ("ema", "resumed_ema", "model"):
        assert all(torch.equal(ranks[0][key][k], ranks[1][key][k]) for k in ranks[0][key]), key
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["distributed"] == "MULTI_CPU" and rank["steps"] == 8
        assert not rank["scaler"] and rank["skipped"] == []
        assert_close_to(rank["reference"], rank["ema"].values())
        # save_state / load_state mid-run, then the same steps: bitwise where the uninterrupted run ended.
        assert all(torch.equal(rank["resumed_ema"][k], v) for k, v in rank["ema"].items())
        assert all(torch.equal(rank["resumed_model"][k], v) for k, v in rank["model"].items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "needs a CUDA GPU: on CPU, accelerate 1.x accepts mixed_precision='fp16' but neither autocasts nor builds a "
    "GradScaler (Accelerator.native_amp stays False), so no step is scaled or skipped; the same guarantee on CPU "
    "(float16 autocast, torch.amp.GradScaler('cpu'), attach) is tests/test_attach.py::"
    "test_fp16_autocast_with_grad_scaler_matches_a_reference_of_the_steps_taken"))
def test_accelerate_fp16_skipped_step_updates_no_ema(tmp_path):
    rank = launch(Path(__file__).with_name("accelerate_loop.py"), tmp_path, "fp16", gpus=1)[0]
    assert rank["mixed_precision"] == "fp16" and rank["scaler"]
    (skipped,) = rank["skipped"]  # the step given an infinite gradient, and no other
    assert skipped["step"] == 2
    assert all(torch.equal(skipped["after"][k], v) for k, v in skipped["before"].items())
    assert rank["steps"] == 2 * rank["steps_per_epoch"] - 1  # the EMA counts the steps taken
    assert_close_to(rank["reference"], rank["ema"].values())  # a float64 EMA of the steps taken
    assert all(torch.equal(rank["resumed_ema"][k], v) for k, v in rank["ema"].items())
    assert all(torch.equal(rank["resumed_model"][k], v) for k, v in rank["model"].items())
