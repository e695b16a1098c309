"""Issue 19, store side: nothing lost, nothing overwritten, nothing executed, nothing stuck.

Each test reproduces one attack of the adversarial trial (item numbers of the issue) against
real SQLite files, real processes (SIGKILL, uncaught exceptions) and the real HTTP app.
"""
from __future__ import annotations

import copy
from functools import partial
import gc
import logging
import os
from pathlib import Path
import shutil
import signal
import sqlite3
import subprocess
import textwrap
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import cli
from gradguard.layout import GLOBAL_COLS
from gradguard.record import RunStore, RunUnreadable, open_recorder
from gradguard.record import writer as W
from gradguard.record.schema import DB_NAME, LOCK_NAME

from _helpers import mlp

G = len(GLOBAL_COLS)
SRC = str(Path(gg.__file__).resolve().parents[1])


def _layers(n=2):
    return [{"name": f"l{i}", "shape": [2], "order": i} for i in range(n)]


def _rows(steps, L=2):
    steps = np.asarray(steps)
    rows = np.ones((len(steps), G + 3 * L), np.float32)
    rows[:, 0] = steps  # column 0 carries the step: duplicates and reordering are visible
    return rows


def _write(rec, steps, L=2):
    rec.write_steps(np.asarray(steps), _rows(steps, L), GLOBAL_COLS)


_model = partial(mlp, 4, 8, 1)


def _train(model, opt, guard, a, b):
    for i in range(a, b):
        opt.zero_grad()
        loss = model(torch.randn(4, 4)).pow(2).mean()
        loss.backward()
        guard.step(loss=loss)


def _py(fresh_python, code: str, *args, check=True) -> subprocess.CompletedProcess:
    """``python -c code args...`` in a fresh interpreter: a writer killed or exiting there is a
    process of its own (forked from one that imported torch only; tests/test_zygote.py)."""
    r = fresh_python.run(textwrap.dedent(code), env=dict(os.environ, PYTHONPATH=SRC), argv=args)
    if check:
        assert r.returncode in (0, 1, -9), r.stderr
    return r


# --------------------------------------------------------------- 1. overwrite
def test_checkpoint_into_a_new_run_name_branches_and_leaves_the_old_run_alone(tmp_path):
    model, = [_model()]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, log_dir=tmp_path, run_name="base", flush_every=4)
    _train(model, opt, guard, 0, 10)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "guard": guard.state_dict()})
    _train(model, opt, guard, 10, 20)
    guard.close()

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sweep = gg.Guard(model, opt, log_dir=tmp_path, run_name="sweep", flush_every=4)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sweep.load_state_dict(ckpt["guard"])
    _train(model, opt, sweep, 10, 16)
    sweep.close()

    store = RunStore(tmp_path)
    assert sorted(r["name"] for r in store.runs()) == ["base", "sweep"]
    base = store.info("base")
    assert base["status"] == "finished" and store.steps("base")["step"].tolist() == list(range(20))
    info = store.info("sweep")
    # steps 8 and 9 were still waiting for their flush in the checkpoint: the branch holds them
    assert info["parent"] == {"run": "base", "step": 8}
    assert store.steps("sweep")["step"].tolist() == list(range(8, 16))


def test_a_run_with_a_live_writer_is_never_taken_over(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first = gg.Guard(model, opt, log_dir=tmp_path, run_name="r", flush_every=4)
    _train(model, opt, first, 0, 8)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "guard": first.state_dict()})

    m2 = _model()
    o2 = torch.optim.SGD(m2.parameters(), lr=0.01)
    second = gg.Guard(m2, o2, log_dir=tmp_path, run_name="r", flush_every=4)  # same name: "r-2"
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    second.load_state_dict(ckpt["guard"])
    assert second.recorder.run_name == "r-2"
    assert any("live writer" in r.getMessage() for r in caplog.records)
    # both keep training: the first writer's run stays its own, no step stored twice
    _train(model, opt, first, 8, 20)
    _train(m2, o2, second, 8, 14)
    first.close()
    second.close()
    store = RunStore(tmp_path)
    s = store.steps("r")
    assert s["step"].tolist() == list(range(20)) and store.info("r")["rows"] == 20
    assert store.steps("r-2")["step"].tolist() == list(range(8, 14))
    assert store.info("r-2")["parent"] == {"run": "r", "step": 8}


def test_resume_of_a_closed_run_still_continues_it(tmp_path):
    rec = open_recorder(tmp_path, run_name="r", layers=_layers())
    _write(rec, range(10))
    rec.close()
    again = open_recorder(tmp_path, run_name="r", layers=_layers())
    assert again.run_name == "r-2"
    assert again.resume("r", 6) is True and again.run_name == "r"
    _write(again, range(6, 9))
    again.close()
    store = RunStore(tmp_path)
    assert [r["name"] for r in store.runs()] == ["r"]  # the reserved r-2 left nothing behind
    assert store.steps("r")["step"].tolist() == list(range(9))
    assert store.info("r")["status"] == "finished"


# ----------------------------------------------------------- 2. crash, exit
_CRASH = """
import sys, numpy as np
from gradguard.record import open_recorder
from gradguard.layout import GLOBAL_COLS
G = len(GLOBAL_COLS)
def rows(s):
    r = np.ones((len(s), G + 6), np.float32); r[:, 0] = s; return r
class Owner:  # stands in for the guard: rows 90..99 still in its buffer
    pass
owner = Owner()
rec = open_recorder(sys.argv[1], run_name="c", layers=[{"name": "a"}, {"name": "b"}])
rec.attach(owner, pending=lambda: (np.arange(90, 100), rows(np.arange(90, 100)), GLOBAL_COLS))
rec.write_steps(np.arange(90), rows(np.arange(90)), GLOBAL_COLS)
if sys.argv[2] == "raise":
    raise RuntimeError("boom at step 100")
"""


@pytest.mark.parametrize("how, status", [("raise", "failed"), ("exit", "finished")])
def test_exit_without_close_hands_over_pending_rows_and_tells_how_it_ended(tmp_path, how, status, fresh_python):
    r = _py(fresh_python, _CRASH, tmp_path, how)
    assert ("boom" in r.stderr) == (how == "raise")
    info = RunStore(tmp_path).info("c")
    assert info["status"] == status and info["rows"] == 100
    assert RunStore(tmp_path).steps("c")["step"].tolist() == list(range(100))
    if how == "raise":
        assert "RuntimeError: boom at step 100" in info["error"]


def test_guard_crash_at_step_58_keeps_every_row_and_reads_failed(tmp_path, fresh_python):
    # The guard-side wiring the lead adds in Guard.__init__ (see docs/reliability.md).
    code = """
    import sys, torch
    import gradguard as gg
    from gradguard.layout import GLOBAL_COLS
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, log_dir=sys.argv[1], run_name="g", flush_every=16)
    b = guard._buffer
    guard.recorder.attach(guard, pending=lambda: (list(b._steps), b.pending(), GLOBAL_COLS))
    for i in range(100):
        opt.zero_grad()
        loss = model(torch.randn(2, 3)).pow(2).mean()
        loss.backward()
        guard.step(loss=loss)
        if i == 57:
            raise ValueError("data loader died")
    """
    _py(fresh_python, code, tmp_path)
    info = RunStore(tmp_path).info("g")
    assert info["status"] == "failed" and "data loader died" in info["error"]
    assert RunStore(tmp_path).steps("g")["step"].tolist() == list(range(58))


def test_collected_owner_closes_and_hands_over(tmp_path):
    class Owner:
        pass

    owner = Owner()
    rec = open_recorder(tmp_path, run_name="o", layers=_layers())
    rec.attach(owner, pending=lambda: (np.arange(5, 8), _rows(np.arange(5, 8)), GLOBAL_COLS))
    _write(rec, range(5))
    del owner
    gc.collect()
    assert rec._done
    assert RunStore(tmp_path).steps("o")["step"].tolist() == list(range(8))
    assert RunStore(tmp_path).info("o")["status"] == "finished"


@pytest.mark.parametrize("status", ["failed", "interrupted"])
def test_close_records_how_the_run_ended(tmp_path, status):
    rec = open_recorder(tmp_path, run_name="e", layers=_layers())
    _write(rec, range(3))
    rec.close(status=status, error=RuntimeError("why"))
    info = RunStore(tmp_path).info("e")
    assert info["status"] == status and info["error"] == "RuntimeError: why"
    with pytest.raises(ValueError, match="status"):
        open_recorder(tmp_path, layers=_layers()).close(status="done")


# ------------------------------------------------------------ 3. replay pickle
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def make_model():  # --factory target
    return nn.Sequential(nn.Linear(4, 1)), None


@pytest.mark.parametrize("where", ["file", "model_pickle", "loss_fn"])
@pytest.mark.parametrize("factory", [False, True])
def test_crafted_dump_runs_no_code(tmp_path, capsys, where, factory):
    marker = tmp_path / "pwned"
    model, _ = make_model()
    dump = {"version": 1, "step": 0, "batch": torch.randn(2, 4), "model": model.state_dict(),
            "model_pickle": None, "loss_fn": None}
    if where == "file":
        dump["evil"] = _Evil(marker)
    else:
        import io

        buf = io.BytesIO()
        torch.save(_Evil(marker), buf)
        dump[where] = buf.getvalue()
    path = tmp_path / "flight-00000000-nonfinite.pt"
    torch.save(dump, path)
    argv = ["replay", str(path)] + (["--factory", f"{__name__}:make_model"] if factory else [])
    if factory and where != "file":
        assert cli.main(argv) == 0  # the weights and the batch are all it needs
    else:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "--trust-pickle" in err or "--factory" in err
    assert not marker.exists()
    # the explicit opt-in does what it says
    if not factory and where != "loss_fn":
        cli.main(argv + ["--trust-pickle"])
        assert marker.exists()


def test_replay_help_says_why(capsys):
    with pytest.raises(SystemExit):
        cli.main(["replay", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--trust-pickle" in out and "arbitrary code" in out and "weights_only=True" in out


# ----------------------------------------------------------- 5. remote bind
def test_binding_beyond_loopback_needs_allow_remote(tmp_path, capsys, monkeypatch):
    from gradguard.dashboard import server

    assert cli.main(["dashboard", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    served = {}
    monkeypatch.setattr(server, "serve", lambda *a, **k: served.update(k))
    assert cli.main(["dashboard", str(tmp_path), "--host", "0.0.0.0", "--allow-remote",
                     "--allowed-host", "gpu7.lab"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "authentication" in err and "gpu7.lab" in err
    assert served["host"] == "0.0.0.0" and served["allowed_hosts"] == ["gpu7.lab"]


def test_remote_bind_keeps_a_host_allow_list(tmp_path):
    from starlette.testclient import TestClient

    from gradguard.dashboard.server import allowed_hosts_for, create_app

    hosts = allowed_hosts_for("0.0.0.0", ["gpu7.lab"])
    assert "localhost" in hosts and "gpu7.lab" in hosts and "evil.example" not in hosts
    c = TestClient(create_app(tmp_path, hosts))
    assert c.get("/api/runs", headers={"Host": "evil.example"}).status_code == 400
    assert c.get("/api/runs", headers={"Host": "gpu7.lab:6060"}).status_code == 200


# ----------------------------------------------------------- 6. liveness
def _set_meta(db, **kv):
    con = sqlite3.connect(db)
    con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in kv.items()])
    con.commit()
    con.close()


def test_liveness_comes_from_the_heartbeat_and_the_lock_not_the_pid(tmp_path):
    import socket

    rec = open_recorder(tmp_path, run_name="h", layers=_layers())
    _write(rec, range(3))
    rec.flush()
    store = RunStore(tmp_path)
    assert store.info("h")["status"] == "running"
    # writer alive (lock held) but silent for minutes: hung, or its clock/disk stopped
    _set_meta(tmp_path / "h" / DB_NAME, updated_time=time.time() - 600)
    assert store.info("h")["status"] == "stale"
    rec.close()
    # a store of pid 1 in a container (alive from here), no lock file, last update long ago
    _set_meta(tmp_path / "h" / DB_NAME, status="running", pid=1, host=socket.gethostname(),
              updated_time=time.time() - 600)
    (tmp_path / "h" / LOCK_NAME).unlink()
    assert store.info("h")["status"] == "stale"
    # same, but the lock file is there and nobody holds it: the writer is gone
    (tmp_path / "h" / LOCK_NAME).touch()
    assert store.info("h")["status"] == "interrupted"


def test_idle_writer_keeps_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "HEARTBEAT_SECONDS", 0.05)
    rec = open_recorder(tmp_path, run_name="idle", layers=_layers())
    _write(rec, [0])
    rec.flush()
    db = tmp_path / "idle" / DB_NAME
    _set_meta(db, updated_time=1.0)
    for _ in range(400):  # the writer thread refreshes it with no rows coming
        if RunStore(tmp_path).info("idle")["updated_time"] > 1.0:
            break
        time.sleep(0.02)
    assert RunStore(tmp_path).info("idle")["updated_time"] > 1.0
    rec.close()


def test_kill_before_the_first_flush_leaves_no_run_and_no_name_taken(tmp_path, fresh_python):
    code = """
    import os, signal, sys
    from gradguard.record import open_recorder
    rec = open_recorder(sys.argv[1], run_name="k", layers=[{"name": "a"}])
    os.kill(os.getpid(), signal.SIGKILL)
    """
    r = _py(fresh_python, code, tmp_path)
    assert r.returncode == -signal.SIGKILL
    assert RunStore(tmp_path).runs() == []
    rec = open_recorder(tmp_path, run_name="k", layers=_layers())
    assert rec.run_name == "k"  # the abandoned reservation is taken over, not "k-2"
    rec.close()
    assert [r["status"] for r in RunStore(tmp_path).runs()] == ["finished"]


def test_failed_creation_leaves_no_directory(tmp_path, monkeypatch):
    def boom(self):
        raise OSError("disk on fire")

    monkeypatch.setattr(W._StoreWriter, "prepare", boom)
    with pytest.raises(OSError):
        open_recorder(tmp_path, run_name="f", layers=_layers())
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    rec = open_recorder(tmp_path, run_name="f", layers=_layers())
    assert rec.run_name == "f"
    rec.close()


def test_layer_name_with_a_lone_surrogate_is_stored_not_fatal(tmp_path):
    rec = open_recorder(tmp_path, run_name="u", layers=[{"name": "blk\udc80.w"}, {"name": "b"}])
    _write(rec, range(2))
    rec.close()
    store = RunStore(tmp_path)
    assert store.info("u")["status"] == "finished"
    assert store.layers("u")[0]["name"] == "blk\\udc80.w"


# ------------------------------------------------------------ 7. lost rows
class _FailingCommits:
    def __init__(self, con):
        self._con, self.on = con, True

    def execute(self, sql, *a):
        if self.on and sql == "COMMIT":
            self._con.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self._con.execute(sql, *a)

    def __getattr__(self, name):
        return getattr(self._con, name)


def test_lost_rows_are_counted_in_the_store_and_the_run_reads_incomplete(tmp_path):
    rec = open_recorder(tmp_path, run_name="d", layers=_layers())
    _write(rec, range(4))
    rec.flush()
    proxy = _FailingCommits(rec._store.con)
    rec._store.con = proxy
    _write(rec, range(4, 9))
    rec.flush()
    rec._store.con = proxy._con  # space freed
    _write(rec, range(9, 12))
    rec.close()
    assert rec.dropped_rows == 5
    info = RunStore(tmp_path).info("d")
    assert info["dropped_rows"] == 5 and info["status"] == "incomplete" and info["rows"] == 7


def test_rows_dropped_by_back_pressure_are_counted_too(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "MAX_PENDING_BYTES", 1)
    rec = open_recorder(tmp_path, run_name="bp", layers=_layers())
    _write(rec, range(10))
    monkeypatch.undo()
    rec.close()
    assert rec.dropped_rows == 10
    info = RunStore(tmp_path).info("bp")
    assert info["dropped_rows"] == 10 and info["status"] == "incomplete"


def test_a_deleted_run_directory_is_noticed(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    rec = open_recorder(tmp_path, run_name="gone", layers=_layers())
    _write(rec, range(4))
    rec.flush()
    shutil.rmtree(tmp_path / "gone")
    _write(rec, range(4, 10))
    rec.flush()
    assert rec.dropped_rows == 6 and rec.failures.get("store", 0) >= 1
    assert any("deleted" in r.getMessage() for r in caplog.records)
    rec.close()


# -------------------------------------------------------------- 8. hung sink
class _HungSink:
    name = "hung"

    def __init__(self):
        self.release = threading.Event()

    def write_steps(self, *a):
        self.release.wait()

    def close(self):
        self.release.wait()


def test_a_hung_sink_stalls_neither_the_store_nor_close(tmp_path):
    sink = _HungSink()
    rec = open_recorder(tmp_path, run_name="s", layers=_layers(), sinks=[sink])
    try:
        for a in range(0, 2000, 20):
            _write(rec, range(a, a + 20))
        assert rec.flush(timeout=60)
        assert RunStore(tmp_path).info("s")["rows"] == 2000
        done = threading.Thread(target=rec.close, kwargs={"timeout": 0.5})
        done.start()
        done.join(60)
        assert not done.is_alive(), "close() waited on the hung sink"
        assert rec.failures.get("hung", 0) >= 1  # abandoned, and said so
        assert RunStore(tmp_path).info("s")["status"] == "finished"
    finally:
        sink.release.set()


# ------------------------------------------------------- 10. max_points cap
def test_server_caps_max_points(tmp_path):
    from gradguard.dashboard.server import MAX_STEPS_POINTS, api_payload

    rec = open_recorder(tmp_path, run_name="big", layers=_layers())
    n = MAX_STEPS_POINTS * 2
    _write(rec, range(n))
    rec.close()
    store = RunStore(tmp_path)
    got = api_payload(store, "steps", "big", max_points=10 ** 9)
    assert len(got["step"]) <= MAX_STEPS_POINTS
    assert min(got["step"]) == 0 and max(got["step"]) == n - 1  # still the whole run
    h = api_payload(store, "heatmap", "big", max_points=10 ** 9)
    assert len(h["step"]) * 2 <= 1_000_000


# -------------------------------------------------- 11. back-pressure memory
def test_back_pressure_counts_real_memory(tmp_path):
    rec = open_recorder(tmp_path, run_name="m", layers=_layers(1))
    gate = threading.Event()
    real_write = rec._write

    def held(items, store):
        gate.wait()
        real_write(items, store)

    rec._write = held
    try:
        _write(rec, [0], L=1)
        for _ in range(2000):  # the writer holds the first batch: everything after stays queued
            if rec._busy:
                break
            time.sleep(0.005)
        assert rec._busy
        steps = [np.array([i]) for i in range(1, 3001)]
        rows = [_rows(s, 1) for s in steps]
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for s, r in zip(steps, rows):  # flush_every=1 with a tiny model
            rec.write_steps(s, r, GLOBAL_COLS)
        real = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert rec._pending_bytes >= real, (rec._pending_bytes, real)
    finally:
        gate.set()
        rec.close()
    assert RunStore(tmp_path).info("m")["rows"] == 3001


# ----------------------------------------------- 13. unreadable stores, 500s
@pytest.fixture
def hostile_log_dir(tmp_path):
    rec = open_recorder(tmp_path, run_name="good", layers=_layers())
    _write(rec, range(50))
    rec.close()
    good = (tmp_path / "good" / DB_NAME).read_bytes()
    for name, data in [("notsqlite", b"hello, not a database" * 10), ("empty", b""),
                       ("truncated", good[:1000])]:
        (tmp_path / name).mkdir()
        (tmp_path / name / DB_NAME).write_bytes(data)
    shutil.copytree(tmp_path / "good", tmp_path / "newer")
    con = sqlite3.connect(tmp_path / "newer" / DB_NAME)
    con.execute("PRAGMA user_version=99")
    con.commit()
    con.close()
    return tmp_path


BAD = ["notsqlite", "empty", "truncated", "newer"]


def test_unreadable_runs_are_listed_with_their_error(hostile_log_dir):
    runs = {r["name"]: r for r in RunStore(hostile_log_dir).runs()}
    assert set(runs) == {"good", *BAD}
    assert runs["good"]["status"] == "finished"
    for name in BAD:
        assert runs[name]["status"] == "unreadable" and runs[name]["error"], name
    assert "upgrade" in runs["newer"]["error"]


@pytest.mark.parametrize("run", BAD)
@pytest.mark.parametrize("route", ["steps", "heatmap", "layers", "events"])
def test_dashboard_answers_unreadable_runs_without_a_500(hostile_log_dir, run, route):
    from starlette.testclient import TestClient

    from gradguard.dashboard.server import create_app

    c = TestClient(create_app(hostile_log_dir), raise_server_exceptions=False)
    r = c.get(f"/api/runs/{run}/{route}")
    assert r.status_code == 409 and r.json()["error"]
    assert c.get("/api/runs").status_code == 200


@pytest.mark.parametrize("start, end", [(-10 ** 30, 10 ** 30), (2 ** 63, None), (None, -2 ** 64),
                                        (2 ** 63 - 1, 2 ** 63)])
def test_ranges_beyond_64_bit_are_clamped_not_500(hostile_log_dir, start, end):
    from starlette.testclient import TestClient

    from gradguard.dashboard.server import create_app

    c = TestClient(create_app(hostile_log_dir), raise_server_exceptions=False)
    params = {k: str(v) for k, v in (("start", start), ("end", end)) if v is not None}
    for route in ("steps", "heatmap", "events"):
        assert c.get(f"/api/runs/good/{route}", params=params).status_code == 200, route
    s = RunStore(hostile_log_dir).steps("good", start, end)
    want = [i for i in range(50) if (start is None or i >= start) and (end is None or i <= end)]
    assert s["step"].tolist() == want


# ------------------------------------------------------------- 15. report
@pytest.mark.parametrize("run", BAD)
def test_report_on_an_unreadable_store_says_so_in_one_line(hostile_log_dir, tmp_path, capsys, run):
    assert cli.main(["report", str(hostile_log_dir / run), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and run in err
    with pytest.raises(RunUnreadable):
        RunStore(hostile_log_dir).info(run)


def test_killed_resume_leaves_no_empty_run(tmp_path, fresh_python):
    rec = open_recorder(tmp_path, run_name="r", layers=_layers())
    _write(rec, range(10))
    rec.close()
    code = """
    import os, signal, sys
    from gradguard.record import open_recorder
    rec = open_recorder(sys.argv[1], run_name="r", layers=[{"name": "a"}, {"name": "b"}])
    assert rec.run_name == "r-2"
    os.kill(os.getpid(), signal.SIGKILL)  # killed between Guard() and load_state_dict()
    """
    assert _py(fresh_python, code, tmp_path).returncode == -signal.SIGKILL
    assert [r["name"] for r in RunStore(tmp_path).runs()] == ["r"]


def test_a_checkpoint_of_name_k_resumes_under_the_same_requested_name(tmp_path):
    # A script asked for "r", got "r-2" (r was taken) and checkpointed; restarted with "r",
    # it continues "r-2" rather than branching again and again.
    for _ in range(2):
        rec = open_recorder(tmp_path, run_name="r", layers=_layers())
        _write(rec, range(6))
        rec.close()
    again = open_recorder(tmp_path, run_name="r", layers=_layers())
    assert again.run_name == "r-3"
    assert again.resume("r-2", 4) is True and again.run_name == "r-2"
    again.close()
    assert sorted(r["name"] for r in RunStore(tmp_path).runs()) == ["r", "r-2"]
    assert RunStore(tmp_path).steps("r-2")["step"].tolist() == list(range(4))
    other = open_recorder(tmp_path, run_name="rr", layers=_layers())
    assert other.resume("r", 2) is False and other.parent == ("r", 2)  # "rr" is not "r-k"
    other.close()
