"""gradguard in a Hugging Face Accelerate loop: ``guard.step(loss)`` in place of ``optimizer.step()``.

    python examples/accelerate_loop.py            # CPU is enough; step 5's batch is NaN

The recipe (docs/integrations/accelerate.md):
- ``accelerator.prepare`` the model, optimizer and data as usual; build the Guard on the
  unwrapped model (its names, without DDP's ``module.``) and the prepared optimizer;
- give the LR scheduler to the guard (``Guard(scheduler=...)``), not to ``prepare``: the guard
  steps it after applied updates only (Accelerate skips it only for its own fp16 overflow);
- let the guard clip (``clip=gg.GlobalNorm(c)``) instead of ``accelerator.clip_grad_norm_``;
- under ``accelerator.accumulate``, step the guard once per optimizer step, when
  ``accelerator.sync_gradients``, with the loss of the whole accumulation window.
"""
from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from torch import nn

import gradguard as gg


def data(n_batches=24, batch=8, seed=0, nan_batch=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch, 6, generator=g)
    y = x.sum(1, keepdim=True) * 3
    if nan_batch is not None:
        x[nan_batch * batch] = math.nan
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def train(steps=6, accumulate=2, clip=1.0, guarded=True, nan_batch=None, log_dir=None, run_name=None):
    """``steps`` optimizer steps of ``accumulate`` micro-batches each.

    ``guarded=False`` is the plain Accelerate loop it replaces (``clip_grad_norm_``,
    ``optimizer.step()``, ``scheduler.step()``).  Returns the model, the guard (None
    unguarded), the scheduler, and the learning rate and loss of every optimizer step.
    """
    torch.manual_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=accumulate, cpu=True)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.9 ** s)
    loader = data(n_batches=steps * accumulate, nan_batch=nan_batch)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    guard = None
    if guarded:
        guard = gg.Guard(accelerator.unwrap_model(model), optimizer, clip=gg.GlobalNorm(clip),
                         scheduler=scheduler, log_dir=log_dir, run_name=run_name)
    lrs, losses, window_loss = [], [], 0.0
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)  # divides by `accumulate` itself
            window_loss = window_loss + loss.detach() / accumulate
            if accelerator.sync_gradients:  # the last micro-batch of the window
                lrs.append(optimizer.param_groups[0]["lr"])
                losses.append(float(window_loss))  # for the test; a real loop would not read it back
                if guard is not None:
                    guard.step(loss=window_loss)  # clips, steps (or withholds), steps the scheduler
                else:
                    accelerator.clip_grad_norm_(model.parameters(), clip)
                    optimizer.step()
                    scheduler.step()
                optimizer.zero_grad()
                window_loss = 0.0
    if guard is not None:
        guard.close()
    return accelerator.unwrap_model(model), guard, scheduler, lrs, losses


def main():
    model, guard, scheduler, _, _ = train(steps=8, nan_batch=5)
    print(f"steps {guard.steps}, skipped {guard.skipped_steps}, scheduler steps {scheduler.last_epoch}")
    for ev in guard.events:
        print(ev)
    assert all(torch.isfinite(p).all() for p in model.parameters())


if __name__ == "__main__":
    main()
