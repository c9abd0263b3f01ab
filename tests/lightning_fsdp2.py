"""Lightning's ModelParallelStrategy (FSDP2, DTensor shards) on 2 CPU processes (gloo) with EMACallback;
run by tests/test_lightning.py. A fit that checkpoints every epoch (distributed checkpoints), a fit resumed
from one of them with other initial weights, a test on a checkpoint's EMA, and a fit that validates on the
training weights with ema_at_end=True. Each rank saves whole tensors."""

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parent))
import lightning_cases as cases  # noqa: E402

from triton_ema.integrations.lightning import EMACallback  # noqa: E402

EPOCHS = 3


class Sharded(cases.Regressor):
    def configure_model(self):
        if not isinstance(self.net, FSDPModule):  # Lightning calls it again for each fit and test
            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


def trainer(callbacks, **kw):
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return cases.trainer(callbacks, EPOCHS, devices=2, strategy=strategy, **kw)


def whole(tensors):
    return [t.full_tensor() if isinstance(t, DTensor) else t for t in tensors]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    ema, reference = EMACallback(cases.MOMENTUM), cases.Reference()
    saver = ModelCheckpoint(dirpath=out / "ckpts", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fit = trainer([ema, reference, saver], enable_checkpointing=True)
    model = Sharded()
    fit.fit(model, cases.loader(), cases.loader(16, seed=1))
    result = {"world_size": fit.world_size, "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
              "steps": ema.ema.num_steps, "reference": whole(reference.ema),
              "at_validation": [(whole(held), whole(ema64)) for held, ema64 in reference.at_validation],
              "after_validation": [(whole(after), whole(training)) for after, training in reference.after_validation],
              "val_loss": fit.callback_metrics["val_loss"].item(),
              "ema": whole(ema.ema.ema_state_dict().values()), "model": whole(model.parameters())}
    (tested,) = fit.test(model, cases.loader(16, seed=1), ckpt_path=str(out / "ckpts" / "epoch=1.ckpt"), verbose=False)
    result["test_loss_epoch_1"] = tested["test_loss"]

    resumed_ema = EMACallback(cases.MOMENTUM)
    resumed = Sharded(seed=5)  # other initial weights: everything must come from the checkpoint
    trainer([resumed_ema]).fit(resumed, cases.loader(), cases.loader(16, seed=1),
                               ckpt_path=str(out / "ckpts" / "epoch=1.ckpt"))
    result.update(resumed_steps=resumed_ema.ema.num_steps, resumed_ema=whole(resumed_ema.ema.ema_state_dict().values()),
                  resumed_model=whole(resumed.parameters()))

    # Validation on the training weights: the training, hence the EMA, must be the same, bitwise; with
    # ema_at_end=True the model then holds the EMA.
    plain, plain_ema = Sharded(), EMACallback(cases.MOMENTUM, validate_on_ema=False, ema_at_end=True)
    trainer([plain_ema]).fit(plain, cases.loader(), cases.loader(16, seed=1))
    result.update(ema_validated_on_training_weights=whole(plain_ema.ema.ema_state_dict().values()),
                  model_at_end=whole(plain.parameters()))
    torch.save(result, out / f"rank{fit.global_rank}.pt")
