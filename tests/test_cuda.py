"""The GPU path: statistics on device, no host sync per step (skipped without CUDA)."""
import math

import pytest
import torch
from torch import nn

import gradguard as gg

from conftest import no_host_sync

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_stats_match_cpu(dtype):
    torch.manual_seed(0)
    grads = [torch.randn(s).to(dtype) for s in [(300, 200), (200,), (7, 7, 3)]]
    grads[1][5] = math.nan
    named = []
    for i, g in enumerate(grads):
        p = nn.Parameter(torch.zeros(g.shape, dtype=dtype, device="cuda"))
        p.grad = g.cuda()
        named.append((f"p{i}", p))
    s = gg.grad_stats(named)
    assert s.norms.device.type == "cuda"
    for i, g in enumerate(grads):
        if i == 1:
            assert bool(s.nonfinite[1])
            continue
        assert s.norms[i].item() == pytest.approx(g.double().norm().item(), rel=1e-3)
        assert s.max_abs[i].item() == pytest.approx(g.double().abs().max().item(), rel=1e-3)


def test_cuda_guard_step_has_no_host_sync():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(1.0), flush_every=32)
    x, y = torch.randn(16, 32, device="cuda"), torch.randn(16, 4, device="cuda")
    for step in range(10):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step == 6:
            model[0].weight.grad[0, 0] = math.nan
        if step == 0:  # the fused optimizer's state does not exist yet: decided on the host
            guard.step(loss=loss)
            continue
        before = [p.detach().clone() for p in model.parameters()]
        with no_host_sync():
            guard.step(loss=loss)
        if step == 6:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert guard.skipped_steps == 1 and guard.events[0].step == 6
