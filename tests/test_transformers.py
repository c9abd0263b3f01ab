"""Hugging Face: EMATrainer with the real transformers Trainer on CPU, and a bare accelerate
loop under `accelerate launch` with 2 CPU processes (gloo); both with DeepSpeed (ZeRO 2 and 3) on
DeepSpeed's CPU accelerator in one process."""

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

from triton_ema import load_ema_weights  # noqa: E402
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


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    """tests/hf_deepspeed.py's two parts (the Trainer, the accelerate loop), each one CPU process, at the same
    time: accelerate 1.x runs DeepSpeed on CPU processes only alone (without a GPU its state finds no
    process-group backend, counts one process, and its gather for the evaluation fails with two)."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    out = tmp_path_factory.mktemp("hf-deepspeed")
    runs = {}
    for part in ("trainer", "accelerate"):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        runs[part] = subprocess.Popen([sys.executable, str(Path(__file__).with_name("hf_deepspeed.py")), str(out), part],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for process in runs.values():
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0, output[-3000:]
    return out, {part: torch.load(out / f"{part}-rank0.pt", weights_only=True) for part in runs}


def named(tensors):
    return [tensors[n] for n, _ in cases.Regressor().named_parameters()]


@pytest.mark.parametrize("name", ["stage2", "stage3"])
def test_trainer_with_a_deepspeed_config(deepspeed_runs, name):
    out, results = deepspeed_runs
    r = results["trainer"][name]
    assert r["engine"] == "DeepSpeedEngine" and r["partitioned"] == (name == "stage3")
    assert r["optimizer"] == {"stage2": "DeepSpeedZeroOptimizer", "stage3": "DeepSpeedZeroOptimizer_Stage3"}[name]
    assert r["steps"] == r["global_step"] == EPOCHS * STEPS_PER_EPOCH
    # the EMA of the full fp32 masters against a float64 EMA of them after every step
    assert_close_to(named(r["reference"]), named(r["ema"]))
    # evaluate() on the EMA, the training masters back bitwise after it
    rows = regression_data(16, 1)
    assert r["eval_loss"] == pytest.approx(regression_loss(named(r["reference"]), *rows), rel=1e-5)
    assert r["eval_loss"] != pytest.approx(r["training_loss"], rel=1e-3)
    assert all(torch.equal(r["masters_after_eval"][k], v) for k, v in r["masters"].items())
    # save_model() with save_ema_model=True writes the full EMA (fp32 training: bitwise)
    exported = load_file(out / name / "export" / "model.safetensors")
    assert exported.keys() == r["ema"].keys() and all(torch.equal(exported[k], v) for k, v in r["ema"].items())
    # every checkpoint's EMA, read from the Trainer's checkpoint folder; loads into the plain model
    for step, saved in r["saved"].items():
        weights = load_ema_weights(out / name / f"checkpoint-{step}")
        assert weights.keys() == saved.keys() and all(torch.equal(weights[k], v) for k, v in saved.items())
    cases.Regressor().load_state_dict(weights)
    # resume_from_checkpoint of the first epoch's checkpoint, other initial weights: bitwise at the end
    assert r["resumed_steps"] == r["steps"]
    assert all(torch.equal(r["resumed_ema"][k], v) for k, v in r["ema"].items())
    assert all(torch.equal(r["resumed_masters"][k], v) for k, v in r["masters"].items())


def test_accelerate_loop_with_deepspeed_plugin(deepspeed_runs):
    out, results = deepspeed_runs
    r = results["accelerate"]
    assert r["engine"] == "DeepSpeedEngine" and r["steps"] == r["resumed_steps"] == 2 * 4 and r["loaded_steps"] == 4
    assert_close_to(r["reference"], named(r["ema"]))
    # save_state after the first epoch, load_state in a fresh engine with other weights: bitwise at the end
    assert all(torch.equal(r["resumed_ema"][k], v) for k, v in r["ema"].items())
    assert all(torch.equal(r["resumed_masters"][k], v) for k, v in r["masters"].items())
    weights = load_ema_weights(out / "state")  # the save_state folder: its DeepSpeed checkpoint's EMA
    assert weights.keys() == r["saved"].keys() and all(torch.equal(weights[k], v) for k, v in r["saved"].items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed on GPUs under accelerate launch, one process "
                    "per GPU (2 at most): needs a CUDA GPU; on CPU the same checks run in one process above")
@pytest.mark.parametrize("part", ["trainer", "accelerate"])
def test_deepspeed_on_cuda_gpus(tmp_path, part):
    gpus = min(2, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus), "--num_machines", "1",
           "--dynamo_backend", "no", str(Path(__file__).with_name("hf_deepspeed.py")), str(tmp_path), part]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "DS_ACCELERATOR": "cuda", "ACCELERATE_USE_CPU": "false"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"{part}-rank{r}.pt", map_location="cpu", weights_only=True) for r in range(gpus)]
    for rank in ranks:
        for r in (rank.values() if part == "trainer" else [rank]):
            assert_close_to(r["reference"] if part == "accelerate" else named(r["reference"]), named(r["ema"]))
            assert all(torch.equal(r["resumed_ema"][k], v) for k, v in r["ema"].items())
            assert all(torch.equal(r["resumed_masters"][k], v) for k, v in r["masters"].items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP2 through accelerate needs CUDA GPUs: accelerate 1.x "
                    "enables FSDP only for GPU (and other accelerator) process groups, so on CPU processes its FSDP "
                    "plugin is not used")
@pytest.mark.parametrize("part", ["trainer", "accelerate"])
def test_fsdp2_through_accelerate_on_cuda_gpus(tmp_path, part):
    gpus = min(2, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus), "--num_machines", "1",
           "--dynamo_backend", "no", "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "NO_WRAP",
           "--fsdp_state_dict_type", "SHARDED_STATE_DICT", str(Path(__file__).with_name("hf_fsdp2.py")),
           str(tmp_path), part]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "ACCELERATE_USE_CPU": "false"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"{part}-rank{r}.pt", weights_only=True) for r in range(gpus)]
    for r in ranks:
        assert r["has_ema_folder"]  # each rank's EMA shards beside the optimizer's, in <checkpoint>/ema
        reference = named(r["reference"]) if part == "trainer" else r["reference"]
        assert_close_to(reference, named(r["ema"]))
        if part == "trainer":
            assert r["sharded"] and r["steps"] == r["global_step"] == r["resumed_steps"]
            assert r["eval_loss"] == pytest.approx(r["reference_loss"], rel=1e-5)  # evaluated on the EMA
            assert all(torch.equal(r["weights_after_eval"][k], v) for k, v in r["weights"].items())
        else:
            assert r["distributed"] == "FSDP" and r["loaded_steps"] * 2 == r["steps"] == r["resumed_steps"]
        # resumed from the first epoch's checkpoint with other initial weights: bitwise at the end
        assert all(torch.equal(r["resumed_ema"][k], v) for k, v in r["ema"].items())
        assert all(torch.equal(r["resumed_weights"][k], v) for k, v in r["weights"].items())


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
