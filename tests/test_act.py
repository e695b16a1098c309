"""Remedies: rollback restores bitwise and withholds batches, LR back-off and recovery, raise, config;
the RemedyContext actions act through; every action's state round-trips."""
import ast
import gc
import math
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
import gradguard.remedies as rem
from gradguard.events import KINDS, Event
from gradguard.layout import RunInfo
from gradguard.remedies import (FlightRecorder, GuardAlarm, LRBackoff, Raise, Remedies, RemedyContext,
                                Rollback, Skip)

from _helpers import assert_bitwise, bits


def setup(remedies, detectors=None, opt_cls=torch.optim.Adam, flush_every=1):
    """flush_every=1: remedies act on the step whose row fires (the mechanics under test)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = opt_cls(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, remedies=remedies, detectors=[] if detectors is None else detectors,
                     flush_every=flush_every)
    return model, opt, guard


def one_step(model, opt, guard, i, poison=False):
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    if poison:
        model[2].weight.grad[0, 0] = math.nan
    return guard.step(loss)


def state(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()})




@pytest.mark.parametrize("to_disk", [False, True])
def test_rollback_restores_snapshot_bitwise_and_skips_batches(tmp_path, to_disk):
    rb = Rollback(every=5, skip_batches=3, to=tmp_path if to_disk else None)
    model, opt, guard = setup({"nonfinite": rb})
    for i in range(7):
        one_step(model, opt, guard, i)
    # first clean flush (after 1 step), then every 5 steps: never a copy on every step
    assert rb.snapshot_step == 6
    # reference: the state after 6 steps, recomputed independently
    m2, o2, g2 = setup({})
    for i in range(6):
        one_step(m2, o2, g2, i)
    ref = state(m2, o2)
    one_step(model, opt, guard, 7, poison=True)
    assert_bitwise(state(model, opt), ref)
    ev = guard.events[-1]
    assert ev.kind == "nonfinite" and "rolled back to the state after step 5" in ev.data["actions"][0]
    assert guard.hold_steps == 3
    for i in range(8, 11):  # withheld: the weights stay at the snapshot
        r = one_step(model, opt, guard, i)
        assert r.skipped
    assert_bitwise(state(model, opt), ref)
    one_step(model, opt, guard, 11)
    assert not torch.equal(model[0].weight, ref[0]["0.weight"])
    assert guard.skipped_steps == 4
    # a second rollback is bitwise too: its snapshot (taken at step 11, the state after the
    # held steps 8-10, i.e. still the restored one) was not mutated by step 11's update
    one_step(model, opt, guard, 12, poison=True)
    assert rb.rollbacks == 2 and rb.snapshot_step == 11
    assert_bitwise(state(model, opt), ref)


def test_rollback_without_snapshot_says_so():
    rb = Rollback(every=5)
    model, opt, guard = setup({"nonfinite": rb})
    one_step(model, opt, guard, 0, poison=True)
    assert "no snapshot yet" in guard.events[0].data["actions"][0]


def test_lr_backoff_after_repeated_events_and_gradual_restore():
    lb = LRBackoff(factor=0.5, patience=2, recover_every=10)
    model, opt, guard = setup({"nonfinite": lb})
    # separate poisoned steps (a streak of identical ones is one event: NonfiniteRepeats)
    one_step(model, opt, guard, 0, poison=True)
    assert opt.param_groups[0]["lr"] == 0.01  # armed, not yet
    one_step(model, opt, guard, 1)
    one_step(model, opt, guard, 2, poison=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    one_step(model, opt, guard, 3)
    one_step(model, opt, guard, 4, poison=True)
    one_step(model, opt, guard, 5)
    one_step(model, opt, guard, 6, poison=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0025)
    lrs = []
    for i in range(7, 43):
        one_step(model, opt, guard, i)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[-1] == pytest.approx(0.01) and lrs[0] == pytest.approx(0.0025)
    assert sorted(lrs) == lrs and pytest.approx(0.005) in lrs  # back up in steps, never above the user's lr
    sd = lb.state_dict()
    other = LRBackoff(factor=0.5, patience=2, recover_every=10)
    other.load_state_dict(sd)
    assert other.state_dict() == sd


def test_lr_backoff_forgets_events_older_than_recover_every():
    """Two poisoned steps 12 steps apart (recover_every 10), quiet flushes in between: the second
    is a first again, no back-off (a restore check on a quiet run must not count as an event)."""
    lb = LRBackoff(factor=0.5, patience=2, recover_every=10)
    model, opt, guard = setup({"nonfinite": lb})
    one_step(model, opt, guard, 0, poison=True)
    for i in range(1, 12):
        one_step(model, opt, guard, i)
    one_step(model, opt, guard, 12, poison=True)
    assert opt.param_groups[0]["lr"] == 0.01 and lb.scale == 1.0


def test_raise_remedy_raises_after_recording():
    model, opt, guard = setup({"loss_spike": "raise"}, detectors=[gg.detect.LossSpikeDetector(warmup=5)])
    for i in range(10):
        one_step(model, opt, guard, i)
    opt.zero_grad()
    x = torch.randn(8, 4)
    loss = nn.functional.mse_loss(model(x), torch.full((8, 1), 1e4))
    loss.backward()
    with pytest.raises(GuardAlarm) as info:
        guard.step(loss)
    assert info.value.event.kind == "loss_spike"
    assert guard.events[-1].kind == "loss_spike"  # recorded before raising


@pytest.mark.parametrize("spec, err", [
    ({"bogus": "skip"}, ValueError), ({"spike": "explode"}, ValueError), ({"spike": "skip"}, ValueError),
    ({"spike": 3}, TypeError), ("rollback", TypeError)])
def test_bad_remedies_config(spec, err):
    with pytest.raises(err, match="remedies"):
        setup(spec)


@pytest.mark.parametrize("kw", [dict(factor=1.5), dict(factor=0), dict(patience=0), dict(min_scale=2.0)])
def test_bad_lr_backoff_args(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        LRBackoff(**kw)


def test_named_actions_are_shared_and_state_round_trips():
    model, opt, guard = setup({"spike": "rollback", "exploding": "rollback", "nonfinite": "lr_backoff"})
    assert len(guard.remedies.actions) == 2
    for i in range(3):
        one_step(model, opt, guard, i)
    sd = guard.state_dict()
    m2, o2, g2 = setup({"spike": "rollback", "exploding": "rollback", "nonfinite": "lr_backoff"})
    g2.load_state_dict(sd)
    assert g2.state_dict() == sd


def test_action_description_lands_in_event_data():
    lb = LRBackoff(patience=1)
    model, opt, guard = setup({"critical": lb})
    ev = Event(0, "spike", "critical", [], "x")
    guard.remedies.after_flush(guard.remedies.ctx, [], None, [ev])
    assert ev.data["actions"] == ["learning rate x0.5 (now x0.5 of the original)"]


# ---------------------------------------------------------------- the table keys
@pytest.mark.parametrize("key", [*KINDS, "critical", "warning"])
def test_every_registered_kind_and_severity_is_a_remedies_key(key):
    lb = LRBackoff()
    model, opt, guard = setup({key: lb})
    assert guard.remedies.table == {key: [lb]}


def test_unused_and_amp_overflow_keys_are_accepted_and_act():
    lb = LRBackoff(patience=1)
    model, opt, guard = setup({"unused": "raise", "amp_overflow": lb})
    ev = Event(0, "amp_overflow", "info", [], "scaler backed off")
    assert guard.remedies.after_flush(guard.remedies.ctx, [], None, [ev]) is None
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    alarm = guard.remedies.after_flush(guard.remedies.ctx, [], None, [Event(1, "unused", "warning", ["w"], "x")])
    assert isinstance(alarm, GuardAlarm) and alarm.event.kind == "unused"


def test_old_act_module_still_exports_the_old_names():
    import gradguard.act as act

    assert act.Rollback is Rollback and act.Remedies is Remedies and act.GuardAlarm is GuardAlarm
    assert set(act.KINDS) == set(KINDS) and {"unused", "amp_overflow"} <= set(act.KINDS)
    assert act.capture_state is rem.capture_state and act.restore_state is rem.restore_state
    assert act.DUMP_VERSION == 1
    from gradguard.remedies import detach_hidden, penalty, tbptt  # the training helpers' old home
    assert tbptt is gg.tbptt and penalty is gg.penalty and detach_hidden is gg.detach_hidden


def test_remedies_package_never_imports_the_guard():
    """A lower layer never imports the orchestrator, and no import hides inside a function."""
    root = Path(rem.__file__).parent
    files = sorted(root.glob("*.py"))
    assert {f.name for f in files} >= {"context.py", "actions.py", "rollback.py", "flight.py", "table.py"}
    for f in files:
        tree = ast.parse(f.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = "." * node.level + (node.module or "")
                names = [a.name for a in node.names]
                assert not (mod.endswith("guard") or "guard" in names and node.level == 2
                            or mod.startswith("gradguard.guard")), (f.name, mod)
            elif isinstance(node, ast.Import):
                assert all(not a.name.startswith("gradguard.guard") for a in node.names), f.name
            else:
                continue
            in_type_checking = any(isinstance(n, ast.If) and id(node) in set(map(id, ast.walk(n)))
                                   for n in tree.body)
            assert id(node) in top or in_type_checking, f"{f.name}: import inside a function"


# ---------------------------------------------------------------- RemedyContext
def make_ctx(with_model=True, steps=lambda: 0, log_dir=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    # bits a lossy copy would change: -0.0 and a NaN with a payload
    odd = torch.tensor([-0.0, 0.0, 1.0], dtype=torch.float32)
    odd = torch.cat([odd, torch.tensor([0x7FC01234], dtype=torch.int32).view(torch.float32)])
    model.register_buffer("odd", odd)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    pairs = list(model.named_parameters())
    names, params = [n for n, _ in pairs], [p for _, p in pairs]
    ctx = RemedyContext(opt, params, RunInfo.describe(names, params, model), steps,
                        model=model if with_model else None, log_dir=log_dir)
    return model, opt, ctx


def test_context_hold_counter_and_state_round_trip():
    _, _, ctx = make_ctx()
    assert ctx.held == 0 and ctx.take_hold() is False and ctx.held == 0
    ctx.hold(3)
    ctx.hold(2)  # a shorter hold never cuts a longer one short
    assert ctx.held == 3
    sd = ctx.state_dict()
    _, _, other = make_ctx()
    other.load_state_dict(sd)
    assert other.state_dict() == sd == {"hold_steps": 3}
    assert [ctx.take_hold() for _ in range(4)] == [True, True, True, False]
    other.load_state_dict({})  # a state without a hold (older guards saved none)
    assert other.held == 0


@pytest.mark.parametrize("bad, err", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)])
def test_context_rejects_bad_holds(bad, err):
    _, _, ctx = make_ctx()
    with pytest.raises(err, match="n must"):
        ctx.hold(bad)
    with pytest.raises(err, match="hold_steps"):
        ctx.held = bad
    model, opt, guard = setup({})
    with pytest.raises(err, match="hold_steps"):
        guard.hold_steps = bad


@pytest.mark.parametrize("kw, err, match", [
    (dict(optimizer=object()), TypeError, "optimizer"), (dict(run=("a",)), TypeError, "run"),
    (dict(params=[]), ValueError, "params"), (dict(steps=3), TypeError, "steps"),
    (dict(model="m"), TypeError, "model")])
def test_context_rejects_bad_arguments(kw, err, match):
    model, opt, ctx = make_ctx()
    args = dict(optimizer=opt, params=ctx.params, run=ctx.run, steps=lambda: 0, model=model)
    args.update(kw)
    with pytest.raises(err, match=match):
        RemedyContext(args.pop("optimizer"), args.pop("params"), args.pop("run"), args.pop("steps"), **args)


def test_guard_hold_steps_is_the_context_counter():
    model, opt, guard = setup({})
    guard.hold_steps = 2
    assert guard.remedies.ctx.held == 2
    assert [one_step(model, opt, guard, i).skipped for i in range(3)] == [True, True, False]
    assert guard.hold_steps == 0


def state_bits(model, opt) -> dict:
    out = {("model", k): bits(v).clone() for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[("opt", pid, k)] = bits(v).clone() if isinstance(v, torch.Tensor) else v
    return out


assert_same_bits = assert_bitwise  # the values are already integer views


def train_some(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(5, 3, generator=g)).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("with_model", [True, False])
def test_context_restore_is_bitwise_and_repeatable(with_model):
    model, opt, ctx = make_ctx(with_model)
    train_some(model, opt, 2, 0)
    snap = ctx.capture()
    ref = state_bits(model, opt)
    train_some(model, opt, 3, 1)
    assert state_bits(model, opt)[("model", "0.weight")].ne(ref[("model", "0.weight")]).any()
    ctx.restore(snap)
    first = state_bits(model, opt)
    if with_model:
        assert_same_bits(first, ref)
    else:  # only the watched parameters and the optimizer come back
        assert_same_bits({k: v for k, v in first.items() if k[-1] != "odd"},
                         {k: v for k, v in ref.items() if k[-1] != "odd"})
    train_some(model, opt, 3, 2)  # must not write through into the snapshot
    ctx.restore(snap)
    assert_same_bits(state_bits(model, opt), first)


def test_second_rollback_from_the_same_snapshot_is_bitwise_equal_to_the_first():
    rb = Rollback(every=1000, skip_batches=2)
    model, opt, guard = setup({"nonfinite": rb})
    with torch.no_grad():  # awkward bits the snapshot holds: -0.0 and a NaN payload
        model[0].weight[0, 0] = -0.0
    model.register_buffer("odd", torch.tensor([0x7FC0BEEF, -2 ** 31], dtype=torch.int32).view(torch.float32))
    one_step(model, opt, guard, 0)
    snap_step, at_snapshot = rb.snapshot_step, state_bits(model, opt)
    assert snap_step == 1
    for i in range(1, 3):
        one_step(model, opt, guard, i)
    one_step(model, opt, guard, 3, poison=True)
    first = state_bits(model, opt)
    assert_same_bits(first, at_snapshot)
    for i in range(4, 6):  # held
        assert one_step(model, opt, guard, i).skipped
    for i in range(6, 10):
        one_step(model, opt, guard, i)
    moved = state_bits(model, opt)
    assert moved[("model", "0.weight")].ne(first[("model", "0.weight")]).any()  # the test can fail
    one_step(model, opt, guard, 10, poison=True)
    assert rb.rollbacks == 2 and rb.snapshot_step == snap_step  # one snapshot served both
    assert_same_bits(state_bits(model, opt), first)


# ---------------------------------------------------------------- each action's state
def _lr_backoff():
    a = LRBackoff(factor=0.25, patience=1, recover_every=7)
    _, opt, ctx = make_ctx(steps=lambda: 9)
    a.bind(ctx)
    a(Event(9, "spike", "warning", [], "x"), ctx)
    return a


def _rollback(tmp_path, to_disk):
    a = Rollback(every=3, to=tmp_path / "snap" if to_disk else None, max_rollbacks=4)
    _, _, ctx = make_ctx(steps=lambda: 5)
    a.bind(ctx)
    a.on_flush(ctx, [4], None, [])
    a(Event(4, "spike", "critical", [], "x"), ctx)
    return a


def _flight(tmp_path):
    a = FlightRecorder(tmp_path / "fl", keep=2)
    _, _, ctx = make_ctx(steps=lambda: 1)
    a.bind(ctx)
    a(Event(0, "spike", "critical", [], "x"), ctx)
    return a


@pytest.mark.parametrize("make", [
    lambda p: Skip(), lambda p: Raise(), lambda p: _lr_backoff(), lambda p: _rollback(p, False),
    lambda p: _rollback(p, True), lambda p: _flight(p)],
    ids=["skip", "raise", "lr_backoff", "rollback-memory", "rollback-disk", "flight"])
def test_each_action_state_round_trips(tmp_path, make):
    a = make(tmp_path)
    sd = a.state_dict()
    fresh = type(a)(**({"directory": a.directory} if isinstance(a, FlightRecorder) else
                       {"to": a.to} if isinstance(a, Rollback) else {}))
    fresh.load_state_dict(sd)
    assert fresh.state_dict() == sd
    if isinstance(a, LRBackoff):
        assert sd == {"scale": 0.25, "count": 0, "last": 9}
    if isinstance(a, Rollback):
        assert sd["rollbacks"] == 1 and sd["snapshot_step"] == (5 if a.to is not None else None)
    if isinstance(a, FlightRecorder):
        assert len(sd["dumps"]) == 1 and Path(sd["dumps"][0]).exists()


@pytest.mark.parametrize("cls, old", [
    (LRBackoff, {"scale": 0.5, "count": 1, "last": 40}), (Rollback, {"snapshot_step": None, "rollbacks": 2}),
    (FlightRecorder, {"dumps": ["a.pt"]})])
def test_state_dicts_of_the_previous_version_load(tmp_path, cls, old):
    a = cls(tmp_path) if cls is FlightRecorder else cls()
    a.load_state_dict(old)
    assert a.state_dict() == old


def test_flight_recorder_keeps_only_the_current_intervals_batches(tmp_path):
    rec = FlightRecorder(tmp_path, max_dumps=10)
    now = [0]
    _, _, ctx = make_ctx(steps=lambda: now[0])
    rec.bind(ctx)
    batches = [torch.full((2,), float(i)) for i in range(6)]
    width = gg.layout.RowLayout(len(ctx.names)).width
    for i in range(4):
        rec.on_step(i, batches[i])
    now[0] = 4
    rec.on_flush(ctx, [0, 1, 2, 3], np.zeros((4, width), np.float32), [])
    rec(Event(2, "spike", "critical", [], "x"), ctx)  # handled at its flush: the batch is there
    rec.on_step(4, batches[4])                        # the next step lets the handled ones go
    rec(Event(3, "spike", "critical", [], "x"), ctx)
    d2, d3 = (torch.load(p, weights_only=False) for p in rec.dumps)
    assert torch.equal(d2["batch"], batches[2]) and d3["batch"] is None
    assert d2["global_cols"] == list(gg.layout.GLOBAL_COLS) and d2["rows"].shape == (4, width)
    assert d2["names"] == list(ctx.names)


@pytest.mark.parametrize("spec", [None, {"spike": "rollback", "critical": ["lr_backoff", "record"]}])
def test_remedies_do_not_keep_the_guard_alive(tmp_path, spec):
    """The context holds no reference to the guard: dropping the guard frees it without the cycle collector."""
    model = nn.Linear(2, 2)
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), remedies=spec, detectors=[])
    ctx, ref = guard.remedies.ctx, weakref.ref(guard)
    gc.disable()
    try:
        del guard
        assert ref() is None
    finally:
        gc.enable()
    assert ctx.held == 0  # the context itself outlives the guard


@pytest.mark.parametrize("shared", [True, False])
def test_on_raise_dumps_once_per_recorder(tmp_path, shared):
    """on_nonfinite="raise": every flight recorder listed under the event's kind or severity
    writes its dump before the error, one each, even when one recorder serves both keys."""
    a = FlightRecorder(tmp_path / "a")
    b = a if shared else FlightRecorder(tmp_path / "b")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, remedies={"nonfinite": a, "critical": b}, detectors=[], on_nonfinite="raise")
    one_step(model, opt, guard, 0)
    with pytest.raises(gg.NonFiniteGradientError):
        one_step(model, opt, guard, 1, poison=True)
    assert len(a.dumps) == 1 and len(b.dumps) == 1
    assert len(list(tmp_path.rglob("*.pt"))) == (1 if shared else 2)
    # written before the error, with the pre-step weights, and not overwritten at the flush after
    assert all(torch.load(p, weights_only=False)["exact"] is True for p in a.dumps + b.dumps)


def test_remedies_state_of_another_length_is_refused():
    model = nn.Linear(2, 2)
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     remedies={"spike": "rollback", "critical": "lr_backoff"}, detectors=[])
    sd = guard.remedies.state_dict()
    for bad in (sd[:1], sd + sd[:1], []):
        with pytest.raises(ValueError, match="action states"):
            guard.remedies.load_state_dict(bad)


@pytest.mark.parametrize("step", [2, 3, 10, 11])
@pytest.mark.parametrize("later", [0, 1])
def test_flight_dump_is_exact_only_right_after_a_withheld_step(tmp_path, step, later):
    """A dump holds the pre-step weights when the event's step was withheld and nothing has
    moved the weights since (the guard's step count is the event's step + 1), at any step."""
    _, _, ctx = make_ctx(steps=lambda: step + 1 + later)
    rec = FlightRecorder(tmp_path)
    rec.bind(ctx)
    rec(Event(step, "nonfinite", "critical", [], "x", data={"skipped": True}), ctx)
    assert torch.load(rec.dumps[0], weights_only=False)["exact"] is (later == 0)


@pytest.mark.parametrize("shape,dtype,fits", [
    ((2, 3), torch.float32, True),
    ((2, 2), torch.float32, False),   # smaller, and "smaller" as a tuple too: never broadcast into
    ((1, 3), torch.float32, False),   # broadcastable from below: still not the same tensor
    ((2, 4), torch.float32, False),
    ((6,), torch.float32, False),     # as many elements, another shape
    ((2, 3), torch.float64, False),
    ((2, 3), torch.bfloat16, False),
])
def test_a_pinned_snapshot_buffer_is_reused_only_for_the_same_shape_and_dtype(monkeypatch, shape, dtype, fits):
    """An asynchronous snapshot (CUDA) overwrites the previous snapshot's pinned host tensors
    in place.  Pinned memory needs an accelerator, so the reuse rule is checked here on its
    own, with ``is_pinned`` answering True (tests/test_cuda.py checks a reused snapshot bit
    for bit on a GPU)."""
    from gradguard.remedies.snapshot import _fits
    t = torch.zeros(2, 3)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "is_pinned", lambda self: True)
        assert _fits(torch.zeros(shape, dtype=dtype), t) is fits
        assert not _fits(None, t) and not _fits([torch.zeros(2, 3)], t)
    assert not _fits(torch.zeros(2, 3), t)  # unpinned memory is never written into
