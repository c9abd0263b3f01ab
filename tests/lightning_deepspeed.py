"""Lightning's DeepSpeedStrategy (ZeRO 2 fp32, ZeRO 3 bf16) on 2 CPU processes (gloo) with EMACallback;
run by tests/test_lightning.py. Lightning refuses this strategy on a CPU in one place,
``setup_environment`` ("only supported on CUDA GPUs"); ``CPUDeepSpeedStrategy`` drops that check alone,
and CPU devices with an index (``cpu:<rank>``) give DeepSpeed the device rank it reads. Everything else is
Lightning's strategy and DeepSpeed's engine on DeepSpeed's CPU accelerator.

For each configuration: a fit that validates and checkpoints every epoch (DeepSpeed checkpoint folders), a
float64 EMA of the full fp32 master weights after every step, what the module computed during validation;
test() after the fit and test(ckpt_path=) of a checkpoint; a fit resumed from a checkpoint with other initial
weights; a fit validating on the training weights with ema_at_end=True. Each rank saves what it saw.
`lightning_deepspeed.py OUT cuda` runs Lightning's own DeepSpeedStrategy on CUDA GPUs instead."""

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cuda" if sys.argv[2:3] == ["cuda"] else "cpu")

import torch  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import lightning_cases as cases  # noqa: E402

from triton_ema.integrations.lightning import EMACallback  # noqa: E402

EPOCHS = 3
CONFIGS = {"stage2-fp32": (2, "32-true"), "stage3-bf16": (3, "bf16-mixed")}
PROBE = cases.loader(8, seed=7).dataset.tensors[0]


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's, without its CUDA-only check


class Probed(cases.Regressor):
    """Records what it computes on a fixed batch in each validation and test epoch (ZeRO-3 gathers the
    partitioned parameters for it)."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.probed = []

    def on_validation_epoch_end(self):
        with torch.no_grad():
            self.probed.append(self.net(PROBE.to(self.device, next(self.net.parameters()).dtype)).float().cpu())

    def on_test_epoch_end(self):
        self.on_validation_epoch_end()


def full_masters(trainer):
    """The full fp32 master weight of every parameter (a collective under ZeRO)."""
    return [safe_get_full_fp32_param(p).detach().cpu().clone() for p in trainer.strategy.deepspeed_engine.module.parameters()]


class Reference(Callback):
    """A float64 EMA of the full master weights after every step, and, first in the callback list (before the
    EMACallback swaps), the full EMA and the masters when each validation starts."""

    def __init__(self, ema):
        self.callback, self.ema, self.validations = ema, None, []

    def on_fit_start(self, trainer, pl_module):
        self.ema = [m.double() for m in full_masters(trainer)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ema = [s + cases.MOMENTUM * (m.double() - s) for s, m in zip(self.ema, full_masters(trainer))]

    def on_validation_epoch_start(self, trainer, pl_module):
        self.validations.append({"ema": self.callback.ema.ema_state_dict(full=True), "masters": full_masters(trainer),
                                 "reference": [s.clone() for s in self.ema]})


class AfterValidation(Callback):
    """After the EMACallback, which swaps back in its on_validation_end (ModelCheckpoint saves after all others):
    the masters, and the EMA that the checkpoint gets."""

    def __init__(self, ema, reference):
        self.callback, self.reference = ema, reference

    def on_validation_end(self, trainer, pl_module):
        self.reference.validations[-1].update(masters_after=full_masters(trainer),
                                              saved=self.callback.ema.ema_state_dict(full=True))


CUDA = len(sys.argv) > 2 and sys.argv[2] == "cuda"  # Lightning's own strategy, unchanged, on 2 GPUs (or 1)


def trainer(name, callbacks, **kw):
    stage, precision = CONFIGS[name]
    config = {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 4},
              "zero_allow_untested_optimizer": True, "train_micro_batch_size_per_gpu": cases.BATCH}
    if CUDA:
        strategy = DeepSpeedStrategy(config=config)
        kw.update(accelerator="cuda", devices=min(2, torch.cuda.device_count()))
    else:
        strategy = CPUDeepSpeedStrategy(config=config, process_group_backend="gloo",
                                        parallel_devices=[torch.device("cpu", i) for i in range(2)])
    return cases.trainer(callbacks, EPOCHS, strategy=strategy, precision=precision, **kw)


def run(name, out):
    ckpts = out / name
    ema = EMACallback(cases.MOMENTUM)
    reference = Reference(ema)
    saver = ModelCheckpoint(dirpath=ckpts, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fit = trainer(name, [reference, ema, AfterValidation(ema, reference), saver], enable_checkpointing=True)
    model = Probed()
    fit.fit(model, cases.loader(), cases.loader(16, seed=1))
    result = {"world_size": fit.world_size, "optimizer": type(fit.strategy.deepspeed_engine.optimizer).__name__,
              "dtype": str(next(fit.strategy.deepspeed_engine.module.parameters()).dtype),
              "partitioned": any(p.numel() == 0 for p in fit.strategy.deepspeed_engine.module.parameters()),
              "steps": ema.ema.num_steps, "reference": reference.ema, "ema": ema.ema.ema_state_dict(full=True),
              "masters": full_masters(fit), "validations": reference.validations,
              "probed_validation": model.probed[:], "val_loss": fit.callback_metrics["val_loss"].item()}
    fit.test(model, cases.loader(16, seed=1), verbose=False)
    if CONFIGS[name][0] < 3:  # ZeRO-3: the engine Lightning builds to test cannot load a checkpoint (DeepSpeed 0.19)
        fit.test(model, cases.loader(16, seed=1), ckpt_path=str(ckpts / "epoch=1.ckpt"), verbose=False)
        fresh, fresh_model = trainer(name, [EMACallback(cases.MOMENTUM)]), Probed(seed=5)  # no fit in this Trainer
        fresh.test(fresh_model, cases.loader(16, seed=1), ckpt_path=str(ckpts / "epoch=1.ckpt"), verbose=False)
        result["fresh_test"] = fresh_model.probed
    result["probed_test"], result["after_test"] = model.probed[EPOCHS:], full_masters(fit)

    resumed_ema = EMACallback(cases.MOMENTUM)
    resumed = Probed(seed=5)  # other initial weights: everything must come from the checkpoint
    resumed_fit = trainer(name, [resumed_ema])
    resumed_fit.fit(resumed, cases.loader(), cases.loader(16, seed=1), ckpt_path=str(ckpts / "epoch=0.ckpt"))
    result.update(resumed_steps=resumed_ema.ema.num_steps, resumed_ema=resumed_ema.ema.ema_state_dict(full=True),
                  resumed_masters=full_masters(resumed_fit))

    plain_ema = EMACallback(cases.MOMENTUM, validate_on_ema=False, ema_at_end=True)
    plain_fit = trainer(name, [plain_ema])
    plain_fit.fit(Probed(), cases.loader(), cases.loader(16, seed=1))
    result.update(ema_validated_on_training_weights=plain_ema.ema.ema_state_dict(full=True),
                  masters_at_end=full_masters(plain_fit))
    return fit.global_rank, result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    results = {}
    for name in CONFIGS:
        rank, results[name] = run(name, out)
    torch.save(results, out / f"rank{rank}.pt")
