"""gg.watch: recording an unchanged loop through the optimizer's hooks; and the warnings for a
guard whose optimizer is stepped directly."""
from __future__ import annotations

from functools import partial
import math
import warnings

import pytest
import torch
from torch import nn

import gradguard as gg

from _helpers import bits, mlp


_model = partial(mlp, 6, 16, 2)


def _backward(model, i, poison=False):
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    if poison:
        model[0].bias.grad[0] = math.nan


_bits = bits  # integer views of the float bits


@pytest.mark.parametrize("backend", ["host", "device"])
def test_watch_records_an_unchanged_loop_and_changes_nothing(tmp_path, backend):
    model, ref = _model(), _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    guard = gg.watch(model, opt, log_dir=tmp_path, run_name="w", backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no misuse warning: this is how watch is used
        for i in range(12):
            for m, o in ((model, opt), (ref, ref_opt)):
                _backward(m, i)
                o.step()
    guard.close()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(_bits(p), _bits(q))  # watching changed nothing
    assert guard.steps == 12
    assert gg.RunStore(tmp_path).steps("w")["step"].tolist() == list(range(12))


def test_watch_warns_on_a_nan_step_and_skips_only_when_asked():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gg.watch(model, opt)  # on_nonfinite="warn": the NaN step goes through
    with pytest.warns(RuntimeWarning, match="nonfinite|NaN"):
        for i in range(4):
            _backward(model, i, poison=i == 2)
            opt.step()
        guard.flush()
    assert [e.step for e in guard.events if e.kind == "nonfinite"][0] == 2  # then NaN weights
    assert not torch.isfinite(model[0].bias).all()

    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = gg.watch(model, opt, on_nonfinite="skip", clip=gg.GlobalNorm(1.0))
    for i in range(4):
        _backward(model, i, poison=i == 2)
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state[model[0].weight]["step"] == 3 and guard.skipped_steps == 1


def test_stepping_the_optimizer_directly_besides_the_guard_warns_once():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, detectors=[])
    with pytest.warns(UserWarning, match="called directly") as caught:
        for i in range(3):
            _backward(model, i)
            guard.step()
            opt.step()  # the bug: every update applied twice
    assert sum("called directly" in str(w.message) for w in caught) == 1


def test_a_guard_that_never_sees_a_step_warns():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, detectors=[])  # noqa: F841 (held, as a user holds it)
    with pytest.warns(UserWarning, match="never did"):
        for i in range(12):
            _backward(model, i)
            opt.step()


def test_check_then_the_callers_own_step_does_not_warn():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, detectors=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for i in range(12):
            _backward(model, i)
            if not guard.check().skipped:
                opt.step()
