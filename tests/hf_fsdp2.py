"""The transformers Trainer and an accelerate loop under FSDP2 through accelerate (`accelerate launch --use_fsdp
--fsdp_version 2`), run by tests/test_transformers.py on CUDA GPUs: accelerate 1.x enables FSDP only for GPU
(and other accelerator) process groups, so on CPU processes its FSDP plugin is not used. `hf_fsdp2.py OUT PART`
runs the Trainer (PART trainer) or the loop (PART accelerate) and saves what each rank saw to OUT/PART-rank<r>.pt:
whole tensors (the DTensor shards gathered)."""

import sys
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
import hf_cases as cases  # noqa: E402
from models import regression_data, regression_loss  # noqa: E402

from triton_ema import attach  # noqa: E402
from triton_ema.integrations.transformers import EMATrainer, fsdp_ema_checkpoints  # noqa: E402

EPOCHS = 3


def whole(module):
    """Every parameter whole, by name (a collective: DTensor shards are gathered)."""
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().clone()
            for n, p in module.named_parameters()}


def full(state):
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone() for k, v in state.items()}


class Reference(transformers.TrainerCallback):
    def __init__(self):
        self.ema = None

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.ema = self.ema or {k: v.double() for k, v in whole(model).items()}

    def on_step_end(self, args, state, control, model=None, **kw):
        self.ema = {k: s + cases.MOMENTUM * (whole(model)[k].double() - s) for k, s in self.ema.items()}


def make_trainer(out, seed=0, callbacks=()):
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=8, num_train_epochs=EPOCHS,
        learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", eval_strategy="epoch", save_strategy="epoch",
        logging_strategy="no", report_to="none", seed=0, disable_tqdm=True)
    return EMATrainer(model=cases.Regressor(seed), args=args, train_dataset=cases.dataset(16, 0),
                      eval_dataset=cases.dataset(16, 1), ema_momentum=cases.MOMENTUM, callbacks=list(callbacks))


def trainer_run(out):
    reference = Reference()
    trainer = make_trainer(out / "run", callbacks=[reference])
    trainer.train()
    first_epoch = trainer.state.global_step // EPOCHS  # steps per epoch: 16 rows over the ranks, batches of 4
    result = {"sharded": all(isinstance(p, DTensor) for p in trainer.model.parameters()),
              "steps": trainer.ema.num_steps, "global_step": trainer.state.global_step, "reference": reference.ema,
              "ema": full(trainer.ema.ema_state_dict()), "weights": whole(trainer.model),
              "has_ema_folder": (out / "run" / f"checkpoint-{first_epoch}" / "ema").is_dir()}
    result["eval_loss"] = trainer.evaluate()["eval_loss"]
    result["weights_after_eval"] = whole(trainer.model)
    result["reference_loss"] = regression_loss([reference.ema[n] for n in result["weights"]], *regression_data(16, 1))

    resumed = make_trainer(out / "resumed", seed=5)  # other initial weights: everything from the checkpoint
    resumed.train(resume_from_checkpoint=str(out / "run" / f"checkpoint-{first_epoch}"))
    result.update(resumed_steps=resumed.ema.num_steps, resumed_ema=full(resumed.ema.ema_state_dict()),
                  resumed_weights=whole(resumed.model))
    return trainer.args.process_index, result


def accelerate_prepare(accelerator, seed):
    model = cases.Regressor(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(cases.dataset(16, 0), batch_size=4, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = attach(optimizer, cases.MOMENTUM, model=model)  # after prepare: the optimizer holds the shards now
    return model, optimizer, loader, ema, fsdp_ema_checkpoints(accelerator, ema)


def release(accelerator, hooks):
    for handle in hooks:
        handle.remove()
    accelerator.free_memory()


def accelerate_train(accelerator, model, optimizer, loader, epochs, reference=None):
    for _ in epochs:
        for batch in loader:
            accelerator.backward(model(**batch)["loss"])
            optimizer.step()
            optimizer.zero_grad()
            if reference is not None:
                reference.update(whole(model).values())


def accelerate_run(out):
    accelerator = Accelerator()
    model, optimizer, loader, ema, hooks = accelerate_prepare(accelerator, seed=0)
    reference = cases.Float64EMA(whole(model).values())
    accelerate_train(accelerator, model, optimizer, loader, range(2), reference)
    result = {"distributed": accelerator.distributed_type.name, "steps": ema.num_steps,
              "reference": [r.cpu() for r in reference.ema], "ema": full(ema.ema_state_dict()), "weights": whole(model)}
    release(accelerator, hooks)

    model, optimizer, loader, ema, hooks = accelerate_prepare(accelerator, seed=0)
    accelerate_train(accelerator, model, optimizer, loader, range(1))
    accelerator.save_state(str(out / "state"))
    result["has_ema_folder"] = (out / "state" / "ema").is_dir()
    release(accelerator, hooks)

    model, optimizer, loader, ema, hooks = accelerate_prepare(accelerator, seed=5)
    accelerator.load_state(str(out / "state"))
    result["loaded_steps"] = ema.num_steps
    accelerate_train(accelerator, model, optimizer, loader, range(1, 2))
    result.update(resumed_steps=ema.num_steps, resumed_ema=full(ema.ema_state_dict()), resumed_weights=whole(model))
    return accelerator.process_index, result


if __name__ == "__main__":
    out, part = Path(sys.argv[1]), sys.argv[2]
    rank, result = trainer_run(out) if part == "trainer" else accelerate_run(out)
    torch.save(result, out / f"{part}-rank{rank}.pt")
