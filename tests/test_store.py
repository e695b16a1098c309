"""Run store: real SQLite files under tmp_path, written by a real Guard and by the recorder."""
from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.guard import GLOBAL_COLS
from gradguard.record import RunNotFound, RunStore, open_recorder
from gradguard._json import json_safe
from gradguard.record.schema import DB_NAME

G = len(GLOBAL_COLS)


def _layers(n):
    return [{"name": f"layer{i}", "shape": [i + 1, 2], "order": i} for i in range(n)]


def _rows(steps, L, rng):
    k = len(steps)
    rows = np.empty((k, G + 3 * L), np.float32)
    rows[:, :G] = rng.random((k, G))
    rows[:, G:G + L] = rng.lognormal(0, 1, (k, L))
    rows[:, G + L:G + 2 * L] = rows[:, G:G + L] / 3
    rows[:, G + 2 * L:] = rng.lognormal(2, 1, (k, L))  # parameter norms
    return rows


def test_guard_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(0.5), log_dir=tmp_path, run_name="rt")
    ref_norms, ref_max, ref_loss, ref_params = [], [], [], []
    for i in range(40):
        opt.zero_grad()
        loss = ((model(torch.randn(8, 3)) - 1) ** 2).mean()
        if i == 17:
            loss = loss * math.inf
        loss.backward()
        ref_params.append([torch.linalg.vector_norm(p.detach().double()).item() for p in model.parameters()])
        grads = [p.grad for p in model.parameters()]
        ref_norms.append([torch.linalg.vector_norm(g.double()).item() for g in grads])
        ref_max.append([g.abs().max().item() for g in grads])
        ref_loss.append(loss.item())
        guard.step(loss=loss)
    guard.close()

    store = RunStore(tmp_path)
    (run,) = store.runs()
    assert run["name"] == "rt" and run["status"] == "finished" and run["last_step"] == 39
    assert run["config"]["clip"]["max_norm"] == 0.5
    assert [l["name"] for l in store.layers("rt")] == [n for n, _ in model.named_parameters()]
    assert store.layers("rt")[0]["shape"] == [5, 3]

    s = store.steps("rt")
    np.testing.assert_array_equal(s["step"], np.arange(40))
    np.testing.assert_allclose(s["loss"], ref_loss, rtol=1e-6)
    fin = np.isfinite(np.array(ref_norms)).all(1)
    ref_global = np.sqrt((np.array(ref_norms) ** 2).sum(1))
    np.testing.assert_allclose(s["global_norm"][fin], ref_global[fin], rtol=1e-5)
    assert s["skipped"][17] == 1 and s["skipped"].sum() == 1
    np.testing.assert_allclose(s["clip_coef"][fin], np.minimum(1, 0.5 / (ref_global[fin] + 1e-6)), rtol=1e-4)
    ln = store.layer_norms("rt")
    np.testing.assert_allclose(ln["norm"][fin], np.array(ref_norms)[fin], rtol=1e-5)
    np.testing.assert_allclose(ln["max_abs"], np.array(ref_max), rtol=1e-6)
    pn = store.param_norms("rt")  # measured every param_norm_every (10) steps, before the update
    assert pn["step"].tolist() == [0, 10, 20, 30] and pn["norm"].dtype == np.float32
    np.testing.assert_allclose(pn["norm"], np.array(ref_params)[::10], rtol=1e-6)
    assert store.param_norms("rt", start=5, end=20)["step"].tolist() == [10, 20]
    summary = store.layer_summary("rt")  # the latest measured parameter norm, and over the first
    np.testing.assert_allclose([l["weight"] for l in summary], ref_params[30], rtol=1e-6)
    np.testing.assert_allclose([l["weight_growth"] for l in summary],
                               np.array(ref_params[30]) / np.array(ref_params[0]), rtol=1e-6)
    # event data comes back under the shared JSON convention (NaN/Inf as "NaN"/"Inf"/"-Inf")
    assert [e.to_dict() for e in store.events("rt")] == json_safe([e.to_dict() for e in guard.events])
    assert store.events("rt")[0].step == 17


@pytest.mark.parametrize("awkward", [math.nan, math.inf, -math.inf, 1e30, 1e-30])
def test_downsampling_keeps_min_max_per_bucket(tmp_path, awkward):
    rng = np.random.default_rng(1)
    L, n = 7, 5000
    steps = np.arange(n) * 2 + 10          # non-unit stride: buckets must follow steps, not rows
    rows = _rows(steps, L, rng)
    rows[1888, G + 3] = awkward            # one layer's norm
    rows[1888, G + L + 3] = awkward        # ... and its max |g|
    rows[3001, GLOBAL_COLS.index("global_norm")] = awkward
    rec = open_recorder(tmp_path, run_name="ds", layers=_layers(L), config={})
    for a in range(0, n, 37):              # uneven flushes
        rec.write_steps(steps[a:a + 37], rows[a:a + 37], GLOBAL_COLS)
    rec.close()
    assert rec.failures == {}
    store = RunStore(tmp_path)

    s = store.steps("ds", max_points=100)
    assert 2 < len(s["step"]) <= 100
    gn = rows[:, GLOBAL_COLS.index("global_norm")].astype(np.float64)
    got = s["global_norm"].astype(np.float64)
    for lo, hi, vmin, vmax in zip(s["step"][0::2], s["step"][1::2], got[0::2], got[1::2]):
        sel = gn[(steps >= lo) & (steps <= hi)]
        np.testing.assert_equal([vmin, vmax], np.float32([np.fmin.reduce(sel), np.fmax.reduce(sel)]))
    np.testing.assert_array_equal(np.concatenate([s["step"][0::2], [steps[-1] + 1]])[1:] >
                                  s["step"][1::2], True)
    if not math.isnan(awkward):
        assert np.float32(awkward) in s["global_norm"]  # the spike survives

    ln = store.layer_norms("ds", max_points=40)
    assert ln["norm"].shape[1] == L and 2 < ln["norm"].shape[0] <= 40
    norms, maxabs = rows[:, G:G + L], rows[:, G + L:G + 2 * L]
    for i, (lo, hi) in enumerate(zip(ln["step"], ln["step_hi"])):
        m = (steps >= lo) & (steps <= hi)
        np.testing.assert_array_equal(ln["norm"][i], np.fmax.reduce(norms[m], 0))
        np.testing.assert_array_equal(ln["norm_min"][i], np.fmin.reduce(norms[m], 0))
        np.testing.assert_array_equal(ln["max_abs"][i], np.fmax.reduce(maxabs[m], 0))
        np.testing.assert_array_equal(ln["nonfinite"][i], (~np.isfinite(maxabs[m])).sum(0))
    assert ln["nonfinite"].sum() == (0 if math.isfinite(awkward) else 1)
    summary = store.layer_summary("ds")
    assert summary[3]["nonfinite"] == (0 if math.isfinite(awkward) else 1)
    assert summary[0]["max"] == pytest.approx(float(norms[:, 0].max()))
    assert summary[0]["latest"] == pytest.approx(float(norms[-1, 0]))


def test_range_query_is_raw_and_exact(tmp_path):
    rng = np.random.default_rng(2)
    rec = open_recorder(tmp_path, run_name="r", layers=_layers(3))
    steps = np.arange(3000)
    rows = _rows(steps, 3, rng)
    rec.write_steps(steps, rows, GLOBAL_COLS)
    rec.close()
    s = RunStore(tmp_path).steps("r", start=1000, end=1100, max_points=500)
    np.testing.assert_array_equal(s["step"], np.arange(1000, 1101))
    np.testing.assert_array_equal(s["loss"], rows[1000:1101, 2])
    full = RunStore(tmp_path).steps("r", max_points=500)
    assert len(full["step"]) <= 500 and full["step"][0] == 0 and full["step"][-1] == 2999


def test_reader_while_writer_writes(tmp_path):
    rng = np.random.default_rng(3)
    L = 20
    rec = open_recorder(tmp_path, run_name="live", layers=_layers(L))
    store = RunStore(tmp_path)
    done = threading.Event()

    def train():
        for a in range(0, 4000, 8):
            st = np.arange(a, a + 8)
            rec.write_steps(st, _rows(st, L, rng), GLOBAL_COLS)
        rec.close()
        done.set()

    t = threading.Thread(target=train)
    t.start()
    seen, statuses = [], set()
    while not done.is_set() or len(seen) < 2:
        if not (tmp_path / "live" / DB_NAME).exists():
            continue  # the store appears, complete, with the first flush
        # The status is read first: 'finished' is committed after the last row, so a reader that
        # sees it must then see every row (reading it after the rows would race the writer).
        status = store.info("live")["status"]
        s = store.steps("live")
        n = len(s["step"])
        np.testing.assert_array_equal(s["step"], np.arange(n))      # committed prefix, never torn
        assert status == "running" or n == 4000
        ds = store.layer_norms("live", max_points=30)
        assert ds["norm"].shape[1] == L
        statuses.add(status)
        seen.append(n)
        if done.is_set():
            break
    t.join()
    assert seen == sorted(seen)
    assert len(store.steps("live")["step"]) == 4000
    assert store.info("live")["status"] == "finished"
    assert "running" in statuses or seen[0] == 4000


def test_run_names_unique_and_validated(tmp_path):
    a = open_recorder(tmp_path, run_name="x", layers=_layers(1))
    b = open_recorder(tmp_path, run_name="x", layers=_layers(1))
    c = open_recorder(tmp_path, layers=_layers(1))
    d = open_recorder(tmp_path, layers=_layers(1))
    assert a.run_name == "x" and b.run_name == "x-2" and c.run_name != d.run_name
    for r in (a, b, c, d):
        r.close()
    assert {r["name"] for r in RunStore(tmp_path).runs()} == {"x", "x-2", c.run_name, d.run_name}
    for bad in ["../x", "a/b", "", ".", "..", "x" * 200, "<script>", 3]:
        with pytest.raises(ValueError, match="run_name"):
            open_recorder(tmp_path, run_name=bad, layers=_layers(1))
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="log_dir"):
        open_recorder(tmp_path / "afile", layers=_layers(1))


@pytest.mark.parametrize("name", ["..", "../x", "/etc/passwd", "x/../../y", "nope", "", "..%2F", None])
def test_unknown_or_traversal_names_not_found(tmp_path, name):
    (tmp_path / "logs").mkdir()
    (tmp_path / DB_NAME).write_bytes(b"")          # a store just outside the log dir
    rec = open_recorder(tmp_path / "logs", run_name="ok", layers=_layers(1))
    rec.close()
    store = RunStore(tmp_path / "logs")
    with pytest.raises(RunNotFound):
        store.steps(name)
    assert store.layers("ok")[0]["name"] == "layer0"


def test_newer_schema_is_refused(tmp_path):
    rec = open_recorder(tmp_path, run_name="new", layers=_layers(1))
    rec.close()
    con = sqlite3.connect(tmp_path / "new" / DB_NAME)
    con.execute("PRAGMA user_version=99")
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="schema v99.*upgrade"):
        RunStore(tmp_path).steps("new")
    # listings show it with its error rather than fail or hide it (issue 19, item 13)
    (run,) = RunStore(tmp_path).runs()
    assert run["status"] == "unreadable" and "upgrade" in run["error"]


class _BrokenSink:
    name = "broken"

    def __init__(self):
        self.events = 0

    def write_steps(self, steps, rows, cols):
        raise OSError("disk full")

    def write_events(self, events):
        self.events += len(events)


def test_failing_sink_and_bad_rows_never_raise(tmp_path, caplog):
    sink = _BrokenSink()
    rec = open_recorder(tmp_path, run_name="f", layers=_layers(2), sinks=[sink])
    with caplog.at_level(logging.WARNING, logger="gradguard.record"):
        for i in range(5):
            rec.write_steps([i], np.ones((1, G + 6), np.float32), GLOBAL_COLS)
        rec.write_steps([9], np.ones((1, 3), np.float32), GLOBAL_COLS)     # wrong width: store fails
        rec.write_steps([1, 2], np.ones((1, G + 6), np.float32), GLOBAL_COLS)  # wrong rows: rejected
        rec.write_events([gg.Event(3, "spike", "warning", ["layer1"], "m")])
        rec.close()
    assert rec.failures["broken"] >= 1 and rec.failures["store"] == 1 and rec.failures["recorder"] == 1
    assert sum("broken failed" in r.message for r in caplog.records) == 1   # warned once
    assert sink.events == 1
    store = RunStore(tmp_path)
    np.testing.assert_array_equal(store.steps("f")["step"], np.arange(5))
    assert store.events("f")[0].layers == ["layer1"]


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"bare {token} in stored JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("value, text", [(math.nan, "NaN"), (math.inf, "Inf"), (-math.inf, "-Inf"),
                                         (np.float32(np.nan), "NaN"), (1e-300, 1e-300)])
def test_non_finite_json_is_strict_on_disk_and_old_bare_tokens_still_read(tmp_path, value, text):
    rec = open_recorder(tmp_path, run_name="j", layers=_layers(1), config={"clip": {"max_norm": value}})
    rec.write_events([gg.Event(3, "spike", "warning", ["layer0"], "m", [], {"x": value, "xs": [value, 1.0]})])
    rec.close()
    db = tmp_path / "j" / DB_NAME
    con = sqlite3.connect(db)
    (data,) = con.execute("SELECT data FROM events").fetchone()
    (config,) = con.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
    assert _strict(data) == {"x": text, "xs": [text, 1.0]}       # valid JSON, sign and kind kept
    assert _strict(config) == {"clip": {"max_norm": text}}
    store = RunStore(tmp_path)
    assert store.events("j")[0].data == {"x": text, "xs": [text, 1.0]}
    assert store.info("j")["config"] == {"clip": {"max_norm": text}}
    # a store written before the shared convention: bare NaN / Infinity tokens
    old = json.dumps({"x": float(value), "xs": [float(value), 1.0]})
    con.execute("UPDATE events SET data = ?", (old,))
    con.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps({"clip": {"max_norm": float(value)}}),))
    con.commit()
    con.close()
    assert store.events("j")[0].data == {"x": text, "xs": [text, 1.0]}
    assert store.info("j")["config"] == {"clip": {"max_norm": text}}


@pytest.mark.parametrize("bad, err", [(1, ValueError), (-5, ValueError), (2.5, TypeError), (True, TypeError),
                                      ("10", TypeError)])
def test_bad_max_points_is_named(tmp_path, bad, err):
    rec = open_recorder(tmp_path, run_name="mp", layers=_layers(1))
    rec.close()
    with pytest.raises(err, match="max_points"):
        RunStore(tmp_path).steps("mp", max_points=bad)


def test_a_v1_store_is_read_and_upgraded_when_a_run_resumes_into_it(tmp_path):
    """Stores written before rows held parameter norms (schema v1: no ``pnorms`` column) read as
    before; resuming a run into one upgrades it in place and keeps its rows bit for bit."""
    from gradguard.record.schema import DB_NAME, SCHEMA_VERSION

    rng = np.random.default_rng(0)
    steps = np.arange(300)
    rows = _rows(steps, 2, rng)
    rec = open_recorder(tmp_path, run_name="old", layers=_layers(2))
    rec.write_steps(steps, rows, GLOBAL_COLS)
    rec.close()
    con = sqlite3.connect(tmp_path / "old" / DB_NAME)  # what a v1 writer left
    con.executescript("ALTER TABLE chunks DROP COLUMN pidx; ALTER TABLE chunks DROP COLUMN pnorms; "
                      "ALTER TABLE chunks DROP COLUMN bnorms; DELETE FROM meta WHERE key='buffers'; "
                      "PRAGMA user_version=1; "
                      "UPDATE meta SET value='1' WHERE key='schema_version';")
    con.close()
    store = RunStore(tmp_path)
    before = store.steps("old"), store.layer_norms("old")
    assert store.param_norms("old")["step"].size == 0 and store.param_norms("old")["norm"].shape == (0, 2)
    assert all(math.isnan(l["weight"]) and math.isnan(l["weight_growth"]) for l in store.layer_summary("old"))

    rec = open_recorder(tmp_path, run_name="old", layers=_layers(2))
    assert rec.resume("old", 200)  # rows from 200 on were written after the checkpoint
    rec.write_steps(steps[200:], rows[200:], GLOBAL_COLS)
    rec.close()
    con = sqlite3.connect(tmp_path / "old" / DB_NAME)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.close()
    after = store.steps("old"), store.layer_norms("old")
    for b, a in zip(before, after):
        assert b.keys() == a.keys()
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    pn = store.param_norms("old")  # only the rows written since the upgrade have them
    assert pn["step"].tolist() == list(range(200, 300))
    np.testing.assert_array_equal(pn["norm"], rows[200:, G + 4:])


@pytest.mark.parametrize("L", [0, 1, 5])
def test_parameter_norms_are_stored_sparsely_and_bit_for_bit(L):
    """Only rows that measured parameter norms are stored; unpacking gives every row back bit for
    bit, with -0.0, +-inf, -NaN and NaN payloads (a NaN weight's norm) kept."""
    from gradguard.record.schema import pack_pnorms, unpack_pnorms

    rng = np.random.default_rng(L)
    block = np.full((40, L), np.nan, np.float32)
    block[::10] = rng.lognormal(0, 1, (4, L))
    if L:
        awkward = np.array([0x80000000, 0x7F800000, 0xFF800000, 0xFFC00000, 0x7FC00001], np.uint32)
        block[3, :] = awkward[np.arange(L) % 5].view(np.float32)
        block[7, 0] = awkward[3].view(np.float32)  # one -NaN: kept
    pidx, blob = pack_pnorms(block)
    want = [0, 3, 7, 10, 20, 30] if L else []
    assert np.frombuffer(pidx, np.int32).tolist() == want
    assert len(blob) == 4 * L * len(want)
    np.testing.assert_array_equal(unpack_pnorms(pidx, blob, 40, L).view(np.uint32), block.view(np.uint32))
    assert np.isnan(unpack_pnorms(None, None, 3, L)).all()  # a v1 chunk
