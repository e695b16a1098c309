"""The recipes of docs/recipes.md, run: each one checked against the plain loop it replaces."""
from __future__ import annotations

from functools import partial
import torch
from torch import nn

import gradguard as gg

from _helpers import mlp


_model = partial(mlp, 6, 16, 2)


def _micro(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(4, 6, generator=g), torch.randn(4, 2, generator=g)


def test_gradient_accumulation_recipe():
    """Accumulate k micro-batches, then one guard.step with the mean loss: the same update as
    torch's clip_grad_norm_ + step on the accumulated gradients."""
    k = 4
    model, ref = _model(), _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(0.5))
    for step in range(5):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            total = 0.0
            for j in range(k):
                x, y = _micro(step * k + j)
                loss = nn.functional.mse_loss(m(x), y) / k
                loss.backward()
                total += loss.detach()
            if m is model:
                report = guard.step(loss=total)  # one step per k micro-batches, with their loss
                assert report.applied
            else:
                torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
                ref_opt.step()
    assert guard.steps == 5
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)


def test_compiled_model_recipe():
    """torch.compile(model) and the plain model give the guard the same names."""
    model = _model()
    compiled = torch.compile(model)
    policy = gg.PerLayer({"2.*": gg.GlobalNorm(5.0)}, default=gg.GlobalNorm(1.0))
    guard = gg.Guard(compiled, torch.optim.SGD(compiled.parameters(), lr=0.1), clip=policy)
    assert guard.names == [n for n, _ in model.named_parameters()]
