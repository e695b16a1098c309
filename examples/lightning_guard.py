"""GradGuardCallback in a Lightning Trainer: one poisoned step is skipped, clipping by gradguard.

    python examples/lightning_guard.py [--log-dir runs]
"""
import argparse
import math

import lightning.pytorch as pl
import torch
from torch import nn

import gradguard as gg
from gradguard.integrations.lightning import GradGuardCallback


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.global_step == 10:  # a poisoned batch, as a corrupt record would give
            loss = loss * math.nan
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log-dir", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = x.sum(1, keepdim=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)

    cb = GradGuardCallback(clip=gg.GlobalNorm(1.0), log_dir=args.log_dir)
    trainer = pl.Trainer(max_steps=30, accelerator="cpu", callbacks=[cb], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(Regressor(), loader)

    print(f"steps {cb.guard.steps}, skipped {cb.guard.skipped_steps}")
    for event in cb.guard.events:
        print(event)


if __name__ == "__main__":
    main()
