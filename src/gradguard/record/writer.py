"""The recorder: takes drained step rows and events, writes them on a thread.

Training calls ``write_steps`` / ``write_events`` once per flush; both only
append to an in-memory queue (never block on disk, never raise).  A
background thread drains the queue, writes the SQLite run store in one
transaction per wake-up and forwards the same data to extra sinks
(TensorBoard, ...).  A failing store or sink logs one warning, counts its
failures in ``recorder.failures`` and keeps going.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import sqlite3
import threading
import time
import weakref
from pathlib import Path

import numpy as np

from .._json import json_safe
from .schema import (DB_NAME, DDL, FACTOR_BITS, LEVELS, SCHEMA_VERSION, check_run_name,
                     level_aggregates, raw_aggregates, reduce_groups)

__all__ = ["Recorder", "open_recorder", "CHUNK_ROWS", "MAX_PENDING_BYTES"]

log = logging.getLogger("gradguard.record")
CHUNK_ROWS = 256                     # raw rows per stored chunk
MAX_PENDING_BYTES = 512 * 2 ** 20    # beyond this, rows are dropped (and counted), not queued
# The writer gathers rows for up to this long before a commit: a transaction per
# training step (every step on CPU) would cost more than the rows themselves.
# flush() and close() cut the wait short; readers poll every ~2 s anyway.
BATCH_SECONDS = 0.2
BATCH_BYTES = 8 * 2 ** 20


def _dumps(obj) -> str:
    """Strict JSON (non-finite numbers as "NaN"/"Inf"/"-Inf"); objects JSON lacks as their str."""
    return json.dumps(json_safe(obj), default=str, allow_nan=False)


def _unique_run_dir(log_dir: Path, run_name: str | None) -> tuple[str, Path]:
    """Create the run directory atomically; never reuse an existing one."""
    base = check_run_name(run_name) if run_name is not None else time.strftime("%Y%m%d-%H%M%S")
    for i in range(10_000):
        name = base if i == 0 else f"{base}-{i + 1}"
        path = log_dir / name
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return name, path
    raise RuntimeError(f"could not find a free run name starting with {base!r} in {log_dir}")


class _StoreWriter:
    """SQLite side of the recorder; used only from the writer thread."""

    def __init__(self, path: Path):
        self.path = path
        self.con: sqlite3.Connection | None = None
        self.seq = 0
        self.global_cols: tuple | None = None
        self.acc: list[tuple[int, dict] | None] = [None] * (LEVELS + 1)

    def create(self, run_name: str, layers: list[dict], config: dict) -> None:
        con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # Big pages: per-layer BLOBs are ~300 KB per chunk; 4 KB pages would chain 75 overflow pages.
        con.execute("PRAGMA page_size=65536")
        con.execute("PRAGMA journal_mode=WAL")
        # 64 MB of WAL between checkpoints: fewer, longer checkpoints (+10% rows/s vs 16 MB).
        con.execute("PRAGMA wal_autocheckpoint=1024")
        # WAL + NORMAL: a commit is not fsynced, so an OS crash or power loss may drop the last
        # commits, but never corrupts; a killed process loses nothing committed (the OS has it).
        # OFF would be ~30% faster but could corrupt the file on power loss.
        con.execute("PRAGMA synchronous=NORMAL")
        con.executescript(DDL)
        con.execute("BEGIN")
        con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        meta = {"schema_version": SCHEMA_VERSION, "run_name": run_name,
                "config": _dumps(config), "start_time": time.time(),
                "status": "running", "pid": os.getpid(), "host": socket.gethostname(),
                "updated_time": time.time(), "rows": 0}
        con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
        con.executemany("INSERT INTO layers VALUES (?, ?, ?, ?)",
                        [(i, str(l["name"]), json.dumps(list(l.get("shape", []))), int(l.get("order", i)))
                         for i, l in enumerate(layers)])
        con.execute("COMMIT")
        self.n_layers = len(layers)
        self.con = con

    def reopen(self, resume_at: int) -> None:
        """Continue an existing run from step ``resume_at``: its rows and events at or after that
        step are dropped (they were written after the checkpoint being resumed) and the min/max
        pyramid is rebuilt.  Costs one pass over the run's rows."""
        con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            con.close()
            raise ValueError(f"run store {self.path} has schema version {version}; this gradguard "
                             f"writes {SCHEMA_VERSION}")
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA wal_autocheckpoint=1024")
        con.execute("PRAGMA synchronous=NORMAL")
        self.n_layers = con.execute("SELECT count(*) FROM layers").fetchone()[0]
        gc = con.execute("SELECT value FROM meta WHERE key = 'global_cols'").fetchone()
        cols = tuple(json.loads(gc[0])) if gc else ()
        G, L = len(cols), self.n_layers
        seqs = [r[0] for r in con.execute("SELECT seq0 FROM chunks ORDER BY seq0")]
        self.seq, self.acc, self.global_cols = 0, [None] * (LEVELS + 1), None
        con.execute("BEGIN")
        try:
            con.execute("DELETE FROM summary")
            con.execute("DELETE FROM events WHERE step >= ?", (int(resume_at),))
            for seq0 in seqs:  # in order: rewritten rows never overtake unread chunks
                n, steps, glob, norms, maxabs = con.execute(
                    "SELECT n, steps, glob, norms, maxabs FROM chunks WHERE seq0 = ?", (seq0,)).fetchone()
                con.execute("DELETE FROM chunks WHERE seq0 = ?", (seq0,))
                steps = np.frombuffer(steps, np.int64)
                rows = np.concatenate([np.frombuffer(glob, np.float32).reshape(n, G),
                                       np.frombuffer(norms, np.float32).reshape(n, L),
                                       np.frombuffer(maxabs, np.float32).reshape(n, L)], axis=1)
                keep = steps < resume_at
                if keep.any():
                    self._write_rows(con, steps[keep], rows[keep], cols)
            con.execute("INSERT OR REPLACE INTO meta VALUES ('rows', ?)", (str(self.seq),))
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                            [("status", "running"), ("updated_time", str(time.time()))])
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            con.close()
            raise
        self.con = con

    def write(self, steps: np.ndarray, rows: np.ndarray, global_cols: tuple, events: list) -> None:
        con = self.con
        # The row counter and the pyramid's partial buckets advance with the
        # rows; a failed commit must take them back with the rows.
        saved = (self.seq, list(self.acc), self.global_cols)
        con.execute("BEGIN")
        try:
            if len(steps):
                self._write_rows(con, steps, rows, global_cols)
            if events:
                con.executemany(
                    "INSERT INTO events (step, kind, severity, layers, message, advice, data) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(int(e.step), str(e.kind), str(e.severity), json.dumps(list(e.layers)), str(e.message),
                      json.dumps(list(e.advice)), _dumps(e.data)) for e in events])
            con.execute("INSERT OR REPLACE INTO meta VALUES ('updated_time', ?)", (str(time.time()),))
            con.execute("COMMIT")
        except BaseException:
            self.seq, self.acc, self.global_cols = saved
            if con.in_transaction:  # on a full disk SQLite has already rolled back
                con.execute("ROLLBACK")
            raise

    def _write_rows(self, con, steps, rows, global_cols):
        L = self.n_layers
        G = len(global_cols)
        if rows.ndim != 2 or rows.shape[1] != G + 2 * L:
            raise ValueError(f"rows have width {rows.shape[1:]}, expected {G} globals + 2x{L} layers")
        if self.global_cols is None:
            self.global_cols = tuple(global_cols)
            con.execute("INSERT OR REPLACE INTO meta VALUES ('global_cols', ?)", (json.dumps(self.global_cols),))
        elif tuple(global_cols) != self.global_cols:
            raise ValueError(f"global columns changed from {self.global_cols} to {tuple(global_cols)}")
        # Views, not copies: tobytes() below writes each chunk's slice contiguously anyway.
        glob, norms, maxabs = rows[:, :G], rows[:, G:G + L], rows[:, G + L:]
        n = len(steps)
        for a in range(0, n, CHUNK_ROWS):
            b = min(n, a + CHUNK_ROWS)
            s = steps[a:b]
            con.execute("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (self.seq + a, b - a, int(s.min()), int(s.max()), s.tobytes(),
                         glob[a:b].tobytes(), norms[a:b].tobytes(), maxabs[a:b].tobytes()))
        # Pyramid: each level groups the batch-only segments of the level below
        # (sums must not count earlier rows twice), then merges with the
        # in-memory partial bucket and upserts every bucket it touched.
        ids = np.arange(self.seq, self.seq + n, dtype=np.int64)
        segs = raw_aggregates(steps, glob, norms, maxabs)
        for level in range(1, LEVELS + 1):
            ids, segs = level_aggregates(ids, segs, FACTOR_BITS)
            merged = dict(segs)
            prev = self.acc[level]
            if prev is not None and prev[0] == ids[0]:
                merged = {k: v.copy() for k, v in merged.items()}  # the level below still reads segs
                both = {k: np.concatenate([prev[1][k][None], merged[k][:1]]) for k in merged}
                first = reduce_groups(both, np.array([0]))
                for k in merged:
                    merged[k][0] = first[k][0]
            self.acc[level] = (int(ids[-1]), {k: v[-1] for k, v in merged.items()})
            con.executemany(
                "INSERT OR REPLACE INTO summary VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(level, int(ids[i]), int(merged["n"][i]), int(merged["step_lo"][i]),
                  int(merged["step_hi"][i]), merged["gmin"][i].tobytes(), merged["gmax"][i].tobytes(),
                  merged["nmax"][i].tobytes(), merged["nmin"][i].tobytes(), merged["xmax"][i].tobytes(),
                  merged["nfc"][i].tobytes()) for i in range(len(ids))])
        self.seq += n
        con.execute("INSERT OR REPLACE INTO meta VALUES ('rows', ?)", (str(self.seq),))

    def finish(self, status: str) -> None:
        if self.con is None:
            return
        self.con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             [("status", status), ("end_time", str(time.time()))])
        try:
            self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass  # a reader holds the WAL; it is checkpointed later
        self.con.close()
        self.con = None


class Recorder:
    """Writes one run: a background thread owns the SQLite store and the sinks.

    Use ``open_recorder`` (the guard does when given ``log_dir``).

    Attributes:
        run_name: the run's name in the store (unique in its log dir).
        path: the run directory (None when only sinks are written).
        failures: dict sink name -> number of failed writes (0 when healthy).
        dropped_rows: rows dropped because the writer fell too far behind.
    """

    def __init__(self, run_name: str, path: Path | None, store: _StoreWriter | None,
                 sinks: list, layers: list[dict], config: dict):
        self.run_name = run_name
        self.path = path
        self._store = store
        self._sinks = list(sinks)
        self._layers = layers
        self._config = config
        self.failures: dict[str, int] = {}
        self._fail_lock = threading.Lock()
        self.dropped_rows = 0
        self._pending: list = []
        self._pending_bytes = 0
        self._cv = threading.Condition()
        self._closed = False
        self._warned: set[str] = set()
        for s in self._sinks:
            self._call(s, "open", run_name, layers, config)
        self._thread = threading.Thread(target=self._loop, name=f"gradguard-writer-{run_name}", daemon=True)
        self._thread.start()
        # A run whose owner forgets close() is still flushed at exit.
        atexit.register(_close_at_exit, weakref.ref(self))

    # ----------------------------------------------------------- training side
    def write_steps(self, steps, rows, global_cols) -> None:
        """Queue drained rows (``len(steps)`` x width float32). Never blocks or raises."""
        try:
            steps = np.asarray(steps, dtype=np.int64).reshape(-1)
            rows = np.array(rows, dtype=np.float32, copy=True)  # the caller may reuse its array
            if rows.ndim != 2 or rows.shape[0] != len(steps):
                raise ValueError(f"rows must be ({len(steps)}, width), got {rows.shape}")
            self._put(("steps", steps, rows, tuple(global_cols)), rows.nbytes)
        except Exception as e:  # never into training
            self._fail("recorder", e)

    def write_events(self, events) -> None:
        """Queue events. Never blocks or raises."""
        if not events:
            return
        try:
            self._put(("events", list(events)), 0)
        except Exception as e:
            self._fail("recorder", e)

    def add_sink(self, sink) -> None:
        """Forward everything written from now on to ``sink`` too (e.g. ``TensorBoardSink``)."""
        self._call(sink, "open", self.run_name, self._layers, self._config)
        with self._cv:
            self._sinks.append(sink)

    def _put(self, item, nbytes: int) -> None:
        with self._cv:
            if self._closed:
                return
            if nbytes and self._pending_bytes + nbytes > MAX_PENDING_BYTES:
                self.dropped_rows += len(item[1])
                self._fail("recorder", RuntimeError("writer fell behind; dropping rows"))
                return
            self._pending.append(item)
            self._pending_bytes += nbytes
            self._cv.notify()

    def resume(self, run_name: str, step: int) -> bool:
        """Continue the earlier run ``run_name`` of this log dir from ``step`` instead of the run
        this recorder created (which must still be empty: it is deleted).  Rows and events the
        earlier run holds at or after ``step`` are dropped.  Returns False (and changes nothing)
        when there is no such run or this recorder already wrote rows."""
        if self._store is None or self.path is None or run_name == self.run_name:
            return False
        target = self.path.parent / check_run_name(run_name)
        self.flush()
        with self._cv:
            if self._store.seq or not (target / DB_NAME).exists():
                return False
            store = _StoreWriter(target / DB_NAME)
            store.reopen(step)
            old_store, old_path = self._store, self.path
            self._store, self.path, self.run_name = store, target, run_name
        old_store.finish("discarded")
        shutil.rmtree(old_path, ignore_errors=True)
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written. Returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._flushing += 1
            self._cv.notify_all()
            try:
                while self._pending or self._busy:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cv.wait(left)
            finally:
                self._flushing -= 1
        return True

    def close(self) -> None:
        """Write everything pending, mark the run finished, stop the thread."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        if self._store is not None:
            try:
                self._store.finish("finished")
            except Exception as e:
                self._fail("store", e)
        for s in self._sinks:
            self._call(s, "close")

    # ------------------------------------------------------------ writer side
    _busy = False
    _flushing = 0  # callers waiting in flush(): the writer commits at once

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending and self._closed:
                    return
                until = time.monotonic() + BATCH_SECONDS
                while not (self._closed or self._flushing or self._pending_bytes >= BATCH_BYTES):
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                items, self._pending, self._pending_bytes = self._pending, [], 0
                self._busy = True
            try:
                self._write(items)
            except Exception as e:  # the thread must outlive any bad batch
                self._fail("recorder", e)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _write(self, items) -> None:
        # Coalesce consecutive flushes with the same layout into one batch.
        batches: list[tuple[tuple, list, list]] = []
        events = []
        for it in items:
            if it[0] == "steps":
                if batches and batches[-1][0] == it[3] and batches[-1][2][0].shape[1] == it[2].shape[1]:
                    batches[-1][1].append(it[1])
                    batches[-1][2].append(it[2])
                else:
                    batches.append((it[3], [it[1]], [it[2]]))
            else:
                events += it[1]
        merged = [(cols, np.concatenate(s), np.concatenate(r)) for cols, s, r in batches]
        if not merged and events:
            merged.append(((), np.empty(0, np.int64), np.empty((0, 0), np.float32)))
        for i, (cols, steps, rows) in enumerate(merged):
            # A flush's events commit with its rows (a reader never sees a NaN
            # step without its event); if that fails, the events are retried
            # alone so a bad batch of rows cannot take them down with it.
            ev = events if (events and i == len(merged) - 1) else []
            if self._store is not None:
                try:
                    self._store.write(steps, rows, cols, ev)
                except Exception as e:
                    self._fail("store", e)
                    if ev and len(steps):
                        try:
                            self._store.write(np.empty(0, np.int64), np.empty((0, 0), np.float32), (), ev)
                        except Exception as e2:
                            self._fail("store", e2)
            for s in self._sinks:
                if len(steps):
                    self._call(s, "write_steps", steps, rows, cols)
                if ev:
                    self._call(s, "write_events", ev)

    def _call(self, sink, method: str, *args) -> None:
        fn = getattr(sink, method, None)
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as e:
            self._fail(getattr(sink, "name", type(sink).__name__), e)

    def _fail(self, who: str, err: Exception) -> None:
        with self._fail_lock:  # the training thread and the writer thread both report here
            self.failures[who] = self.failures.get(who, 0) + 1
            first = who not in self._warned
            self._warned.add(who)
        if first:
            log.warning("gradguard: %s failed (%s: %s); training continues, further failures are "
                        "counted in recorder.failures", who, type(err).__name__, err)


def _close_at_exit(ref) -> None:
    rec = ref()
    if rec is not None:
        rec.close()


def open_recorder(log_dir, run_name: str | None = None, layers: list[dict] | None = None,
                  config: dict | None = None, sinks: list | None = None) -> Recorder:
    """Create a new run under ``log_dir`` and return its ``Recorder``.

    Args:
        log_dir: directory of runs (created if missing), or None to write only ``sinks``.
        run_name: the run's name; None picks a timestamp.  An existing run is
            never overwritten: a taken name gets a ``-2``, ``-3`` ... suffix.
        layers: ``[{"name", "shape", "order"}, ...]`` in row order.
        config: JSON-serialisable run configuration.
        sinks: extra sinks (e.g. ``gradguard.sinks.TensorBoardSink(...)``).
    Returns:
        Recorder (``.run_name`` holds the name actually used).

    Example:
        >>> rec = open_recorder("runs", layers=[{"name": "w", "shape": [3], "order": 0}])
        >>> rec.write_steps([0], rows, GLOBAL_COLS); rec.close()
    """
    layers = list(layers or [])
    config = dict(config or {})
    for i, l in enumerate(layers):
        if not isinstance(l, dict) or "name" not in l:
            raise TypeError(f"layers[{i}] must be a dict with a 'name', got {l!r}")
    if log_dir is None:
        name = check_run_name(run_name) if run_name is not None else time.strftime("%Y%m%d-%H%M%S")
        return Recorder(name, None, None, sinks or [], layers, config)
    if not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"log_dir must be a path, got {type(log_dir).__name__}")
    root = Path(log_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"log_dir must be a directory, but {root} is a file")
    root.mkdir(parents=True, exist_ok=True)
    name, path = _unique_run_dir(root, run_name)
    store = _StoreWriter(path / DB_NAME)
    store.create(name, layers, config)
    return Recorder(name, path, store, sinks or [], layers, config)

