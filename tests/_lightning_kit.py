"""The Lightning side of test_integration_lightning: imported by that module's first test,
not when pytest collects it (every xdist worker collects every file; Lightning takes ~4 s)."""
import math

import lightning.pytorch as pl
import torch
from torch import nn

from gradguard.integrations.lightning import GradGuardCallback  # noqa: F401  (re-exported)


class Tiny(pl.LightningModule):
    def __init__(self, bad_steps=(), poison="loss", opt="adam", lr=0.05):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.bad_steps, self.poison, self.opt, self.lr = set(bad_steps), poison, opt, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.net(x) - y) ** 2).mean()
        if self.global_step in self.bad_steps:
            loss = loss * (math.nan if self.poison == "loss" else math.inf)
        return loss

    def configure_optimizers(self):
        if self.opt == "adam":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Snapshot(pl.Callback):
    """Weights and optimizer state around the poisoned step."""

    def __init__(self, step):
        self.step, self.before, self.after = step, None, None

    @staticmethod
    def _take(trainer, module):
        opt = trainer.optimizers[0]
        return ([p.detach().clone() for p in module.parameters()],
                [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                 for p in module.parameters()])

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.before = self._take(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            self.after = self._take(trainer, module)


class Scheduled(Tiny):
    """A per-step schedule that depends on the scheduler's step count only."""

    def __init__(self, interval="step", **kw):
        super().__init__(**kw)
        self.interval = interval

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8 ** s)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}
