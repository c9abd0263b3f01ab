"""A bare accelerate loop with an attached EMA, run by tests/test_transformers.py under
`accelerate launch` (2 CPU processes): an uninterrupted run, and one stopped by
save_state and continued by load_state in fresh objects. Each rank saves what it ends with."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
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


def train(accelerator, model, optimizer, loader, epochs, reference=None):
    for _ in range(epochs):
        for batch in loader:
            with accelerator.autocast():
                loss = model(**batch)["loss"]
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            if reference is not None:
                reference.update(accelerator.unwrap_model(model).parameters())


if __name__ == "__main__":
    out = Path(sys.argv[1])
    accelerator = Accelerator()
    model, optimizer, loader, ema = prepare(accelerator, seed=0)
    reference = cases.Float64EMA(accelerator.unwrap_model(model).parameters())
    train(accelerator, model, optimizer, loader, 2, reference)
    result = {"world_size": accelerator.num_processes, "distributed": accelerator.distributed_type.name,
              "steps": ema.num_steps, "reference": reference.ema,
              "ema": ema.ema_state_dict(), "model": accelerator.unwrap_model(model).state_dict()}
    accelerator.free_memory()

    model, optimizer, loader, ema = prepare(accelerator, seed=0)
    train(accelerator, model, optimizer, loader, 1)
    accelerator.save_state(str(out / "state"))
    accelerator.free_memory()

    model, optimizer, loader, ema = prepare(accelerator, seed=5)  # other weights: all must come from the state
    accelerator.load_state(str(out / "state"))
    assert ema.num_steps == 4, ema.num_steps
    train(accelerator, model, optimizer, loader, 1)
    result.update(resumed_ema=ema.ema_state_dict(), resumed_model=accelerator.unwrap_model(model).state_dict())
    torch.save(result, out / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
