"""A tiny Lightning module, its data and a float64 reference EMA, shared by
tests/test_lightning.py and the DDP script it launches (tests/lightning_ddp.py)."""

import lightning.pytorch as pl
import torch
from models import float64_ema_step, regression_data, regression_net
from torch.utils.data import DataLoader, TensorDataset

MOMENTUM, BATCH = 0.3, 8


def loader(n=32, seed=0):
    return DataLoader(TensorDataset(*regression_data(n, seed)), batch_size=BATCH, shuffle=False)


class Regressor(pl.LightningModule):
    def __init__(self, seed=0):
        super().__init__()
        self.net = regression_net(seed)

    def loss(self, batch):
        x, y = batch
        return (self.net(x) - y).square().mean()

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch), on_epoch=True, sync_dist=True)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.loss(batch), on_epoch=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Sampling(Regressor):
    """Records the weights it holds in its own on_validation_epoch_end and on_test_epoch_end (where diffusion
    models sample), and saves a checkpoint from there (``trainer.save_checkpoint``) into ``save_dir``."""

    def __init__(self, save_dir, seed=0):
        super().__init__(seed)
        self.save_dir, self.at_epoch_end = save_dir, {"validate": [], "test": []}

    def on_validation_epoch_end(self):
        self.at_epoch_end["validate"].append([p.detach().clone() for p in self.parameters()])
        self.trainer.save_checkpoint(f"{self.save_dir}/epoch_end={self.current_epoch}.ckpt")
        self.at_epoch_end["validate"][-1] += [p.detach().clone() for p in self.parameters()]  # and after the save

    def on_test_epoch_end(self):
        self.at_epoch_end["test"].append([p.detach().clone() for p in self.parameters()])


class Reference(pl.Callback):
    """A float64 EMA of the weights after every optimizer step, and what the model held around validation
    (when the validation epoch starts, and once validation has ended).

    Put it after the EMACallback: its hooks then see the model as that callback left it."""

    def __init__(self, momentum=MOMENTUM):
        self.momentum = momentum
        self.ema, self.at_validation, self.after_validation, self.training = None, [], [], None

    def on_fit_start(self, trainer, pl_module):
        self.ema = [p.detach().double().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ema = float64_ema_step(self.ema, pl_module.parameters(), self.momentum)
        self.training = [p.detach().clone() for p in pl_module.parameters()]

    def on_validation_epoch_start(self, trainer, pl_module):
        self.at_validation.append(([p.detach().clone() for p in pl_module.parameters()], [s.clone() for s in self.ema]))

    def on_validation_end(self, trainer, pl_module):
        self.after_validation.append(([p.detach().clone() for p in pl_module.parameters()], self.training))


def trainer(callbacks, max_epochs, **kw):
    args = dict(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False)
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)
