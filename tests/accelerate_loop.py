"""A bare accelerate loop with an attached EMA, run by tests/test_transformers.py under
`accelerate launch` (2 CPU processes, or fp16 on one GPU): an uninterrupted run, and one stopped by
save_state and continued by load_state in fresh objects. Each rank saves what it ends with.
With a GradScaler (fp16), one step gets an infinite gradient, which the scaler skips."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradScalerKwargs
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
import hf_cases as cases  # noqa: E402

from triton_ema import attach  # noqa: E402


def prepare(accelerator, seed):
    model = cases.Regressor(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = attach(optimizer, cases.MOMENTUM, model=model)  # before prepare: the EMA of the inner model
    loader = DataLoader(cases.dataset(32, 0), batch_size=4, shuffle=False)  # 4 steps per epoch on each of 2 ranks
    return (*accelerator.prepare(model, optimizer, loader), ema)


SKIPPED_STEP = 2  # of the first epoch, with a GradScaler


def train(accelerator, model, optimizer, loader, ema, epochs, reference=None):
    """Train the ``epochs`` (a range); returns the steps the optimizer skipped, each with the EMA before and after."""
    skipped = []
    for epoch in epochs:
        for step, batch in enumerate(loader):
            with accelerator.autocast():
                loss = model(**batch)["loss"]
            accelerator.backward(loss)
            if accelerator.scaler is not None and (epoch, step) == (0, SKIPPED_STEP):
                next(model.parameters()).grad.fill_(float("inf"))
            before = copied(ema.ema_state_dict())
            optimizer.step()
            optimizer.zero_grad()
            if optimizer.step_was_skipped:
                skipped.append({"step": step, "before": before, "after": copied(ema.ema_state_dict())})
            elif reference is not None:
                reference.update(accelerator.unwrap_model(model).parameters())
    return skipped


def copied(state):
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    # fp16: a small first loss scale, so that the only skipped step is the one given an infinite gradient.
    accelerator = Accelerator(kwargs_handlers=[GradScalerKwargs(init_scale=2.0**8)])
    model, optimizer, loader, ema = prepare(accelerator, seed=0)
    reference = cases.Float64EMA(accelerator.unwrap_model(model).parameters())
    skipped = train(accelerator, model, optimizer, loader, ema, range(2), reference)
    result = {"world_size": accelerator.num_processes, "distributed": accelerator.distributed_type.name,
              "mixed_precision": accelerator.mixed_precision, "scaler": accelerator.scaler is not None,
              "steps_per_epoch": len(loader), "steps": ema.num_steps, "skipped": skipped,
              "reference": [r.cpu() for r in reference.ema], "ema": copied(ema.ema_state_dict()),
              "model": copied(accelerator.unwrap_model(model).state_dict())}
    accelerator.free_memory()

    model, optimizer, loader, ema = prepare(accelerator, seed=0)
    first_epoch = len(loader) - len(train(accelerator, model, optimizer, loader, ema, range(1)))
    accelerator.save_state(str(out / "state"))
    accelerator.free_memory()

    model, optimizer, loader, ema = prepare(accelerator, seed=5)  # other weights: all must come from the state
    accelerator.load_state(str(out / "state"))
    assert ema.num_steps == first_epoch, (ema.num_steps, first_epoch)
    train(accelerator, model, optimizer, loader, ema, range(1, 2))
    result.update(resumed_ema=copied(ema.ema_state_dict()),
                  resumed_model=copied(accelerator.unwrap_model(model).state_dict()))
    torch.save(result, out / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
