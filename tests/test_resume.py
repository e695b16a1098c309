"""Resume: a run stopped at step N and resumed from a checkpoint equals the uninterrupted run.

``guard.state_dict()`` is saved with the model and optimizer checkpoint (a plain
``torch.save`` file, loadable with torch's default ``weights_only=True``).  After
the resume everything is bitwise what the uninterrupted run has on CPU:
weights, optimizer state, adaptive thresholds (AutoClip / ZClip / AdaGC; AGC is
stateless), detector baselines, remedy state, counters and events.
"""
import copy
from functools import partial
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.adaptive import AGC, AdaGC, AutoClip, ZClip
from gradguard.record import RunStore

from conftest import assert_same
from _helpers import mlp

TOTAL = 32
POISON = {3: "nan", 9: "inf_loss", 21: "nan"}
SPIKES = (26,)  # gradients x1e3: a spike event once the detectors are warm

POLICIES = {
    "none": lambda: None,
    "global": lambda: gg.GlobalNorm(1.0),
    "autoclip": lambda: AutoClip(percentile=25, history=7),  # the window wraps before the stop
    "zclip": lambda: ZClip(warmup=4, z_thresh=1.5),
    "adagc": lambda: AdaGC(warmup=3),
    "agc": lambda: AGC(0.05),
}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise comparisons across two runs
    yield
    torch.set_num_threads(n)


_model = partial(mlp, 5, 12, 12, 2)


def _batch(i):
    g = torch.Generator().manual_seed(7 + i)
    return torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)


def _build(policy, log_dir=None, run_name=None):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    guard = gg.Guard(model, opt, clip=POLICIES[policy](), log_dir=log_dir, run_name=run_name,
                     remedies={"nonfinite": gg.LRBackoff(patience=1, recover_every=5)},
                     param_norm_every=3)
    return model, opt, guard


def _steps(model, opt, guard, start, stop):
    for i in range(start, stop):
        x, y = _batch(i)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if POISON.get(i) == "nan":
            model[2].weight.grad[0, 0] = math.nan
        elif POISON.get(i) == "inf_loss":
            loss = loss + math.inf
        if i in SPIKES:
            for p in model.parameters():
                p.grad.mul_(1e3)
        guard.step(loss=loss)


@pytest.mark.parametrize("stop", [1, 14, 23])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_stop_and_resume_equals_uninterrupted(policy, stop, tmp_path):
    model, opt, guard = _build(policy)
    _steps(model, opt, guard, 0, TOTAL)
    ref = {"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()}

    model, opt, guard = _build(policy)
    _steps(model, opt, guard, 0, stop)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()}, ckpt)
    del model, opt, guard  # the process is gone

    state = torch.load(ckpt)  # torch's default: weights_only=True
    model, opt, guard = _build(policy)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    guard.load_state_dict(state["guard"])
    assert guard.steps == stop
    _steps(model, opt, guard, stop, TOTAL)

    assert_same(ref["model"], model.state_dict(), "model")
    assert_same(ref["opt"], opt.state_dict(), "optimizer")
    assert_same(ref["guard"], guard.state_dict(), "guard")
    # the run did something worth resuming: skips, events, a learned threshold
    assert guard.skipped_steps == len(POISON)
    kinds = {e.kind for e in guard.events}
    assert "nonfinite" in kinds and "spike" in kinds, kinds


def test_state_dict_is_weights_only_loadable_and_round_trips(tmp_path):
    """Every piece of guard state survives torch.save / torch.load(weights_only=True)."""
    model, opt, guard = _build("autoclip")
    _steps(model, opt, guard, 0, 24)
    sd = guard.state_dict()
    torch.save(sd, tmp_path / "g.pt")
    back = torch.load(tmp_path / "g.pt")
    assert_same(sd, back)
    _, _, other = _build("autoclip")
    other.load_state_dict(back)
    assert_same(sd, other.state_dict())


def test_resume_mid_flush_interval(tmp_path):
    """state_dict() does not flush: rows pending in the buffer are saved in it (not lost), and
    still reach the store at close."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, flush_every=8, log_dir=tmp_path, run_name="r")
    _steps(model, opt, guard, 0, 5)  # 5 rows pending, step 3 poisoned
    sd = guard.state_dict()
    assert sd["step"] == 5 and sd["skipped"] == 1 and [e["step"] for e in sd["events"]] == [3]
    assert sd["pending"]["steps"] == [4]  # step 3 (poisoned) flushed at once on the host lane
    guard.close()
    assert RunStore(tmp_path).steps("r")["step"].tolist() == [0, 1, 2, 3, 4]


def test_store_resume_no_duplicate_or_missing_steps(tmp_path):
    # Uninterrupted reference run
    model, opt, guard = _build("zclip", tmp_path / "ref", "r")
    _steps(model, opt, guard, 0, TOTAL)
    guard.close()
    ref = RunStore(tmp_path / "ref")

    # Checkpoint at 14, keep training (and logging) to 24, then the process dies.
    log = tmp_path / "log"
    model, opt, guard = _build("zclip", log, "r")
    _steps(model, opt, guard, 0, 14)
    # deepcopy: a state_dict shares storage with the live model, a checkpoint must not
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()})
    pending = ckpt["guard"]["pending"]["steps"]
    assert pending and pending[0] < 14  # rows the checkpoint holds, not yet in the store
    _steps(model, opt, guard, 14, 24)
    guard.flush()  # the guard's buffer to the recorder, then the recorder's queue to SQLite:
    guard.recorder.flush()  # steps up to 23 and the event at 21 reached the store before the crash
    crashed = RunStore(log)
    assert crashed.steps("r")["step"].tolist() == list(range(24))  # the premise, checked
    assert [e.step for e in crashed.events("r") if e.step >= pending[0]] == [21]
    del model, opt, guard, crashed

    model, opt, guard = _build("zclip", log, "r")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    guard.load_state_dict(ckpt["guard"])
    _steps(model, opt, guard, 14, TOTAL)
    guard.close()

    store = RunStore(log)
    assert [r["name"] for r in store.runs()] == ["r"]  # one run, continued
    got, want = store.steps("r"), ref.steps("r")
    assert got["step"].tolist() == list(range(TOTAL))  # no duplicates, no gaps
    for col in want:
        np.testing.assert_array_equal(got[col], want[col], err_msg=col)
    got, want = store.param_norms("r"), ref.param_norms("r")
    assert got["step"].tolist() == want["step"].tolist() and len(got["step"]) >= TOTAL // 10
    np.testing.assert_array_equal(got["norm"], want["norm"])
    assert [e.to_dict() for e in store.events("r")] == [e.to_dict() for e in ref.events("r")]


def test_state_saved_by_0_1_0_loads_and_continues(tmp_path):
    """tests/data/guard_state_0_1_0.pt was written by gradguard 0.1.0 (ZClip, an LRBackoff
    remedy, a NaN step, three rows pending a flush). This version loads it, keeps its counters,
    events and policy state, and records the pending rows at their own steps."""
    saved = torch.load(Path(__file__).parent / "data" / "guard_state_0_1_0.pt", weights_only=False)
    assert saved["gradguard"] == "0.1.0"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    model.load_state_dict(saved["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.load_state_dict(saved["opt"])
    guard = gg.Guard(model, opt, clip=gg.ZClip(warmup=5), flush_every=8, log_dir=tmp_path, run_name="r",
                     remedies={"spike": gg.LRBackoff()})
    guard.load_state_dict(saved["guard"])
    assert guard.steps == 21 and guard.skipped_steps == 1
    assert [e.step for e in guard.events if e.kind == "nonfinite"] == [9]
    clip_state = guard.clip.state_dict()
    for k, v in saved["guard"]["clip"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(clip_state[k], v), k
    for i in range(21, 26):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss=loss)
    guard.close()
    steps = gg.RunStore(tmp_path).steps("r")
    assert steps["step"].tolist() == list(range(18, 26))  # the pending rows, then the new ones
    assert all(math.isfinite(v) for v in steps["loss"].tolist())


class _Branchy(nn.Module):
    """The resume model plus two branches: ``early`` gets gradients only on the first steps,
    ``never`` none at all (what UnusedDetector reports, once its patience is spent)."""

    def __init__(self):
        super().__init__()
        self.body = _model()
        self.early, self.never = nn.Linear(5, 2), nn.Linear(5, 2)
        self.use_early = True

    def forward(self, x):
        y = self.body(x)
        return y + self.early(x) if self.use_early else y


def _build_crossing(snap_dir):
    model = _Branchy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    det = gg.UnusedDetector(patience=20)
    guard = gg.Guard(model, opt, flush_every=2, detectors=[det],
                     remedies={"nonfinite": gg.Rollback(every=2, skip_batches=6, to=snap_dir)})
    return model, opt, guard


def _crossing_steps(model, opt, guard, start, stop, held_seen):
    for i in range(start, stop):
        model.use_early = i < 5  # ``early`` has gradients on steps 0-4 only
        x, y = _batch(i)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if i == 9:
            model.body[2].weight.grad[0, 0] = math.nan  # rollback at once, then 6 held steps
        held_seen[i] = guard.hold_steps
        guard.step(loss=loss)


@pytest.mark.parametrize("stop", [11, 13, 19, 25])
def test_resume_crosses_held_batches_and_unused_patience(stop, tmp_path):
    """A checkpoint taken while a Rollback still holds batches (steps 10-15), and before
    UnusedDetector's patience (20) is spent: the resumed run holds the same batches, and the
    detector fires at the same step naming ``never`` only (``early`` had gradients before the
    checkpoint) -- as in the uninterrupted run; after it fired (stop 25), it does not fire again."""
    held_ref = {}
    model, opt, guard = _build_crossing(tmp_path / "snap_ref")
    _crossing_steps(model, opt, guard, 0, TOTAL, held_ref)
    ref = {"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()}
    assert [i for i, h in held_ref.items() if h] == list(range(10, 16))  # the premise: a hold
    unused = [e for e in guard.events if e.kind == "unused"]
    assert [(e.step, e.layers) for e in unused] == [(19, ["never.weight", "never.bias"])]
    assert guard.remedies.state_dict()  # (a rollback happened: see held_ref)

    held = {}
    model, opt, guard = _build_crossing(tmp_path / "snap")
    _crossing_steps(model, opt, guard, 0, stop, held)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()}, ckpt)
    del model, opt, guard

    state = torch.load(ckpt)
    model, opt, guard = _build_crossing(tmp_path / "snap")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    guard.load_state_dict(state["guard"])
    _crossing_steps(model, opt, guard, stop, TOTAL, held)
    assert held == held_ref
    assert [(e.step, e.layers) for e in guard.events if e.kind == "unused"] == \
        [(e.step, e.layers) for e in unused]
    assert_same(ref["model"], model.state_dict(), "model")
    assert_same(ref["opt"], opt.state_dict(), "optimizer")
    assert_same(ref["guard"], guard.state_dict(), "guard")


@pytest.mark.parametrize("stored", [None, "", "0", "3"])
def test_resume_keeps_the_dropped_rows_count(stored, tmp_path):
    """The count of rows a run lost survives a resume; a store without the key (or with an
    empty value) counts 0, never a negative number."""
    import sqlite3

    from gradguard.record.schema import DB_NAME

    model, opt, guard = _build("none", tmp_path, "r")
    _steps(model, opt, guard, 0, 6)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()})
    guard.close()
    con = sqlite3.connect(tmp_path / "r" / DB_NAME)
    with con:
        con.execute("DELETE FROM meta WHERE key = 'dropped_rows'")
        if stored is not None:
            con.execute("INSERT INTO meta VALUES ('dropped_rows', ?)", (stored,))
    con.close()
    model, opt, guard = _build("none", tmp_path, "r")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    guard.load_state_dict(ckpt["guard"])
    _steps(model, opt, guard, 6, 10)
    guard.close()
    (run,) = RunStore(tmp_path).runs()
    assert run["dropped_rows"] == (int(stored) if stored else 0)
    assert RunStore(tmp_path).steps("r")["step"].tolist() == list(range(10))
