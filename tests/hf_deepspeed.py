"""The transformers Trainer with a DeepSpeed config (ZeRO-2 and ZeRO-3) and an accelerate loop with
DeepSpeedPlugin, on DeepSpeed's CPU accelerator; run by tests/test_transformers.py in one process each
(accelerate 1.x runs DeepSpeed on CPU processes only alone: with no GPU its state finds no process-group
backend and counts one process). `hf_deepspeed.py OUT PART` runs the Trainer (PART trainer) or the loop
(PART accelerate) and saves what it saw to OUT/PART-rank<r>.pt; on CUDA GPUs it runs under
`accelerate launch`, one process per GPU."""

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator, DeepSpeedPlugin  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import hf_cases as cases  # noqa: E402
from models import regression_data, regression_loss  # noqa: E402

from triton_ema.integrations.deepspeed import attach  # noqa: E402
from triton_ema.integrations.transformers import EMATrainer  # noqa: E402

EPOCHS, STEPS_PER_EPOCH = 3, 4
STAGES = {"stage2": 2, "stage3": 3}


def full_masters(module):
    """The full fp32 master weight of every parameter, by name."""
    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in module.named_parameters()}


class Reference(transformers.TrainerCallback):
    """A float64 EMA of the full masters after every step, and the EMA the Trainer saves in each checkpoint."""

    def __init__(self):
        self.ema, self.trainer, self.saved = None, None, {}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.ema = self.ema or {k: v.double() for k, v in full_masters(model).items()}

    def on_step_end(self, args, state, control, model=None, **kw):
        self.ema = {k: s + cases.MOMENTUM * (full_masters(model)[k].double() - s) for k, s in self.ema.items()}

    def on_save(self, args, state, control, **kw):
        self.saved[state.global_step] = self.trainer.ema.ema_state_dict(full=True)


def make_trainer(out, stage, seed=0, callbacks=()):
    config = {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 4,
                                    "stage3_gather_16bit_weights_on_model_save": True},
              "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "zero_allow_untested_optimizer": True}
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=16, num_train_epochs=EPOCHS,
        learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", eval_strategy="epoch", save_strategy="epoch",
        logging_strategy="no", report_to="none", seed=0, disable_tqdm=True, deepspeed=config)
    return EMATrainer(model=cases.Regressor(seed), args=args, train_dataset=cases.dataset(16, 0),
                      eval_dataset=cases.dataset(16, 1), ema_momentum=cases.MOMENTUM, callbacks=list(callbacks),
                      save_ema_model=True)


def trainer_run(name, out):
    reference = Reference()
    trainer = make_trainer(out / name, STAGES[name], callbacks=[reference])
    reference.trainer = trainer
    trainer.train()
    engine = trainer.model_wrapped
    result = {"engine": type(engine).__name__, "optimizer": type(engine.optimizer).__name__,
              "partitioned": any(p.numel() == 0 for p in trainer.model.parameters()), "steps": trainer.ema.num_steps,
              "global_step": trainer.state.global_step, "reference": reference.ema, "saved": reference.saved,
              "ema": trainer.ema.ema_state_dict(full=True), "masters": full_masters(trainer.model)}
    result["eval_loss"] = trainer.evaluate()["eval_loss"]
    result["masters_after_eval"] = full_masters(trainer.model)
    result["training_loss"] = regression_loss(list(result["masters"].values()), *regression_data(16, 1))
    trainer.save_model(str(out / name / "export"))

    resumed = make_trainer(out / f"{name}-resumed", STAGES[name], seed=5)  # other initial weights
    resumed.train(resume_from_checkpoint=str(out / name / f"checkpoint-{STEPS_PER_EPOCH}"))
    result.update(resumed_steps=resumed.ema.num_steps, resumed_ema=resumed.ema.ema_state_dict(full=True),
                  resumed_masters=full_masters(resumed.model))
    return result


def accelerate_prepare(accelerator, seed):
    model = cases.Regressor(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(cases.dataset(16, 0), batch_size=4, shuffle=False)
    engine, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return engine, optimizer, loader, attach(engine, cases.MOMENTUM)  # the engine prepare built


def accelerate_train(accelerator, engine, optimizer, loader, epochs, reference=None):
    for _ in epochs:
        for batch in loader:
            accelerator.backward(engine(**batch)["loss"])
            optimizer.step()
            optimizer.zero_grad()
            if reference is not None:
                reference.update(full_masters(engine.module).values())


def accelerate_run(out):
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=1))
    engine, optimizer, loader, ema = accelerate_prepare(accelerator, seed=0)
    reference = cases.Float64EMA(full_masters(engine.module).values())
    accelerate_train(accelerator, engine, optimizer, loader, range(2), reference)
    result = {"engine": type(engine).__name__, "steps": ema.num_steps, "reference": reference.ema,
              "ema": ema.ema_state_dict(full=True), "masters": full_masters(engine.module)}
    accelerator.free_memory()

    engine, optimizer, loader, ema = accelerate_prepare(accelerator, seed=0)
    accelerate_train(accelerator, engine, optimizer, loader, range(1))
    accelerator.save_state(str(out / "state"))
    result["saved"] = ema.ema_state_dict(full=True)
    accelerator.free_memory()

    engine, optimizer, loader, ema = accelerate_prepare(accelerator, seed=5)  # all must come from the state
    accelerator.load_state(str(out / "state"))
    result["loaded_steps"] = ema.num_steps
    accelerate_train(accelerator, engine, optimizer, loader, range(1, 2))
    result.update(resumed_steps=ema.num_steps, resumed_ema=ema.ema_state_dict(full=True),
                  resumed_masters=full_masters(engine.module))
    accelerator.free_memory()
    return result


if __name__ == "__main__":
    out, part = Path(sys.argv[1]), sys.argv[2]  # one Accelerator's DeepSpeed plugin per process: one part each
    results = {name: trainer_run(name, out) for name in STAGES} if part == "trainer" else accelerate_run(out)
    torch.save(results, out / f"{part}-rank{os.environ.get('RANK', '0')}.pt")
