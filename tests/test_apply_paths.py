"""Every stepping strategy (plain, fused, GradScaler) on both decision backends, against a
plain torch loop: clean steps are torch's clip + step, poisoned steps change nothing --
bitwise -- the first step included (a fused optimizer skipped through ``found_inf`` before
its state exists is left with an uninitialised momentum buffer)."""
from __future__ import annotations

import copy
from functools import partial
import math

import pytest
import torch
from torch import nn

import gradguard as gg

from _helpers import assert_bitwise, snapshot, mlp

OPTS = {
    "sgd_momentum": lambda ps, fused: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=fused),
    "adam": lambda ps, fused: torch.optim.Adam(ps, lr=0.01, fused=fused),
    "adamw": lambda ps, fused: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, fused=fused),
}
CLIPS = {
    "none": (lambda: None, lambda ps: None),
    "global_norm": (lambda: gg.GlobalNorm(0.3), lambda ps: nn.utils.clip_grad_norm_(ps, 0.3)),
    "value": (lambda: gg.Value(0.02), lambda ps: nn.utils.clip_grad_value_(ps, 0.02)),
}
POISONED = {"first": {0, 3}, "later": {2}}


_model = partial(mlp, 5, 7, 2)


def _backward(model, i, poison, scaler=None):
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(9, 5, generator=g), torch.randn(9, 2, generator=g)
    model.zero_grad()
    loss = nn.functional.mse_loss(model(x), y) * 3.0
    (loss if scaler is None else scaler.scale(loss)).backward()
    if poison:
        model[2].weight.grad[1, 0] = math.nan
    return loss


@pytest.mark.parametrize("poisoned", list(POISONED))
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("backend", ["host", "device"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("opt", list(OPTS))
def test_stepping_paths_match_a_torch_loop(opt, fused, backend, clip, poisoned):
    model, ref = _model(), _model()
    o, ref_o = OPTS[opt](model.parameters(), fused), OPTS[opt](ref.parameters(), fused)
    make_clip, ref_clip = CLIPS[clip]
    guard = gg.Guard(model, o, clip=make_clip(), backend=backend, detectors=[])
    bad = POISONED[poisoned]
    for i in range(6):
        before = snapshot(model, o)
        _backward(model, i, i in bad)
        report = guard.step()
        assert report.stats.xp.on_host is (backend == "host")  # the path asked for is the one that ran
        assert report.skipped is (i in bad)
        if i in bad:  # nothing moved, not even the optimizer's step count or a fresh buffer
            assert_bitwise(snapshot(model, o), before)
            if i == 0:
                assert len(o.state) == 0
            continue
        _backward(ref, i, False)
        ref_clip(list(ref.parameters()))
        ref_o.step()
        for (n, a), b in zip(model.named_parameters(), ref.parameters()):
            # a fused optimizer divides by grad_scale = 1/coef where torch multiplies by coef
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-8, msg=f"step {i}: {n}")
    assert guard.skipped_steps == len(bad)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("backend", ["host", "device"])
def test_grad_scaler_paths_skip_bitwise_and_match_torch(fused, backend):
    """With a GradScaler the guard unscales and clips; a poisoned first step (an Inf the scaler
    also sees) and a NaN loss with finite gradients (the scaler sees nothing) change nothing."""
    model, ref = _model(), _model()
    o = torch.optim.Adam(model.parameters(), lr=0.01, fused=fused)
    ref_o = torch.optim.Adam(ref.parameters(), lr=0.01, fused=fused)
    scaler, ref_scaler = torch.amp.GradScaler("cpu", init_scale=256.0), torch.amp.GradScaler("cpu", init_scale=256.0)
    guard = gg.Guard(model, o, clip=gg.GlobalNorm(0.3), scaler=scaler, backend=backend, detectors=[])
    for i in range(6):
        before = snapshot(model, o)
        loss = _backward(model, i, i == 0, scaler)
        nan_loss = i == 3
        report = guard.step(loss=loss * math.nan if nan_loss else loss)
        scaler.update()
        if i == 0 or nan_loss:
            assert report.skipped
            assert_bitwise(snapshot(model, o), before)
            continue
        assert not report.skipped
        _backward(ref, i, False, ref_scaler)
        ref_scaler.unscale_(ref_o)
        nn.utils.clip_grad_norm_(ref.parameters(), 0.3)
        ref_scaler.step(ref_o)
        ref_scaler.update()
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-8)
    # the scaler backed off once, for its own overflow (step 0), not for the NaN loss
    assert scaler.get_scale() == 128.0


def test_fused_first_step_poisoned_then_trains_like_torch():
    """The reported bug: a fused SGD whose first step is skipped through found_inf keeps an
    uninitialised momentum buffer (weights end ~1e35 off).  Ten more steps stay with torch."""
    model = _model()
    ref = copy.deepcopy(model)
    o = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    ref_o = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, fused=True)
    guard = gg.Guard(model, o, backend="device", detectors=[])
    _backward(model, 0, True)
    assert guard.step().skipped and len(o.state) == 0
    for i in range(1, 11):
        _backward(model, i, False)
        guard.step()
        _backward(ref, i, False)
        ref_o.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert_bitwise(a.detach(), b.detach())


class _NotFused(torch.optim.SGD):
    """A third-party optimizer that keeps a ``fused`` hyper-parameter but has no fused kernel
    (no grad_scale / found_inf support): it must be stepped plainly."""

    def __init__(self, params):
        super().__init__(params, lr=0.1)
        self.defaults["fused"] = True
        self._step_supports_amp_scaling = False


class _Custom(torch.optim.Optimizer):
    """A user optimizer with a ``fused`` hyper-parameter and no AMP-scaling attribute at all."""

    def __init__(self, params):
        super().__init__(params, dict(lr=0.1, fused=True))

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


def test_fused_means_both_flags():
    from gradguard.apply import is_fused

    p = [nn.Parameter(torch.zeros(2))]
    assert is_fused(torch.optim.Adam(p, fused=True)) and is_fused(torch.optim.SGD(p, lr=0.1, fused=True))
    assert not is_fused(torch.optim.Adam(p)) and not is_fused(torch.optim.SGD(p, lr=0.1))
    assert not is_fused(_NotFused(p)) and not is_fused(_Custom(p))
    model = _model()
    o = _NotFused(model.parameters())
    guard = gg.Guard(model, o, clip=gg.GlobalNorm(0.01), detectors=[])
    _backward(model, 0, False)
    guard.step()
    assert not hasattr(o, "grad_scale") and not hasattr(o, "found_inf")


@pytest.mark.parametrize("raises", [False, True])
def test_step_attributes_are_restored(raises):
    """``grad_scale`` / ``found_inf`` are set for the one call: an attribute the optimizer had
    before gets its value back, one it did not have is removed, even if the step raises."""
    from gradguard.apply import _step

    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    o = torch.optim.SGD([p], lr=0.1, fused=True)
    o.grad_scale = "before"
    seen = {}

    def closure():
        seen.update(grad_scale=o.grad_scale, found_inf=o.found_inf)
        if raises:
            raise RuntimeError("boom")

    orig = o.step
    o.step = lambda c=None: (c(), orig())  # noqa: E731
    try:
        _step(o, closure, grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))
    except RuntimeError:
        assert raises
    assert float(seen["grad_scale"]) == 2.0 and float(seen["found_inf"]) == 0.0
    assert o.grad_scale == "before" and not hasattr(o, "found_inf")
