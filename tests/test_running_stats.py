"""BatchNorm running statistics: which buffers are watched, their row block on both lanes, the
store, and RunningStatsDetector on real training runs (a batch x1000 is invisible to the
gradients and the loss of a BatchNorm network; only the running variance records it)."""
from __future__ import annotations

import json
import math
import sqlite3

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradguard as gg
from gradguard.detect import RunningStatsDetector
from gradguard.layout import GLOBAL_COLS, RowLayout, RunInfo, buffer_input, watched_buffers
from gradguard.record import RunStore, open_recorder


class Net(nn.Module):
    """Conv -> BN -> ReLU -> Conv -> BN -> pool -> Linear -> BN1d -> Linear (attributes, not Sequential)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc, self.bf = nn.Linear(6, 5), nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x))).mean((2, 3))
        return self.head(F.relu(self.bf(self.fc(x))))


def _train(model, steps, fault=None, fstep=150, guard_kw=None, seed=0):
    """SGD on a fixed synthetic task; ``fault``: "x1000" (the batch scaled) or "nan" (one NaN
    input) at step ``fstep``.  Returns the guard and every row it recorded."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = gg.Guard(model, opt, **(guard_kw or {}))
    seen = []
    guard.add_row_observer(lambda s, r: seen.append((np.asarray(s, np.int64), np.array(r, np.float32))))
    for i in range(steps):
        x = torch.randn(16, 1, 6, 6, generator=g)
        y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
        if fault == "x1000" and i == fstep:
            x = x * 1000
        if fault == "nan" and i == fstep:
            x[0, 0, 0, 0] = math.nan
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        guard.step(loss)
    guard.flush()
    steps = np.concatenate([s for s, _ in seen])
    rows = np.concatenate([r for _, r in seen])
    return guard, steps, rows


# ------------------------------------------------------------------ which buffers
def test_watched_buffers_and_the_layers_feeding_them():
    m = Net()
    names = [n for n, _ in m.named_parameters()]
    bufs = watched_buffers(m)
    assert [n for n, _ in bufs] == ["b1.running_var", "b2.running_var", "bf.running_var"]
    assert all(b is dict(m.named_buffers())[n] for n, b in bufs)  # the live tensors, not copies
    assert [buffer_input(m, n, names) for n, _ in bufs] == ["c1.weight", "c2.weight", "fc.weight"]
    # a Sequential, the usual case; a norm layer with nothing of its width before it: no input
    seq = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 4), nn.BatchNorm1d(4))
    sn = [n for n, _ in seq.named_parameters()]
    assert [buffer_input(seq, n, sn) for n, _ in watched_buffers(seq)] == [None, "1.weight"]
    assert buffer_input(seq, "2.running_var", ["2.weight"]) is None  # 1.weight not watched


class _ListsNet(nn.Module):
    """Convolutions in one ModuleList, their norms in another (a residual CNN's layout): in
    registration order ``convs.3`` comes just before ``bns.0``, which it does not feed."""

    def __init__(self, w=4):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, w, 3), nn.BatchNorm2d(w)
        self.convs = nn.ModuleList(nn.Conv2d(w, w, 3) for _ in range(4))
        self.bns = nn.ModuleList(nn.BatchNorm2d(w) for _ in range(4))
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(w, w, 1), nn.BatchNorm2d(w)) for _ in range(2))
        self.body = nn.Sequential(nn.BatchNorm2d(w), nn.ReLU())


def test_a_norm_layer_is_fed_from_inside_its_parent():
    """Only a module inside the norm layer's parent can be named as feeding it: the norms of a
    ModuleList of their own are named alone, not after the last convolution of another list;
    a block's own convolution is found; a norm first in its Sequential has none."""
    m = _ListsNet()
    names = [n for n, _ in m.named_parameters()]
    got = {b: buffer_input(m, b, names) for b, _ in watched_buffers(m)}
    assert got == {"bn0.running_var": "stem.weight",
                   **{f"bns.{k}.running_var": None for k in range(4)},
                   "blocks.0.1.running_var": "blocks.0.0.weight", "blocks.1.1.running_var": "blocks.1.0.weight",
                   "body.0.running_var": None}
    # a norm layer as the whole model, or one not in it: nothing feeds it
    assert buffer_input(nn.BatchNorm1d(3), "running_var", []) is None
    assert buffer_input(m, "nope.running_var", names) is None


@pytest.mark.parametrize("layer, watched", [
    (nn.BatchNorm2d(3), True), (nn.BatchNorm2d(3, track_running_stats=False), False),
    (nn.InstanceNorm2d(3), False), (nn.InstanceNorm2d(3, track_running_stats=True), True),
    (nn.LayerNorm(3), False), (nn.GroupNorm(1, 3), False)])
def test_only_tracked_running_variances_are_watched(layer, watched):
    assert bool(watched_buffers(nn.Sequential(nn.Conv2d(1, 3, 1), layer))) is watched


def test_no_buffers_without_a_model_or_without_parameter_norms():
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    assert gg.Guard(m, opt).run.buffers == ("b1.running_var", "b2.running_var", "bf.running_var")
    assert gg.Guard(m, opt, param_norm_every=0).run.buffers == ()
    assert gg.Guard(list(m.named_parameters()), opt).run.buffers == ()
    assert watched_buffers(None) == []


def test_layout_puts_the_buffers_last():
    lay = RowLayout(4, 3)
    G = len(GLOBAL_COLS)
    assert lay.width == G + 3 * 4 + 3
    rows = np.arange(2 * lay.width, dtype=np.float32).reshape(2, lay.width)
    np.testing.assert_array_equal(lay.param_norms(rows), rows[:, G + 8:G + 12])
    np.testing.assert_array_equal(lay.buffer_norms(rows), rows[:, G + 12:])
    assert RowLayout(4).width == G + 12 and RowLayout(4).buffer_norms(rows[:, :G + 12]).shape == (2, 0)


# ------------------------------------------------------------------ the row block, both lanes
@pytest.mark.parametrize("backend", ["auto", "device"])
@pytest.mark.parametrize("every", [1, 3])
def test_rows_hold_the_running_variance_norms_on_every_step(backend, every):
    """Against torch's own norm of each buffer, read right after each step; the parameter norms
    keep their own schedule."""
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    guard = gg.Guard(m, opt, backend=backend, param_norm_every=every, detectors=[])
    rows, ref = [], {}
    guard.add_row_observer(lambda s, r: rows.extend(zip(s, np.array(r))))
    bufs = [b for _, b in watched_buffers(m)]
    for i in range(7):
        x = torch.randn(8, 1, 6, 6) * (1000.0 if i == 3 else 1.0)
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        ref[i] = np.array([torch.linalg.vector_norm(b).item() for b in bufs], np.float32)
        guard.step()
    guard.flush()
    lay = guard.run.layout
    assert len(rows) == 7
    for s, r in rows:
        np.testing.assert_allclose(lay.buffer_norms(r), ref[s], rtol=1e-6)
        assert np.isnan(lay.param_norms(r)).all() == bool(s % every)


# ------------------------------------------------------------------ the store
def test_store_keeps_buffer_norms_bit_for_bit(tmp_path):
    guard, steps, rows = _train(Net(), 40, guard_kw={"log_dir": tmp_path, "run_name": "bn",
                                                     "param_norm_every": 4, "detectors": []})
    guard.close()
    store = RunStore(tmp_path)
    got = store.buffer_norms("bn")
    lay = guard.run.layout
    assert got["names"] == list(guard.run.buffers)
    assert got["step"].tolist() == list(range(40))  # every step (the parameters: one in 4)
    np.testing.assert_array_equal(got["norm"].view(np.uint32), lay.buffer_norms(rows).view(np.uint32))
    sub = store.buffer_norms("bn", 10, 20)
    assert sub["step"].tolist() == list(range(10, 21))
    # the parameter norms are unchanged by the extra block
    np.testing.assert_array_equal(store.param_norms("bn")["norm"], lay.param_norms(rows[::4]))


def test_a_v2_store_takes_the_buffers_when_a_run_resumes_into_it(tmp_path):
    """A store from before buffers were stored (schema v2: no ``bnorms``, no ``buffers`` meta):
    read as before; resuming into it upgrades it and stores the new rows' buffer norms."""
    from gradguard.record.schema import DB_NAME, SCHEMA_VERSION

    L, B, G = 2, 1, len(GLOBAL_COLS)
    layers = [{"name": f"l{i}", "shape": [2, 2], "order": i} for i in range(L)]
    rng = np.random.default_rng(0)
    rows = rng.lognormal(0, 1, (60, G + 3 * L + B)).astype(np.float32)
    rows[1::5, G + 2 * L:G + 3 * L] = np.nan  # not every step measures the parameters
    rec = open_recorder(tmp_path, run_name="old", layers=layers)
    rec.write_steps(np.arange(30), rows[:30, :G + 3 * L], GLOBAL_COLS)
    rec.close()
    con = sqlite3.connect(tmp_path / "old" / DB_NAME)  # what a v2 writer left
    con.executescript("ALTER TABLE chunks DROP COLUMN bnorms; DELETE FROM meta WHERE key='buffers'; "
                      "PRAGMA user_version=2; UPDATE meta SET value='2' WHERE key='schema_version';")
    con.close()
    assert RunStore(tmp_path).buffer_norms("old")["step"].size == 0

    rec = open_recorder(tmp_path, run_name="old", layers=layers, buffers=["bn.running_var"])
    assert rec.resume("old", 20)
    rec.write_steps(np.arange(20, 60), rows[20:], GLOBAL_COLS)
    rec.close()
    con = sqlite3.connect(tmp_path / "old" / DB_NAME)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert json.loads(con.execute("SELECT value FROM meta WHERE key='buffers'").fetchone()[0]) == ["bn.running_var"]
    con.close()
    store = RunStore(tmp_path)
    assert store.steps("old")["step"].tolist() == list(range(60))
    got = store.buffer_norms("old")
    assert got["step"].tolist() == list(range(60))
    want = rows[:, G + 3 * L:].copy()
    want[:20] = np.nan  # the rows kept from the v2 store had no buffers
    np.testing.assert_array_equal(got["norm"], want)
    assert store.param_norms("old")["step"].tolist() == [s for s in range(60) if s % 5 != 1]


def test_resuming_with_other_buffers_starts_a_new_run_and_loses_nothing(tmp_path):
    layers = [{"name": "w", "shape": [2], "order": 0}]
    G = len(GLOBAL_COLS)
    rec = open_recorder(tmp_path, run_name="a", layers=layers, buffers=["x.running_var"])
    rec.write_steps(np.arange(10), np.ones((10, G + 4), np.float32), GLOBAL_COLS)
    rec.close()
    rec = open_recorder(tmp_path, run_name="a", layers=layers, buffers=["y.running_var", "z.running_var"])
    assert not rec.resume("a", 5)
    rec.write_steps(np.arange(5, 10), np.full((5, G + 5), 2, np.float32), GLOBAL_COLS)
    rec.close()
    store = RunStore(tmp_path)
    assert rec.run_name != "a" and store.steps(rec.run_name)["step"].tolist() == list(range(5, 10))
    assert store.steps("a")["step"].tolist() == list(range(10))  # the first run is untouched


@pytest.mark.parametrize("bad", [["a", 3], "abc", [None]])
def test_bad_buffers_are_named(tmp_path, bad):
    with pytest.raises(TypeError, match="buffers"):
        open_recorder(tmp_path, run_name="b", layers=[], buffers=bad)


# ------------------------------------------------------------------ the detector on real runs
def test_a_batch_x1000_is_named_at_its_step_by_the_layer_it_entered():
    guard, steps, rows = _train(Net(), 300, "x1000")
    lay = guard.run.layout
    # what the other detectors see: nothing (BatchNorm normalises the batch away)
    g = rows[:, 4]  # global_norm
    assert g[150] < 3 * np.median(g[140:150])
    ev = [e for e in guard.events if e.severity != "info"]
    assert [(e.step, e.kind) for e in ev] == [(150, "running_stats")], [str(e) for e in ev]
    e = ev[0]
    assert e.layers[:2] == ["c1.weight", "b1.running_var"] and e.severity == "warning"
    assert e.data["since"] == 149 and e.data["growth"] > 1e4 and "at step 150" in e.message
    assert "c1" in e.message and "running variance of b1" in e.message
    assert any("reset_running_stats" in a for a in e.advice)
    assert lay.buffer_norms(rows[150])[0] > 1e4 * lay.buffer_norms(rows[149])[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_bn_runs_get_no_running_stats_event(seed):
    """The early moves of a running variance (from 1 to the activations' variance) and the drift
    of a training run are not jumps."""
    guard, _, _ = _train(Net(), 400, seed=seed, guard_kw={"param_norm_every": 1})
    assert not [e for e in guard.events if e.kind == "running_stats"], [str(e) for e in guard.events]


def test_a_nan_activation_poisons_the_statistics_once_reported_critical():
    guard, steps, rows = _train(Net(), 260, "nan")
    ev = [e for e in guard.events if e.kind == "running_stats"]
    assert len(ev) == 1, [str(e) for e in ev]  # NaN forever after: reported once
    assert ev[0].severity == "critical" and ev[0].step == 150 and ev[0].layers[0] == "c1.weight"
    assert "b1.running_var" in ev[0].data["buffers"]
    # the guard skipped the step (on_nonfinite="skip"), and the statistics are NaN all the same
    assert guard.skipped_steps == 1
    assert np.isnan(guard.run.layout.buffer_norms(rows[250])).any()


@pytest.mark.parametrize("fault", ["x1000", "nan"])
def test_the_autopilot_rolls_poisoned_statistics_back(fault):
    """Skipping a step withholds its update, not its forward pass: only a rollback returns the
    running statistics a bad batch wrote.  Without the autopilot they stay wrong (the control)."""
    plain, _, prow = _train(Net(), 200, fault)
    guard, steps, rows = _train(Net(), 200, fault, guard_kw={"remedies": "auto"})
    lay = guard.run.layout
    (rescue,) = [e for e in guard.events if e.kind == "rescue"]
    assert rescue.data["trigger_kind"] == "running_stats" and rescue.data["trigger_step"] == 150
    before, later = (lay.buffer_norms(rows[np.flatnonzero(steps == s)[-1]]) for s in (149, 170))
    assert np.isfinite(later).all() and (later < 3 * before).all(), (before, later)
    control = lay.buffer_norms(prow[170])
    assert not (control < 3 * before).all()  # NaN, or still >100x after 20 steps of decay
    assert np.isfinite(lay.buffer_norms(rows[-1])).all()
    assert not [e for e in guard.events if e.kind == "running_stats" and e.step > 150]


def test_a_jump_before_warmup_is_not_judged():
    guard, _, _ = _train(Net(), 80, "x1000", fstep=20)
    assert not [e for e in guard.events if e.kind == "running_stats"]
    guard, _, _ = _train(Net(), 80, "x1000", fstep=20,
                         guard_kw={"detectors": [RunningStatsDetector(warmup=0)]})
    assert [e.step for e in guard.events if e.kind == "running_stats"] == [20]


def _events(det, run, steps, rows, cuts):
    det.bind(run)
    out = []
    for a, b in zip([0] + cuts, cuts + [len(steps)]):
        out += det.update(steps[a:b], rows[a:b], run)
    return [(e.step, e.severity, tuple(e.layers), e.message) for e in out]


def test_same_events_in_any_chunking_and_across_a_state_round_trip():
    guard, steps, rows = _train(Net(), 300, "x1000", guard_kw={"detectors": []})
    run = guard.run
    whole = _events(RunningStatsDetector(cooldown=0), run, steps, rows, [])
    assert [s for s, *_ in whole] == [150]
    for cuts in ([1, 2, 3], [149, 150, 151], list(range(7, 300, 13))):
        assert _events(RunningStatsDetector(cooldown=0), run, steps, rows, cuts) == whole
    a = RunningStatsDetector(cooldown=0)
    first = _events(a, run, steps[:145], rows[:145], [])
    b = RunningStatsDetector(cooldown=0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    b.bind(run)
    assert first + [(e.step, e.severity, tuple(e.layers), e.message)
                    for e in b.update(steps[145:], rows[145:], run)] == whole
    c = RunningStatsDetector(cooldown=0)
    c.load_state_dict(b.state_dict())
    assert c.state_dict() == b.state_dict()


def test_rows_without_buffers_give_nothing():
    guard, steps, rows = _train(Net(), 200, "x1000", guard_kw={"detectors": []})
    r = guard.run
    bare = RunInfo(r.names, r.shapes, r.trainable, r.owner, r.module_types, r.param_norm_every,
                   r.init_layer_norms)
    assert _events(RunningStatsDetector(), bare, steps, rows[:, :bare.layout.width], []) == []


@pytest.mark.parametrize("kw, match", [({"jump": 1.0}, "jump"), ({"jump": -3}, "jump"),
                                       ({"jump": math.nan}, "jump"), ({"warmup": -1}, "warmup"),
                                       ({"warmup": 2.5}, "warmup"), ({"cooldown": None}, "cooldown")])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        RunningStatsDetector(**kw)


def test_a_guard_state_saved_without_the_detector_loads(tmp_path):
    """Guards saved before RunningStatsDetector existed (nine default detectors) load; it starts fresh."""
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    g = gg.Guard(m, opt)
    sd = g.state_dict()
    sd["detectors"] = sd["detectors"][:-1]
    h = gg.Guard(m, opt)
    h.load_state_dict(sd)
    assert isinstance(h.detectors[-1], RunningStatsDetector)


@pytest.mark.parametrize("strip", ["buffers", "buffers+params"])
def test_pending_rows_saved_before_buffers_load_with_nan_there(strip):
    """A guard state whose rows pending a flush were saved by a version without the buffer block
    (or without parameter norms as well) loads; the missing blocks are NaN (not measured)."""
    from gradguard.layout import N_GLOBAL

    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    g = gg.Guard(m, opt, flush_every=1000, param_norm_every=1, detectors=[])
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(8, 1, 6, 6)).pow(2).mean().backward()
        g.step()
    sd = g.state_dict()
    lay = g.run.layout
    full = np.asarray(sd["pending"]["rows"], np.float32).reshape(3, lay.width)
    keep = N_GLOBAL + (3 if strip == "buffers" else 2) * lay.n
    sd["pending"]["rows"] = full[:, :keep].tolist()
    h = gg.Guard(m, opt, flush_every=1000, param_norm_every=1, detectors=[])
    rows = []
    h.add_row_observer(lambda s, r: rows.append(np.array(r)))
    h.load_state_dict(sd)
    h.flush()
    got = np.concatenate(rows)
    np.testing.assert_array_equal(got[:, :keep], full[:, :keep])
    assert np.isnan(got[:, keep:]).all() and not np.isnan(full[:, keep:]).any()
    # and a state with the block round-trips it
    k = gg.Guard(m, opt, flush_every=1000, param_norm_every=1, detectors=[])
    rows.clear()
    k.add_row_observer(lambda s, r: rows.append(np.array(r)))
    k.load_state_dict(g.state_dict())
    k.flush()
    np.testing.assert_array_equal(np.concatenate(rows), full)


@pytest.mark.parametrize("every, at", [(10, 55), (1, 55), (0, None)])
def test_statistics_poisoned_by_nan_weights_are_reported_at_once(every, at):
    """Weights set to NaN before step 55 (a bad write): that step's statistics are NaN, whatever
    the parameter norms' schedule; ``param_norm_every=0`` watches no buffers at all."""
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    guard = gg.Guard(m, opt, on_nonfinite="skip", nonfinite_budget=None, param_norm_every=every)
    rows = []
    guard.add_row_observer(lambda s, r: rows.extend(zip(s, np.array(r))))
    for i in range(70):
        if i == 55:
            with torch.no_grad():
                m.c1.weight.fill_(math.nan)
        opt.zero_grad()
        F.cross_entropy(m(torch.randn(16, 1, 6, 6)), torch.arange(16) % 3).backward()
        guard.step()
    guard.flush()
    lay = guard.run.layout
    assert math.isnan(dict(rows)[60][lay.index("param_norm")])  # NaN weights, or not measured (0)
    ev = [e for e in guard.events if e.kind == "running_stats"]
    assert [(e.step, e.severity, e.data["since"]) for e in ev] == ([(at, "critical", at - 1)] if at else []), \
        [str(e) for e in ev]
    if at:
        assert "the forward pass of step 55" in ev[0].message


@pytest.mark.parametrize("cuts", [[], [1, 2, 3], [151, 152], list(range(5, 260, 11))])
def test_nan_statistics_are_reported_once_in_any_chunking(cuts):
    """Without a cooldown, the NaN statistics (NaN on every later measurement) give one event, in
    whole batches of rows and in pieces; a buffer that turns finite again could be reported anew."""
    guard, steps, rows = _train(Net(), 260, "nan", guard_kw={"detectors": []})
    ev = _events(RunningStatsDetector(cooldown=0), guard.run, steps, rows, cuts)
    assert [(s, sev) for s, sev, *_ in ev] == [(150, "critical")], ev
    lay = guard.run.layout
    healed = rows.copy()
    b1 = lay.buffer_norms_slice.start
    healed[200:230, b1] = 1.0  # b1 finite from 200 (reset) ...
    healed[230, b1] = math.nan  # ... and NaN again at 230, a poisoned step: reported again
    healed[230, lay.index("bad")] = 1.0
    ev = _events(RunningStatsDetector(cooldown=0), guard.run, steps, healed, cuts)
    assert [(s, sev) for s, sev, *_ in ev] == [(150, "critical"), (230, "critical")], ev


def _synthetic(buffer_norms, every=10):
    """A clean run of one weight and one watched buffer whose norm is ``buffer_norms[step]``
    (parameters measured every ``every`` steps)."""
    run = RunInfo(("c.weight", "b.weight"), ((2, 2), (2,)), (True, True), {}, frozenset(), every,
                  np.ones(2), ("b.running_var",), ("c.weight",))
    lay = run.layout
    steps = np.arange(len(buffer_norms), dtype=np.int64)
    rows = np.full((len(steps), lay.width), np.nan, np.float32)
    rows[:, :lay.param_norms_slice.start] = 1.0
    rows[:, [lay.index("bad"), lay.index("skipped"), lay.index("loss_bad")]] = 0.0
    rows[:, lay.index("param_norm")] = np.nan
    rows[::every, lay.index("param_norm")] = math.sqrt(2)
    rows[::every, lay.param_norms_slice] = 1.0
    rows[:, lay.buffer_norms_slice] = np.asarray(buffer_norms, np.float32)[:, None]
    return run, steps, rows


@pytest.mark.parametrize("after, fires", [(100.0, True), (99.99, False), (1e30, True), (0.0, False)])
def test_a_jump_is_judged_from_its_threshold_on(after, fires):
    run, steps, rows = _synthetic([1.0] * 80 + [after] + [1.0] * 19)
    ev = _events(RunningStatsDetector(), run, steps, rows, [])
    assert [s for s, *_ in ev] == ([80] if fires else [])
    if fires:
        assert ev[0][2] == ("c.weight", "b.running_var")


@pytest.mark.parametrize("warmup, fires", [(69, True), (70, False), (0, True)])
def test_warmup_is_the_previous_measurements_step(warmup, fires):
    run, steps, rows = _synthetic([1.0] * 70 + [500.0] * 5)  # jumped at 70, measured at 69 before
    ev = _events(RunningStatsDetector(warmup=warmup), run, steps, rows, [])
    assert [s for s, *_ in ev] == ([70] if fires else [])


def test_an_all_nan_block_on_a_clean_step_is_not_a_measurement():
    """Rows restored from an older guard's state have no buffer norms (NaN): not reported, and the
    next measurement is compared with the last real one."""
    run, steps, rows = _synthetic([1.0] * 100 + [300.0] * 5)
    rows[60:100, run.layout.buffer_norms_slice] = np.nan
    ev = _events(RunningStatsDetector(cooldown=0), run, steps, rows, [])
    assert [(s, sev) for s, sev, *_ in ev] == [(100, "warning")]
    assert "between steps 59 and 100" in ev[0][3]
    rows[70, run.layout.index("bad")] = 1.0  # a poisoned step's NaN statistics are a measurement
    ev = _events(RunningStatsDetector(cooldown=0), run, steps, rows, [])
    assert [(s, sev) for s, sev, *_ in ev] == [(70, "critical")]
