"""Faults: a training process killed while logging, a full disk, a read-only log dir.

Promises (docs/reliability.md):
- SIGKILL at any moment leaves a store that opens, passes ``PRAGMA
  integrity_check``, and holds every step committed before the kill, in order,
  without gaps; the run shows as ``interrupted``.
- A log dir that fills up or turns read-only never stops training: skipping
  and clipping go on, the failure is reported once (one log warning) and
  counted in ``recorder.failures``.

``GRADGUARD_KILL_REPEATS`` sets how many kills the SIGKILL test does (default
5); ``scripts/kill_test.py`` runs it 50 times.
"""
from functools import partial
import logging
import math
import multiprocessing as mp
import os
from pathlib import Path
import random
import signal
import sqlite3
import subprocess
import time

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.record import RunStore

from _helpers import mlp

REPEATS = int(os.environ.get("GRADGUARD_KILL_REPEATS", "5"))
DB = "gradguard.sqlite"


_model = partial(mlp, 8, 32, 4)


def _train(model, opt, guard, n, start=0, nan_every=7):
    for i in range(start, start + n):
        opt.zero_grad()
        x = torch.randn(4, 8)
        loss = model(x).pow(2).mean()
        loss.backward()
        if nan_every and i % nan_every == 3:
            model[0].weight.grad[0, 0] = math.nan
        report = guard.step(loss=loss)
        assert report.skipped == bool(nan_every and i % nan_every == 3)


# ------------------------------------------------------------------ SIGKILL
def _child(log_dir: str, progress: str, flush_every: int) -> None:
    """Trains forever; after each confirmed commit, appends the last step to ``progress``."""
    torch.set_num_threads(1)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, log_dir=log_dir, run_name="k", flush_every=flush_every)
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    i = 0
    while True:
        _train(model, opt, guard, 1, start=i)
        i += 1
        if i % 3 == 0:
            guard.flush()
            guard.recorder.flush()  # returns once the writer thread has committed
            os.write(fd, f"{i - 1}\n".encode())  # survives SIGKILL (page cache)


def _check_store(log_dir: Path, committed: int | None) -> int:
    """The store after a kill: integrity, contiguous steps, readable everywhere."""
    dbs = list(log_dir.glob(f"*/{DB}"))
    for db in dbs:
        con = sqlite3.connect(db)  # read-write: replays the WAL like any later reader
        try:
            assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)], db
        finally:
            con.close()
    store = RunStore(log_dir)
    runs = store.runs()  # never raises, even for a store killed while being created
    if committed is not None:  # a commit was confirmed: the run must be there and hold it
        assert [r["name"] for r in runs] == ["k"]
    if not runs:
        return -1
    info = runs[0]
    assert info["status"] == "interrupted", info["status"]
    s = store.steps("k")
    steps = s["step"].tolist()
    assert steps == list(range(len(steps))), "committed steps are a gap-free prefix"
    assert info["rows"] == len(steps)
    if committed is not None:
        assert len(steps) - 1 >= committed, (len(steps), committed)
    # every committed step reads back the same through every query
    assert np.array_equal(s["skipped"] > 0, np.array([i % 7 == 3 for i in steps]))
    h = store.layer_norms("k")
    assert h["norm"].shape == (len(steps), len(store.layers("k")))
    # Events go in their own transaction (see test_rows_and_their_events_commit_together):
    # a kill between the two may lose the last flush's events, never a confirmed one.
    ev_steps = sorted(e.step for e in store.events("k") if e.kind == "nonfinite")
    assert set(ev_steps) <= {i for i in steps if i % 7 == 3}
    if committed is not None:
        assert [i for i in ev_steps if i <= committed] == [i for i in steps if i % 7 == 3 and i <= committed]
    store.layer_summary("k")
    return len(steps)


def run_kills(base: Path, repeats: int, seed: int = 0) -> list[int]:
    """Start a logging training process and SIGKILL it at a random moment, ``repeats`` times."""
    ctx = mp.get_context("fork")  # the child inherits the imported torch: no 2 s start-up per kill
    rng = random.Random(seed)
    rows = []
    for r in range(repeats):
        log_dir, progress = base / f"kill{r}", base / f"progress{r}"
        p = ctx.Process(target=_child, args=(str(log_dir), str(progress), rng.choice([1, 2, 5])),
                        daemon=True)
        p.start()
        # A random moment: one kill in six while the process starts / creates the
        # store, the others after a random number of commits, at a random offset.
        if rng.random() < 1 / 6:
            time.sleep(rng.uniform(0, 0.3))
        else:
            want, deadline = rng.randint(1, 15), time.monotonic() + 20
            while time.monotonic() < deadline and p.is_alive() and (
                    not progress.exists() or progress.read_text().count("\n") < want):
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.01))
        assert p.is_alive(), "the training process died by itself"
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
        lines = progress.read_text().split() if progress.exists() else []
        rows.append(_check_store(log_dir, int(lines[-1]) if lines else None))
    return rows


def test_sigkill_while_logging(tmp_path):
    rows = run_kills(tmp_path, REPEATS, seed=int(os.environ.get("GRADGUARD_KILL_SEED", "0")))
    assert len(rows) == REPEATS
    assert max(rows) > 0  # at least one kill hit a run that had committed steps


class _Tx:
    """Wraps the writer's sqlite connection and records the statements of each transaction."""

    def __init__(self, con):
        self._con, self.txs, self._cur = con, [], None

    def execute(self, sql, *args):
        word = sql.strip().split()[0].upper()
        if word == "BEGIN":
            self._cur = []
        elif word in ("COMMIT", "ROLLBACK") and self._cur is not None:
            self.txs.append(self._cur)
            self._cur = None
        elif self._cur is not None:
            self._cur.append(sql)
        return self._con.execute(sql, *args)

    def executemany(self, sql, *args):
        if self._cur is not None:
            self._cur.append(sql)
        return self._con.executemany(sql, *args)

    def __getattr__(self, name):
        return getattr(self._con, name)


def test_rows_and_their_events_commit_together(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, log_dir=tmp_path, run_name="r")
    _train(model, opt, guard, 2)
    guard.recorder.flush()
    guard.recorder._store.ensure()  # the store is published with the first flush; this one is pending
    tx = _Tx(guard.recorder._store.con)
    guard.recorder._store.con = tx
    _train(model, opt, guard, 2, start=2)  # step 3 is poisoned: a row and an event
    guard.recorder.flush()
    guard.close()
    (both,) = [t for t in tx.txs if any("INTO events" in q for q in t)]
    assert any("INTO chunks" in q for q in both)


# ------------------------------------------------------------ helpers: filesystems
def _mount(path: Path, opts: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 8 MB filesystem (tmpfs; needs root and mount permission, else skipped)."""
    mnt = tmp_path / "fs"
    if not _mount(mnt, "size=8m"):
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
    yield mnt
    _umount(mnt)


def _fill(path: Path) -> Path:
    filler = path / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def _store_warnings(caplog):
    return [r for r in caplog.records if r.name.startswith("gradguard") and r.levelno >= logging.WARNING]


# ------------------------------------------------------------------ full disk
def test_full_disk_training_continues_reported_once(tiny_fs, caplog):
    caplog.set_level(logging.WARNING)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, log_dir=tiny_fs / "log", run_name="r")
    _train(model, opt, guard, 3)
    guard.flush()  # rows 0-2 to the recorder (the CPU flush interval is longer)
    guard.recorder.flush()
    filler = _fill(tiny_fs)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, guard, 20, start=3)  # skips still happen (steps 3, 10, 17)
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # still training
    guard.recorder.flush()
    assert guard.recorder.failures.get("store", 0) >= 1
    assert len(_store_warnings(caplog)) == 1  # reported once, whatever the number of failures
    assert guard.skipped_steps == 3
    filler.unlink()
    guard.close()
    con = sqlite3.connect(tiny_fs / "log" / "r" / DB)
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    con.close()
    steps = RunStore(tiny_fs / "log").steps("r")["step"].tolist()
    assert steps[:3] == [0, 1, 2] and steps == sorted(set(steps))


def test_full_disk_warning_names_the_cause(tiny_fs, caplog):
    caplog.set_level(logging.WARNING)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, log_dir=tiny_fs / "log", run_name="r")
    _train(model, opt, guard, 2, nan_every=0)
    guard.flush()
    guard.recorder.flush()
    filler = _fill(tiny_fs)
    _train(model, opt, guard, 5, start=2, nan_every=0)
    guard.flush()
    guard.recorder.flush()
    filler.unlink()
    guard.close()
    (warning,) = _store_warnings(caplog)
    assert "disk is full" in warning.getMessage()


class _FailingCommits:
    """Wraps the writer's sqlite connection: COMMIT fails while ``on`` (disk full)."""

    def __init__(self, con, message="database or disk is full"):
        self._con, self.on, self.failed, self.message = con, False, 0, message

    def execute(self, sql, *args):
        if self.on and sql.strip().upper() == "COMMIT":
            self.failed += 1
            raise sqlite3.OperationalError(self.message)
        return self._con.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._con, name)


def _failing_store(guard, message="database or disk is full"):
    store = guard.recorder._store
    guard.recorder.flush()
    store.ensure()  # published with the first flush, which may not have come yet
    proxy = _FailingCommits(store.con, message)
    store.con = proxy
    return proxy


@pytest.mark.parametrize("message", ["database or disk is full", "attempt to write a readonly database"])
def test_store_write_failure_reported_once_and_recovers(tmp_path, caplog, message):
    """COMMIT failing as on a full disk, or a log dir turned read-only mid-run (a
    remount is refused while the store is open, so both are simulated here)."""
    caplog.set_level(logging.WARNING)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, log_dir=tmp_path, run_name="r")
    _train(model, opt, guard, 4)
    proxy = _failing_store(guard, message)
    proxy.on = True
    _train(model, opt, guard, 10, start=4)
    guard.recorder.flush()
    assert proxy.failed >= 1 and guard.recorder.failures["store"] == proxy.failed
    warnings_ = _store_warnings(caplog)
    assert len(warnings_) == 1 and message in warnings_[0].getMessage()
    proxy.on = False  # space freed: the store takes the next rows again
    _train(model, opt, guard, 6, start=14)
    guard.close()
    steps = RunStore(tmp_path).steps("r")["step"].tolist()
    assert steps[:4] == [0, 1, 2, 3] and steps[-6:] == list(range(14, 20))
    assert len(_store_warnings(caplog)) == 1


def test_failed_commit_leaves_no_phantom_rows(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, log_dir=tmp_path, run_name="r")
    _train(model, opt, guard, 4, nan_every=0)
    guard.flush()  # steps 0-3 reach the store before its commits start failing
    proxy = _failing_store(guard)
    proxy.on = True
    _train(model, opt, guard, 5, start=4, nan_every=0)
    guard.flush()  # hand the buffered rows to the store (5 steps stay under the flush interval)
    guard.recorder.flush()
    assert proxy.failed >= 1  # the premise: a commit of those rows did fail
    proxy.on = False
    _train(model, opt, guard, 3, start=9, nan_every=0)
    guard.close()
    store = RunStore(tmp_path)
    steps = store.steps("r")["step"]
    assert store.info("r")["rows"] == len(steps)
    # the failed batch (steps 4-8) is dropped whole and counted: no phantom row count
    assert steps.tolist() == [0, 1, 2, 3, 9, 10, 11]
    # the pyramid agrees with the raw rows: the downsampled view counts the same steps
    down = store.steps("r", max_points=2)
    assert down["step"].min() == steps.min() and down["step"].max() == steps.max()
    con = sqlite3.connect(tmp_path / "r" / DB)
    (n_summary,) = con.execute("SELECT sum(n) FROM summary WHERE level = 1").fetchone()
    con.close()
    assert n_summary == len(steps)


# ------------------------------------------------------------------ read-only
@pytest.mark.parametrize("opts", ["ro,size=1m", "size=64k"], ids=["read_only", "full"])
def test_unwritable_log_dir_at_start_warns_and_trains(tmp_path, opts):
    mnt = tmp_path / "fs"
    if not _mount(mnt, opts):
        pytest.skip("cannot mount a tmpfs here")
    try:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with pytest.warns(RuntimeWarning, match="log_dir"):
            guard = gg.Guard(model, opt, log_dir=mnt / "log")
        _train(model, opt, guard, 5)
        assert guard.skipped_steps == 1
        guard.close()
    finally:
        _umount(mnt)
