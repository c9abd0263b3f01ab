"""The transformers Trainer with EMATrainer on 2 CPU processes (DDP on gloo), run by
tests/test_transformers.py under `accelerate launch`; each rank saves its EMA and a float64 reference."""

import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
import hf_cases as cases  # noqa: E402

from triton_ema.integrations.transformers import EMATrainer  # noqa: E402


class Reference(transformers.TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kw):
        self.ema = cases.Float64EMA(model.parameters())

    def on_step_end(self, args, state, control, model=None, **kw):
        self.ema.update(model.parameters())


if __name__ == "__main__":
    out = Path(sys.argv[1])
    args = transformers.TrainingArguments(
        output_dir=str(out / "run"), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=0.1, optim="sgd",
        lr_scheduler_type="constant", save_strategy="no", logging_strategy="no", report_to="none", use_cpu=True,
        seed=0, disable_tqdm=True)
    reference = Reference()
    trainer = EMATrainer(model=cases.Regressor(), args=args, train_dataset=cases.dataset(16, 0),
                         ema_momentum=cases.MOMENTUM, callbacks=[reference])
    trainer.train()
    torch.save({"world_size": args.world_size, "steps": trainer.ema.num_steps, "reference": reference.ema.ema,
                "ema": trainer.ema.ema_state_dict()}, out / f"rank{args.process_index}.pt")
