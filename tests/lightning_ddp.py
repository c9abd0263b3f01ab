"""Lightning DDP on 2 CPU processes (gloo) with EMACallback; run by tests/test_lightning.py.

Lightning's DDP launcher starts this script again for the second rank; each
rank saves its EMA, its model after fit (ema_at_end=True) and a float64 reference."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lightning_cases as cases  # noqa: E402

from triton_ema.integrations.lightning import EMACallback  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    ema, reference = EMACallback(cases.MOMENTUM, ema_at_end=True), cases.Reference()
    trainer = cases.trainer([ema, reference], 2, devices=2, strategy="ddp")
    model = cases.Regressor()
    trainer.fit(model, cases.loader(), cases.loader(16, seed=1))
    torch.save({"world_size": trainer.world_size, "steps": ema.ema.num_steps, "reference": reference.ema,
                "ema": ema.ema.ema_state_dict(), "model": model.state_dict()}, out / f"rank{trainer.global_rank}.pt")
