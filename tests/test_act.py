"""Remedies: rollback restores bitwise and withholds batches, LR back-off and recovery, raise, config."""
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.act import GuardAlarm, LRBackoff, Rollback
from gradguard.events import Event


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


def assert_bitwise(a, b):
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        for n in a[1][k]:
            assert torch.equal(a[1][k][n], b[1][k][n]), (k, n)


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
    # the snapshot itself was not mutated by the later steps: a second rollback is bitwise too
    one_step(model, opt, guard, 12, poison=True)
    assert rb.rollbacks == 2


def test_rollback_without_snapshot_says_so():
    rb = Rollback(every=5)
    model, opt, guard = setup({"nonfinite": rb})
    one_step(model, opt, guard, 0, poison=True)
    assert "no snapshot yet" in guard.events[0].data["actions"][0]


def test_lr_backoff_after_repeated_events_and_gradual_restore():
    lb = LRBackoff(factor=0.5, patience=2, recover_every=10)
    model, opt, guard = setup({"nonfinite": lb})
    one_step(model, opt, guard, 0, poison=True)
    assert opt.param_groups[0]["lr"] == 0.01  # armed, not yet
    one_step(model, opt, guard, 1, poison=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    one_step(model, opt, guard, 2, poison=True)
    one_step(model, opt, guard, 3, poison=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0025)
    lrs = []
    for i in range(4, 40):
        one_step(model, opt, guard, i)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[-1] == pytest.approx(0.01) and lrs[0] == pytest.approx(0.0025)
    assert sorted(lrs) == lrs and pytest.approx(0.005) in lrs  # back up in steps, never above the user's lr
    sd = lb.state_dict()
    other = LRBackoff(factor=0.5, patience=2, recover_every=10)
    other.load_state_dict(sd)
    assert other.state_dict() == sd


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
    guard.remedies.after_flush(guard, [], None, [ev])
    assert ev.data["actions"] == ["learning rate x0.5 (now x0.5 of the original)"]
