"""remedies="auto" (gradguard.remedies.autopilot): healthy runs untouched, faults rolled back
bitwise to a clean snapshot, learning rate backed off and restored, the budget raises, state
round-trips; and the rescue benchmark (benchmarks/rescue_faults) in its smoke mode."""
from functools import partial
import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.events import KINDS
from gradguard.remedies import Autopilot, GuardAlarm

from _helpers import mlp

ROOT = Path(__file__).resolve().parents[1]
# loaded under its own name: other benchmark folders have a run.py too
_spec = importlib.util.spec_from_file_location("rescue_faults_run", ROOT / "benchmarks" / "rescue_faults" / "run.py")
rescue = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rescue)


def _data(seed, n=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :4].sum(1, keepdim=True) - x[:, 4:].sum(1, keepdim=True)).tanh()
    return x, y


_mlp = partial(mlp, 8, 32, 1)


def _train(model, opt, guard, steps, seed=0, fault=None, states=None):
    """A regression loop; ``fault(step, model, opt)`` may corrupt anything before the forward."""
    x, y = _data(seed)
    g = torch.Generator().manual_seed(100 + seed)
    for step in range(steps):
        if fault is not None:
            fault(step, model, opt)
        if states is not None:  # the state after step-1: what a snapshot at `step` holds
            states[step] = {k: v.clone() for k, v in model.state_dict().items()}
        i = torch.randint(0, len(x), (16,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x[i]), y[i])
        loss.backward()
        guard.step(loss=loss)
    guard.flush()


# ------------------------------------------------------------------ construction
def test_auto_builds_the_preset_and_the_object_form_alike():
    for spec in ("auto", Autopilot(every=10)):
        m = _mlp(seed=0)
        guard = gg.Guard(m, torch.optim.SGD(m.parameters(), 0.1), remedies=spec)
        (ap,) = guard.remedies.actions
        assert isinstance(ap, Autopilot) and gg.Autopilot is Autopilot
        assert set(guard.remedies.table) == {"nonfinite", "rescue"}
    assert "rescue" in KINDS


@pytest.mark.parametrize("spec", ["autopilot", "", "AUTO", 3])
def test_bad_remedies_spec_is_refused_by_name(spec):
    m = _mlp(seed=0)
    with pytest.raises(TypeError, match="remedies"):
        gg.Guard(m, torch.optim.SGD(m.parameters(), 0.1), remedies=spec)


@pytest.mark.parametrize("kw,name", [({"every": 0}, "every"), ({"keep": 3}, "keep"), ({"keep": 0}, "keep"),
                                     ({"confirm": 0}, "confirm"), ({"ratio": -1.0}, "ratio"),
                                     ({"z": math.nan}, "z"), ({"max_rollbacks": 0}, "max_rollbacks"),
                                     ({"lr_factor": 1.0}, "factor"), ({"skip_batches": -1}, "skip_batches")])
def test_bad_arguments_name_the_argument(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        Autopilot(**kw)


# ------------------------------------------------------------------ healthy runs
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_intervention_on_healthy_runs(seed):
    m = _mlp(seed=seed)
    opt = torch.optim.SGD(m.parameters(), 0.05, momentum=0.9)
    guard = gg.Guard(m, opt, remedies="auto")
    _train(m, opt, guard, 300, seed)
    ap = guard.remedies.actions[0]
    assert ap.interventions == 0 and ap.rollbacks == 0
    assert guard.hold_steps == 0 and guard._skipped == 0
    assert not [e for e in guard.events if e.kind == "rescue"]
    assert ap._snaps, "a healthy run takes snapshots"
    assert opt.param_groups[0]["lr"] == 0.05


@pytest.mark.parametrize("arch", ["cnn", "gru", "gpt"])
def test_no_intervention_on_the_benchmark_tasks(arch):
    out = rescue.train(arch, "none", "auto", seed=3, steps=120)
    assert out["interventions"] == 0 and out["skipped"] == 0 and out["alarm"] is None
    assert math.isfinite(out["loss"])


# ------------------------------------------------------------------ faults
def _blow_weight(at):
    def fault(step, model, opt):
        if step == at:
            with torch.no_grad():
                model[0].weight.view(-1)[0] = 1e4
    return fault


def test_weight_fault_is_rolled_back_bitwise_and_keeps_the_lr():
    m = _mlp(seed=0)
    opt = torch.optim.SGD(m.parameters(), 0.05, momentum=0.9)
    guard = gg.Guard(m, opt, remedies=Autopilot(every=20), param_norm_every=1)
    states = {}
    seen = {}

    def fault(step, model, o):
        _blow_weight(100)(step, model, o)
        if step == 100:
            o.param_groups[0]["lr"] = 0.03  # a scheduler moved the lr: a rollback keeps it
        if guard.remedies.actions[0].rollbacks and "after" not in seen:
            seen["after"] = {k: v.clone() for k, v in model.state_dict().items()}
    _train(m, opt, guard, 200, fault=fault, states=states)
    ap = guard.remedies.actions[0]
    (rescue_ev,) = [e for e in guard.events if e.kind == "rescue"]
    (action,) = rescue_ev.data["actions"]
    assert action.startswith("rolled back to the state after step ")
    snap_step = int(action.split("after step ")[1].split(";")[0]) + 1
    assert snap_step <= 100
    # the first state seen after the rollback is the snapshot, bitwise
    for k, v in seen["after"].items():
        assert torch.equal(v, states[snap_step][k]), k
    assert ap.rollbacks == 1 and m[0].weight.abs().max() < 100
    assert opt.param_groups[0]["lr"] == 0.03
    trig = [e for e in guard.events if e.kind == "weight_growth"]
    assert trig and any("rescue event" in a for a in trig[0].data.get("actions", []))


def test_an_lr_burst_without_any_detector_event_is_rolled_back():
    """No detectors at all: the autopilot's own loss-rise suspect, confirmed by the next losses."""
    m = _mlp(seed=0)
    opt = torch.optim.Adam(m.parameters(), 0.01)  # Adam: bounded steps, the weights do not blow up
    # no detectors, no parameter norms: only the loss can tell
    guard = gg.Guard(m, opt, remedies=Autopilot(every=16), detectors=[], param_norm_every=0)

    def fault(step, model, o):
        if step in (100, 105):
            o.param_groups[0]["lr"] *= 100.0 if step == 100 else 0.01
    _train(m, opt, guard, 200, fault=fault)
    rescues = [e for e in guard.events if e.kind == "rescue"]
    assert rescues and "loss rise at step" in rescues[0].message
    assert rescues[0].data["actions"][0].startswith("rolled back to the state after step ")
    assert guard.remedies.actions[0].rollbacks >= 1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_a_burst_the_run_shrugs_off_is_left_alone():
    """LR x20 on Adam for 5 steps: the loss jumps 4x for two steps and comes back: no rollback."""
    m = _mlp(seed=0)
    opt = torch.optim.Adam(m.parameters(), 0.01)
    guard = gg.Guard(m, opt, remedies="auto", param_norm_every=0)

    def fault(step, model, o):
        if step in (100, 105):
            o.param_groups[0]["lr"] *= 20.0 if step == 100 else 0.05
    _train(m, opt, guard, 200, fault=fault)
    ap = guard.remedies.actions[0]
    assert ap.rollbacks == 0 and ap.interventions == 0 and guard._skipped == 0
    assert not [e for e in guard.events if e.kind == "rescue"]


def test_nonfinite_steps_are_skipped_not_rolled_back():
    m = _mlp(seed=0)
    opt = torch.optim.SGD(m.parameters(), 0.05)
    guard = gg.Guard(m, opt, remedies="auto")

    def fault(step, model, o):
        if step in (80, 81):
            with torch.no_grad():
                model[0].bias.grad = None
    x, y = _data(0)
    for step in range(150):
        opt.zero_grad()
        loss = nn.functional.mse_loss(m(x[:16]), y[:16])
        if step in (80, 81):
            loss = loss * math.nan
        loss.backward()
        guard.step(loss=loss)
    guard.flush()
    ap = guard.remedies.actions[0]
    assert guard._skipped == 2 and ap.rollbacks == 0 and ap.interventions == 0
    nf = [e for e in guard.events if e.kind == "nonfinite" and e.data.get("actions")]
    assert nf and nf[0].data["actions"] == ["step skipped"]


def test_repeated_rollbacks_back_off_the_lr_then_restore_it():
    m = _mlp(seed=0)
    opt = torch.optim.SGD(m.parameters(), 0.05, momentum=0.9)
    ap = Autopilot(every=16, recover_every=64, max_rollbacks=10)
    guard = gg.Guard(m, opt, remedies=ap, param_norm_every=1)
    scales = {}

    def fault(step, model, o):
        _blow_weight(100)(step, model, o)
        _blow_weight(140)(step, model, o)
        scales[step] = ap.lr.scale
    _train(m, opt, guard, 400, fault=fault)
    assert ap.rollbacks == 2
    assert min(scales.values()) == 0.5  # the second rollback within recover_every halves the lr
    assert ap.lr.scale == 1.0 and opt.param_groups[0]["lr"] == pytest.approx(0.05)  # quiet: restored
    assert ap.interventions == 4  # two rollbacks, one back-off, one restore


def test_budget_exhausted_raises_with_a_clear_message():
    m = _mlp(seed=0)
    opt = torch.optim.SGD(m.parameters(), 0.05)
    guard = gg.Guard(m, opt, remedies=Autopilot(every=16, max_rollbacks=2), param_norm_every=1)

    def fault(step, model, o):  # the weights blow up again and again: a run that cannot be saved
        if step >= 60 and step % 30 == 0:
            _blow_weight(step)(step, model, o)
    with pytest.raises(GuardAlarm, match=r"rollback budget exhausted: 2 rollbacks in \d+ steps"):
        _train(m, opt, guard, 400, fault=fault)
    assert guard.remedies.actions[0].rollbacks == 2
    assert any("raised GuardAlarm" in e.data.get("actions", []) for e in guard.events if e.kind == "rescue")


# ------------------------------------------------------------------ state
def test_state_dict_round_trip():
    m = _mlp(seed=0)
    opt = torch.optim.SGD(m.parameters(), 0.05, momentum=0.9)
    guard = gg.Guard(m, opt, remedies=Autopilot(every=16, recover_every=1000), param_norm_every=1)
    _train(m, opt, guard, 200, fault=lambda s, mod, o: (_blow_weight(100)(s, mod, o), _blow_weight(130)(s, mod, o)))
    ap = guard.remedies.actions[0]
    assert ap.rollbacks == 2 and ap.lr.scale == 0.5
    sd = guard.state_dict()
    m2 = _mlp(seed=1)
    opt2 = torch.optim.SGD(m2.parameters(), 0.05, momentum=0.9)
    g2 = gg.Guard(m2, opt2, remedies=Autopilot(every=16, recover_every=1000), param_norm_every=1)
    g2.load_state_dict(sd)
    ap2 = g2.remedies.actions[0]
    assert ap2.state_dict() == ap.state_dict()
    assert (ap2.rollbacks, ap2.interventions, ap2.lr.scale) == (2, ap.interventions, 0.5)
    assert ap2._snaps == []  # snapshots are model copies: the next quiet flush takes one


# ------------------------------------------------------------------ the benchmark
def test_score_counts_recovered_runs_against_the_same_seed():
    runs = [{"arch": "a", "fault": "none", "method": "auto", "seed": 0, "loss": 1.0, "interventions": 0,
             "skipped": 0},
            {"arch": "a", "fault": "none", "method": "auto", "seed": 1, "loss": 2.0, "interventions": 1,
             "skipped": 3},
            {"arch": "a", "fault": "lr", "method": "auto", "seed": 0, "loss": 1.019},      # within 2%
            {"arch": "a", "fault": "lr", "method": "auto", "seed": 1, "loss": 2.05},       # 2.5% worse
            {"arch": "a", "fault": "nan", "method": "auto", "seed": 0, "loss": math.nan},
            {"arch": "a", "fault": "nan", "method": "auto", "seed": 1, "loss": 1.5}]       # better
    s = rescue.score(runs)["auto"]
    assert (s["recovered"], s["faulted"]) == (2, 4)
    assert s["by_fault"]["lr"] == [1, 2] and s["by_fault"]["nan"] == [1, 2]
    assert (s["clean_interventions"], s["clean_skipped"]) == (1, 3)


def test_smoke_mode_runs_the_grid(tmp_path, fresh_python):
    out = fresh_python.run_script(ROOT / "benchmarks" / "rescue_faults" / "run.py", "--smoke",
                                  "--archs", "cnn", "--faults", "nan", "weight", "--methods", "clip", "auto",
                                  "--jobs", "1", timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr
    assert "## Rescue on faults" in out.stdout and 'remedies="auto"' in out.stdout


def test_write_section_replaces_its_own_section_only(tmp_path):
    md = tmp_path / "b.md"
    md.write_text("# B\n\n## A\na\n")
    rescue.write_section(md, "<!-- rescue_faults: x -->\n## Rescue on faults (1)\n\none\n")
    md.write_text(md.read_text() + "\n## Z\nz\n")
    rescue.write_section(md, "<!-- rescue_faults: x -->\n## Rescue on faults (2)\n\ntwo\n")
    text = md.read_text()
    assert "two" in text and "one" not in text and text.count("## Rescue on faults") == 1
    assert text.index("## A") < text.index("two") < text.index("## Z")


def test_bench_command_knows_rescue():
    import argparse

    from gradguard.tools import bench
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["rescue", "--smoke"])
    assert args.what == "rescue" and args.smoke
    assert (ROOT / "benchmarks" / bench.SUITES["rescue"]).exists()


# ------------------------------------------------------------------ rollback distance
@pytest.mark.parametrize("remedies,flush_every,expected", [
    ("auto", None, Autopilot.CPU_FLUSH_EVERY), (Autopilot(every=7), None, Autopilot.CPU_FLUSH_EVERY),
    (None, None, 16), ({"critical": "rollback"}, None, 16), ("auto", 8, 8), ("auto", 1, 1)])
def test_the_autopilot_shortens_the_cpu_flush_interval_unless_it_is_given(remedies, flush_every, expected):
    """A rollback discards the updates since the snapshot, taken at a flush: flush often on CPU."""
    m = _mlp(seed=0)
    guard = gg.Guard(m, torch.optim.SGD(m.parameters(), 0.1), remedies=remedies, flush_every=flush_every)
    assert guard.flush_every == expected
    assert Autopilot.CPU_FLUSH_EVERY < 16


class _Ctx:
    """What Autopilot.__call__ uses of a RemedyContext, recording restores and holds."""

    def __init__(self):
        self.optimizer = torch.optim.SGD(_mlp(seed=0).parameters(), 0.1)
        self.steps, self.restored, self.holds = 0, [], []

    def restore(self, snap):
        self.restored.append(snap)

    def hold(self, n):
        self.holds.append(n)


def _rescue(step, trigger):
    return gg.Event(step, "rescue", "warning", [], "test", data={"trigger_step": trigger})


@pytest.mark.parametrize("gap,repeat", [(12, True), (199, True), (200, False), (5000, False)])
def test_a_repeated_rollback_goes_further_back_and_holds_batches(gap, repeat):
    ap = Autopilot(skip_batches=5, recover_every=200, max_rollbacks=10)
    ctx = _Ctx()
    ap._snaps = [[96, "s96", 1.0], [100, "s100", 1.0]]
    ctx.steps = 108
    note = ap(_rescue(107, 103), ctx)
    # the first rollback: the newest snapshot before the fault, nothing withheld
    assert ctx.restored == ["s100"] and ctx.holds == [0] and "skipping" not in note
    ctx.steps = 108 + gap
    note = ap(_rescue(ctx.steps, 110), ctx)
    if repeat:  # the run went wrong again soon: the snapshot may hold the damage, and bad data may be ahead
        assert ctx.restored[-1] == "s96" and ctx.holds[-1] == 5 and "skipping the next 5 batches" in note
    else:
        assert ctx.restored[-1] == "s100" and ctx.holds[-1] == 0 and "skipping" not in note
    assert ap.rollbacks == 2


def test_a_refuted_suspect_does_not_hide_a_rise_later_in_the_same_flush():
    """A noisy step, refuted by the losses after it, then a lasting rise in the flush that refutes
    it: the rise is the suspect at its own step, not at the next flush's."""
    m = _mlp(seed=0)
    guard = gg.Guard(m, torch.optim.SGD(m.parameters(), 0.0), remedies=Autopilot(confirm=5),
                     detectors=[], param_norm_every=0, flush_every=4)
    losses = [1.0 + 0.01 * (i % 3) for i in range(44)] + [5.0] + [1.0] * 5 + [2.0] + [1.6] * 13
    x = torch.zeros(4, 8)
    for v in losses:
        loss = v + 0.0 * m(x).sum()  # the loss is the scripted value; gradients exist (zero)
        loss.backward()
        guard.step(loss=loss)
    guard.flush()
    rescues = [e for e in guard.events if e.kind == "rescue"]
    assert rescues and rescues[0].data["trigger_step"] == 50


def _scripted(losses, flush_every=4, **kw):
    """A guard fed scripted losses (lr 0, zero gradients): what the autopilot decides from them."""
    m = _mlp(seed=0)
    guard = gg.Guard(m, torch.optim.SGD(m.parameters(), 0.0), remedies=Autopilot(**{"every": 4, **kw}),
                     detectors=[], param_norm_every=0, flush_every=flush_every)
    x = torch.zeros(4, 8)
    for v in losses:
        loss = float(v) + 0.0 * m(x).sum()
        loss.backward()
        guard.step(loss=loss)
    guard.flush()
    return [e for e in guard.events if e.kind == "rescue"], guard.remedies.actions[0]


def _flat(n):
    return [1.0 + 0.01 * (i % 3) for i in range(n)]


@pytest.mark.parametrize("first", [44, 45, 46, 47])
def test_a_large_lasting_rise_is_acted_on_after_three_losses(first):
    """Every loss after the suspect far above the threshold: decided once 3 are in, not 5 (each
    step waited for is an update the rollback discards)."""
    rescues, _ = _scripted(_flat(first) + [10.0] * 20, confirm=5)
    assert rescues and rescues[0].data["trigger_step"] == first
    three_in = first + 3
    # the flush that holds the third loss after the suspect decides
    assert rescues[0].step == (three_in // 4) * 4 + 3
    assert "every one of the" in rescues[0].message


@pytest.mark.parametrize("lasting,rescued", [(True, True), (False, False)])
def test_a_small_rise_is_judged_over_a_longer_window(lasting, rescued):
    """+8% over a 5%-noisy loss: 5 losses cannot tell it from noise; 20 can, and a transient of
    5 steps does not move the median of 20."""
    g = np.random.default_rng(0)
    base = list(np.exp(0.05 * g.standard_normal(60)))
    after = [1.3] + [1.08 * (1 + 0.005 * (-1) ** i) for i in range(30)]
    if not lasting:
        after = after[:5] + list(np.exp(0.05 * g.standard_normal(26)))
    rescues, ap = _scripted(base + after, confirm=5)
    assert bool(rescues) == rescued and ap.rollbacks == int(rescued)
    if rescued:
        assert rescues[0].data["trigger_step"] == 60
        assert "over the 20 steps after" in rescues[0].message
        assert rescues[0].step >= 80  # not at 5 losses: the longer test decided


def test_the_snapshot_comes_from_before_the_first_elevated_loss():
    """A loss above the damage threshold (below a suspect's) just before a quiet flush, then a
    lasting rise: the snapshot of that flush may already hold the damage; the rollback skips it."""
    losses = _flat(47) + [1.08, 1.0, 10.0] + [10.0] * 12
    rescues, ap = _scripted(losses, confirm=5)
    assert rescues and rescues[0].data["trigger_step"] == 47
    assert "already above its damage threshold at step 47" in rescues[0].message
    assert rescues[0].data["actions"][0] == "rolled back to the state after step 43"
    # no elevated loss before the rise: the newest snapshot before it
    rescues, _ = _scripted(_flat(49) + [10.0] * 12, confirm=5)
    assert rescues[0].data["trigger_step"] == 49
    assert rescues[0].data["actions"][0] == "rolled back to the state after step 47"


@pytest.mark.parametrize("floor,rescued", [(0.01, False), (0.0, True)])
def test_a_rise_tiny_against_the_runs_scale_is_left_alone(floor, rescued):
    """A run that went from 2 to 0.004 and wanders to 0.008: twice the level, noise-free, yet
    0.2% of where it started; the floor (a fraction of the first losses) leaves it alone."""
    losses = [2.0] * 10 + list(np.geomspace(2.0, 0.004, 40)) + [0.004] * 60 + [0.008] * 30
    rescues, ap = _scripted(losses, floor=floor)
    assert bool(rescues) == rescued and (ap.rollbacks > 0) == rescued  # (scripted: it rises again)
    assert ap._first == [2.0] * 10
    assert ap.state_dict()["first"] == [2.0] * 10


@pytest.mark.parametrize("flush_every", [1, 3, 4, 8])
def test_the_decision_does_not_depend_on_how_flushes_cut_the_losses(flush_every):
    """A lasting rise with dips (never 3 all above the threshold): the median of the 20 losses
    after the suspect decides, at the same trigger step whatever the flush interval (a test
    once ran only when exactly 5 losses were in, so 8-step flushes skipped it)."""
    losses = _flat(48) + [10.0] + [2.0, 2.0, 1.0, 2.0, 2.0] + [1.5, 1.0] * 20
    rescues, _ = _scripted(losses, flush_every=flush_every)
    assert rescues and rescues[0].data["trigger_step"] == 48
    assert "over the 20 steps after" in rescues[0].message
    assert rescues[0].step >= 68  # the 20th loss after the suspect is step 68


@pytest.mark.parametrize("now,raises", [(1000, True), (1001, False)])
def test_the_default_rollback_budget_is_four_in_1000_steps(now, raises):
    """The documented default: after 4 rollbacks within 1,000 steps the next trigger raises; once
    the first is 1,000 steps old it has left the window."""
    ap = Autopilot()
    ctx = _Ctx()
    ap._snaps = [[0, "s0", 1.0]]
    for step in (1, 250, 500, 750):
        ctx.steps = step
        ap(_rescue(step, 1), ctx)
    ctx.steps = now
    if raises:
        with pytest.raises(GuardAlarm, match="rollback budget exhausted: 4 rollbacks in 999 steps"):
            ap(_rescue(now, 1), ctx)
    else:
        ap(_rescue(now, 1), ctx)
        assert ap.rollbacks == 5
