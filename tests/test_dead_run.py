"""The dead-run budget (``Guard(nonfinite_budget=N)``) and the NaN's producer in the guard's
events (``guard.step(loss, rerun=...)``)."""
from functools import partial
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.detect import DeadRunBudget
from gradguard.layout import COL, N_GLOBAL

from _helpers import mlp


_mlp = partial(mlp, 4, 8, 8, 2, act=("relu", "tanh"))


def _drive(guard, model, opt, pattern, start=0, rerun=False):
    """One step per entry of ``pattern`` (True: the batch holds a NaN). Returns the step
    index at which RunIsDeadError was raised (and the error), or (None, None)."""
    for i, poisoned in enumerate(pattern):
        g = torch.Generator().manual_seed(start + i)
        x = torch.randn(3, 4, generator=g)
        if poisoned:
            x[0, 0] = math.nan
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        try:
            guard.step(loss, rerun=(lambda: model(x).pow(2).mean()) if rerun else None)
        except gg.RunIsDeadError as e:
            return start + i, e
    return None, None


def _guard(model, opt, **kw):
    kw.setdefault("detectors", [])
    return gg.Guard(model, opt, **kw)


@pytest.mark.parametrize("backend", ["host", "device"])
@pytest.mark.parametrize("on_nonfinite", ["skip", "warn"])
@pytest.mark.parametrize("budget,clean", [(1, 0), (3, 5), (7, 2), (20, 9)])
def test_budget_raises_when_spent_and_says_why(backend, on_nonfinite, budget, clean):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    flush = 4
    guard = _guard(model, opt, on_nonfinite=on_nonfinite, nonfinite_budget=budget, backend=backend,
                   flush_every=flush)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        at, err = _drive(guard, model, opt, [False] * clean + [True] * (budget + 2 * flush))
    spent = clean + budget - 1  # the step that spends the budget
    if backend == "host":  # a poisoned step is flushed at once on the host lane
        assert at == spent
    else:  # the accelerator lane decides at the first flush after it (no host sync of its own)
        assert at == spent + (-(spent + 1)) % flush
    assert isinstance(err, gg.NonFiniteGradientError)
    assert (err.step, err.first_step, err.count) == (at, clean, at - clean + 1)
    assert err.layers[0] in ("4.bias", "4.weight")
    msg = str(err)
    assert f"{at - clean + 1} consecutive poisoned steps" in msg and f"steps {clean}-{at}" in msg
    assert "4.weight" in msg and "checkpoint" in msg and "learning rate" in msg
    assert ("skipped" if on_nonfinite == "skip" else "applied anyway") in msg
    assert guard.skipped_steps == (at - clean + 1 if on_nonfinite == "skip" else 0)


@pytest.mark.parametrize("backend", ["host", "device"])
def test_streaks_below_the_budget_never_raise(backend):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = _guard(model, opt, nonfinite_budget=4, backend=backend, flush_every=5)
    pattern = ([True] * 3 + [False]) * 15  # streaks of 3, across flush boundaries
    assert _drive(guard, model, opt, pattern) == (None, None)
    assert guard.skipped_steps == 45


def test_none_skips_forever_and_the_default_is_100():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = _guard(model, opt, nonfinite_budget=None)
    assert _drive(guard, model, opt, [True] * 150) == (None, None)
    guard = _guard(model, opt)
    assert guard.config()["nonfinite_budget"] == 100
    at, err = _drive(guard, model, opt, [True] * 150)
    assert (at, err.count) == (99, 100)


def test_raise_mode_raises_on_the_first_step_not_the_budget():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = _guard(model, opt, on_nonfinite="raise", nonfinite_budget=1)
    x = torch.randn(3, 4)
    x[0, 0] = math.nan
    model(x).sum().backward()
    with pytest.raises(gg.NonFiniteGradientError) as ei:
        guard.step()
    assert type(ei.value) is gg.NonFiniteGradientError


@pytest.mark.parametrize("backend", ["host", "device"])
def test_rows_and_events_are_recorded_before_the_raise(tmp_path, backend):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, log_dir=tmp_path, run_name="r", nonfinite_budget=25, backend=backend,
                     flush_every=8)
    at, err = _drive(guard, model, opt, [False] * 5 + [True] * 60)
    guard.close(status="failed", error=err)
    store = gg.RunStore(tmp_path)
    steps = store.steps("r")
    assert steps["step"].tolist() == list(range(at + 1))  # every row up to the raise
    kinds = [(e.step, e.kind, e.severity) for e in store.events("r")]
    assert (5, "nonfinite", "critical") in kinds  # the streak's first event
    assert (24, "nonfinite", "critical") in kinds  # PoisonedRunDetector (patience 20) escalated first


@pytest.mark.parametrize("cut", [1, 6, 9])
@pytest.mark.parametrize("backend", ["host", "device"])
def test_the_streak_survives_a_resume(cut, backend):
    def fresh():
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        return model, opt, _guard(model, opt, nonfinite_budget=10, backend=backend, flush_every=4)

    pattern = [False] * 3 + [True] * 30
    model, opt, guard = fresh()
    want = _drive(guard, model, opt, pattern)[0]
    model, opt, guard = fresh()
    assert _drive(guard, model, opt, pattern[:3 + cut]) == (None, None)
    sd = guard.state_dict()
    assert guard.state_dict() == sd
    model2, opt2, guard2 = fresh()
    model2.load_state_dict(model.state_dict())
    guard2.load_state_dict(sd)
    assert guard2.state_dict()["nonfinite_budget"] == sd["nonfinite_budget"]
    at, err = _drive(guard2, model2, opt2, pattern[3 + cut:], start=3 + cut)
    assert at == want and err.first_step == 3


def test_a_state_saved_without_the_budget_loads_with_a_fresh_streak():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = _guard(model, opt, nonfinite_budget=5)
    _drive(guard, model, opt, [True] * 4)
    sd = guard.state_dict()
    del sd["nonfinite_budget"]
    guard2 = _guard(model, opt, nonfinite_budget=5)
    guard2.load_state_dict(sd)
    assert _drive(guard2, model, opt, [True] * 4, start=4) == (None, None)
    assert _drive(guard2, model, opt, [True], start=8)[0] == 8


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError),
                                     ("10", TypeError), (math.inf, TypeError)])
def test_bad_budget_is_refused_by_name(bad, exc):
    model = _mlp()
    with pytest.raises(exc, match="nonfinite_budget"):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), nonfinite_budget=bad)


def test_budget_against_a_reference_counter():
    """Any chunking of a random poison pattern raises where a plain per-step counter says."""
    from gradguard.layout import RunInfo

    rng = np.random.default_rng(0)
    run = RunInfo.describe(["a"], [torch.zeros(2)], None, 0, init_layer_norms=np.ones(1))
    for _ in range(30):
        bad = rng.random(80) < 0.8
        budget = int(rng.integers(1, 8))
        rows = np.zeros((80, N_GLOBAL + 3), np.float32)
        rows[:, COL["bad"]] = bad
        rows[bad, N_GLOBAL + 1] = np.nan
        want, streak = [], 0
        for t in range(80):
            streak = streak + 1 if bad[t] else 0
            if streak >= budget:
                want.append(t)
        cuts = sorted(set(rng.integers(1, 80, 6).tolist())) + [80]
        b, got, lo = DeadRunBudget(budget), [], 0
        for hi in cuts:
            err = b.update(np.arange(lo, hi), rows[lo:hi], run)
            if err is not None:
                assert err.layers == ["a"] and err.step == hi - 1
                got.append(hi - 1)
            lo = hi
        assert got == [t for t in want if t + 1 in cuts]


# ------------------------------------------------------------------ the producer
class _Inject:
    """A forward hook writing NaN/Inf into one module's output while ``on``."""

    def __init__(self, value):
        self.on, self.value = False, value

    def __call__(self, mod, inp, out):
        if not self.on:
            return None
        out = out.clone()
        out[0, 0] = self.value
        return out


@pytest.mark.parametrize("backend", ["host", "device"])
# (an Inf into layer 2 is squashed by the Tanh after it: that step is not poisoned)
@pytest.mark.parametrize("layer,value", [("0", math.nan), ("2", math.nan), ("4", math.nan),
                                         ("0", math.inf), ("4", -math.inf)])
def test_event_names_the_producer_not_the_propagators(backend, layer, value):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    inject = _Inject(value)
    model.get_submodule(layer).register_forward_hook(inject)
    calls = []

    def rerun():
        calls.append(1)
        return model(x).pow(2).mean()

    guard = _guard(model, opt, backend=backend)
    for i in range(12):
        x = torch.randn(3, 4)
        inject.on = i in (5, 6, 7)  # one streak of three poisoned steps
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        guard.step(loss, rerun=rerun)
    assert len(calls) == 1  # healthy steps never re-run, a streak is located once
    evs = [e for e in guard.events if e.kind == "nonfinite"]
    first = evs[0]
    assert first.step == 5 and first.severity == "critical"
    assert first.data["origin"] == {"module": layer, "type": "Linear", "where": "forward",
                                    "param": f"{layer}.weight"}
    assert first.layers[0] == f"{layer}.weight"
    assert first.message.startswith(f"made in {layer} (Linear, forward)")
    assert [(e.step, e.severity, e.data.get("count")) for e in evs[1:]] == [(7, "info", 3)]  # folded


def test_a_nan_batch_is_named_as_the_input():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = _guard(model, opt)
    _drive(guard, model, opt, [False, True], rerun=True)
    ev = next(e for e in guard.events if e.kind == "nonfinite")
    assert ev.data["origin"]["where"] == "input" and "input batch" in ev.message


def test_raise_mode_error_carries_the_producer():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    inject = _Inject(math.nan)
    model[2].register_forward_hook(inject)
    guard = _guard(model, opt, on_nonfinite="raise")
    x = torch.randn(3, 4)
    inject.on = True
    model(x).sum().backward()
    with pytest.raises(gg.NonFiniteGradientError) as ei:
        guard.step(rerun=lambda: model(x).sum())
    assert ei.value.event.data["origin"]["module"] == "2" and ei.value.layers[0] == "2.weight"


def test_rerun_leaves_the_step_unchanged():
    """Grads, RNG, BatchNorm running statistics: the re-run of a poisoned step changes nothing."""
    def run(rerun):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        guard = gg.Guard(model, opt, on_nonfinite="warn", detectors=[], nonfinite_budget=None)
        inject = _Inject(math.nan)
        model[3].register_forward_hook(inject)
        for i in range(4):
            x = torch.randn(6, 4)
            inject.on = i == 2
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                guard.step(loss, rerun=(lambda: model(x).pow(2).mean()) if rerun else None)
        return model.state_dict(), guard.events

    (a, ea), (b, eb) = run(False), run(True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], equal_nan=True, rtol=0, atol=0)
    assert "origin" in next(e for e in eb if e.kind == "nonfinite").data
    assert "origin" not in next(e for e in ea if e.kind == "nonfinite").data


def test_rerun_is_checked():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(TypeError, match="rerun"):
        _guard(model, opt).step(rerun=3)
    guard = _guard(list(model.named_parameters()), opt)
    with pytest.raises(TypeError, match="rerun needs a Guard built on an nn.Module"):
        guard.step(rerun=lambda: model(torch.randn(2, 4)).sum())


def test_a_pending_producer_survives_a_resume():
    """Accelerator lane: the poisoned row waits for its flush; a checkpoint taken meanwhile keeps
    the producer, and the resumed guard's event names it."""
    def fresh():
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        inject = _Inject(math.nan)
        model[2].register_forward_hook(inject)
        return model, opt, inject, _guard(model, opt, backend="device", flush_every=10)

    model, opt, inject, guard = fresh()
    for i in range(4):
        x = torch.randn(3, 4)
        inject.on = i == 2
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        guard.step(loss, rerun=lambda: model(x).pow(2).mean())
    sd = guard.state_dict()
    assert sd["pending"]["steps"] == [0, 1, 2, 3] and sd["nonfinite_origins"]["found"]
    _, _, _, guard2 = fresh()
    guard2.load_state_dict(sd)
    assert guard2.state_dict()["nonfinite_origins"] == sd["nonfinite_origins"]
    ev = next(e for e in guard2.events if e.kind == "nonfinite")
    assert ev.step == 2 and ev.data["origin"]["module"] == "2" and ev.layers[0] == "2.weight"
    assert guard2.state_dict()["nonfinite_origins"]["found"] == []  # handed to the event
