"""Skips that keep every counter honest (schedulers, GradScaler, EMA), and the step's own
guards: one thread at a time, parameters added after the guard, failing detectors/remedies."""
from __future__ import annotations

from functools import partial
import math
import threading
import warnings

import pytest
import torch
from torch import nn

import gradguard as gg

from _helpers import bits, mlp

BAD = (0, 5)  # poisoned steps: the first one too (torch warns when a scheduler steps first)


_model = partial(mlp, 6, 16, 2)


def _backward(model, i, poison=False, scaler=None):
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
    model.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if poison:
        model[0].weight.grad[0, 0] = math.nan
    return loss


_bits = bits  # integer views of the float bits


SCHEDULERS = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9 ** k),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20),
}


@pytest.mark.parametrize("backend", ["host", "device"])
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_scheduler_steps_after_applied_updates_only(sched, backend):
    """A skipped step advances neither the optimizer nor the schedule; the run equals the same
    run with the poisoned batches left out, and torch never warns about the order."""
    model, ref = _model(), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    s, ref_s = SCHEDULERS[sched](opt), SCHEDULERS[sched](ref_opt)
    guard = gg.Guard(model, opt, scheduler=s, backend=backend, detectors=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(12):
            _backward(model, i, poison=i in BAD)
            report = guard.step()
            assert report.applied == (i not in BAD)
            if i not in BAD:
                _backward(ref, i)
                ref_opt.step()
                ref_s.step()
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    applied = 12 - len(BAD)
    assert s.last_epoch == ref_s.last_epoch == applied
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(_bits(p), _bits(q))


@pytest.mark.parametrize("fused", [False, True])
def test_scaler_does_not_back_off_on_a_data_nan(fused):
    """A NaN loss with finite gradients is withheld; the GradScaler's scale is untouched. Its
    own overflow still backs it off (and is withheld too)."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused) if fused \
        else torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10_000)
    guard = gg.Guard(model, opt, scaler=scaler, detectors=[])
    for i in range(3):  # optimizer state exists
        loss = _backward(model, i, scaler=scaler)
        guard.step(loss=loss)
        scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model, 3, scaler=scaler)
    report = guard.step(loss=math.nan)  # the data says NaN, the gradients are finite
    scaler.update()
    assert report.skipped and scaler.get_scale() == 1024.0
    assert all(torch.equal(_bits(p), _bits(q)) for p, q in zip(model.parameters(), before))
    _backward(model, 4, scaler=scaler)
    model[2].bias.grad[0] = math.inf  # an fp16-style overflow: the scaler's own business
    assert guard.step(loss=1.0).skipped
    scaler.update()
    assert scaler.get_scale() == 512.0
    assert all(torch.equal(_bits(p), _bits(q)) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("backend", ["host", "device"])
def test_ema_is_not_updated_on_withheld_steps(backend):
    model, ref = _model(), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ema = torch.optim.swa_utils.AveragedModel(model)
    ref_ema = torch.optim.swa_utils.AveragedModel(ref)
    guard = gg.Guard(model, opt, ema=ema, backend=backend, detectors=[])
    for i in range(8):
        _backward(model, i, poison=i in BAD)
        guard.step()
        if i not in BAD:
            _backward(ref, i)
            ref_opt.step()
            ref_ema.update_parameters(ref)
    assert int(ema.n_averaged) == int(ref_ema.n_averaged) == 8 - len(BAD)
    for p, q in zip(ema.parameters(), ref_ema.parameters()):
        assert torch.equal(_bits(p), _bits(q))


@pytest.mark.parametrize("bad,exc,match", [
    (dict(scheduler=object()), TypeError, "scheduler"),
    (dict(ema=object()), TypeError, "ema"),
])
def test_bad_scheduler_or_ema_names_the_argument(bad, exc, match):
    model = _model()
    with pytest.raises(exc, match=match):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), **bad)


class _BlockingSGD(torch.optim.SGD):
    def __init__(self, params, entered, release):
        super().__init__(params, lr=0.1)
        self.entered, self.release = entered, release

    def step(self, closure=None):
        self.entered.set()
        assert self.release.wait(10)
        return super().step(closure)


def test_step_from_two_threads_is_refused():
    model = _model()
    entered, release = threading.Event(), threading.Event()
    guard = gg.Guard(model, _BlockingSGD(model.parameters(), entered, release), detectors=[])
    _backward(model, 0)
    errors = []
    t = threading.Thread(target=lambda: errors.append(guard.step()))
    t.start()
    assert entered.wait(10)
    try:
        with pytest.raises(RuntimeError, match="another thread"):
            guard.step()
    finally:
        release.set()
        t.join(10)
    assert guard.steps == 1 and len(errors) == 1


def test_parameters_added_after_the_guard_are_refused_at_the_next_step():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, detectors=[])
    _backward(model, 0)
    guard.step()
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.full((3,), math.nan)
    _backward(model, 1)
    with pytest.raises(ValueError, match="add_param_group"):
        guard.step()
    assert torch.equal(extra, torch.zeros(3))  # its NaN was not stepped


class _Broken:
    def bind(self, run):
        pass

    def update(self, steps, rows, run):
        raise ZeroDivisionError("a buggy custom detector")

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass


def test_a_failing_detector_or_remedy_loses_no_row(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")  # Rollback(to=<a file>) cannot write its snapshot: a full-disk stand-in
    guard = gg.Guard(model, opt, log_dir=tmp_path / "runs", run_name="r", flush_every=4,
                     detectors=[_Broken()], remedies={"nonfinite": gg.Rollback(every=1, to=blocker / "snap")})
    with pytest.warns(RuntimeWarning, match="failed"):
        for i in range(10):
            _backward(model, i, poison=i == 6)
            guard.step()
    guard.close()
    assert guard.failures["detectors"] >= 3 and guard.remedies.failures >= 1
    assert gg.RunStore(tmp_path / "runs").steps("r")["step"].tolist() == list(range(10))
    assert guard.skipped_steps == 1


@pytest.mark.parametrize("name", ["x\n", "ok\n\n", "\nx"])
def test_run_name_with_a_newline_is_refused(tmp_path, name):
    model = _model()
    with pytest.raises(ValueError, match="run_name"):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), log_dir=tmp_path, run_name=name)


class _FlakySGD(torch.optim.SGD):
    """Raises on its second step (a user catches it and goes on)."""

    def __init__(self, params):
        super().__init__(params, lr=0.1)
        self.calls = 0

    def step(self, closure=None):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("transient")
        return super().step(closure)


def test_an_optimizer_that_raises_once_loses_or_duplicates_no_row(tmp_path):
    """The step that raised was not applied: it has no row and its step id is not used; every
    other step is stored once, in order, across a flush interval."""
    model = _model()
    opt = _FlakySGD(model.parameters())
    guard = gg.Guard(model, opt, log_dir=tmp_path, run_name="r", flush_every=4, detectors=[])
    for i in range(10):
        _backward(model, i)
        try:
            guard.step()
        except RuntimeError:
            guard.step()  # the same gradients, retried: allowed (the failed step did not count)
    guard.close()
    assert guard.steps == 10
    assert gg.RunStore(tmp_path).steps("r")["step"].tolist() == list(range(10))


@pytest.mark.parametrize("backend", ["host", "device"])
def test_lr_column_is_the_lr_the_step_used(tmp_path, backend):
    """The row's lr is read before Guard(scheduler=...) moves it (it was the next step's lr)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, scheduler=SCHEDULERS["lambda"](opt), backend=backend, detectors=[],
                     log_dir=tmp_path, run_name="lr")
    used = []
    for i in range(7):
        _backward(model, i, poison=i in BAD)
        used.append(opt.param_groups[0]["lr"])
        guard.step()
    guard.close()
    lr = gg.RunStore(tmp_path).steps("lr")["lr"]
    assert used[0] == used[1] and used[6] == used[5] != used[4]  # BAD steps left it where it was
    torch.testing.assert_close(torch.from_numpy(lr).double(), torch.tensor(used, dtype=torch.float64),
                               rtol=1e-6, atol=0)
