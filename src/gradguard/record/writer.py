"""The recorder: takes drained step rows and events, writes them on a thread.

Training calls ``write_steps`` / ``write_events`` once per flush; both only
append to an in-memory queue (never block on disk, never raise).  A
background thread drains the queue and writes the SQLite run store in one
transaction per wake-up; every extra sink (TensorBoard, ...) has its own
thread and bounded queue, so a hung sink never stalls the store.  A failing
store or sink logs one warning, counts its failures in ``recorder.failures``
and keeps going; rows that could not be stored are counted in
``recorder.dropped_rows`` and in the store itself (the run then reads
``incomplete``).

A run has one live writer: the recorder holds an advisory lock on
``RUN/writer.lock`` (released by the kernel when the process dies), and the
store file appears only once its tables and metadata are complete (written
under a temporary name, then renamed).  A run directory without a store and
without a live writer is an abandoned reservation: the next run of that name
takes it over instead of moving to ``NAME-2``.
"""
from __future__ import annotations

import atexit
import collections
import gc
import json
import logging
import os
import shutil
import socket
import sqlite3
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np

from .._json import json_safe
from .schema import (DB_NAME, DDL, FACTOR_BITS, LEVELS, LOCK_NAME, SCHEMA_VERSION, check_run_name,
                     level_aggregates, raw_aggregates, reduce_groups)

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per run is then not enforced
    fcntl = None

__all__ = ["Recorder", "open_recorder", "CHUNK_ROWS", "MAX_PENDING_BYTES", "HEARTBEAT_SECONDS",
           "CLOSE_TIMEOUT", "SINK_QUEUE"]

log = logging.getLogger("gradguard.record")
CHUNK_ROWS = 256                     # raw rows per stored chunk
MAX_PENDING_BYTES = 512 * 2 ** 20    # beyond this, rows are dropped (and counted), not queued
# What a queued item costs beyond its arrays' data (two ndarray headers, a tuple,
# allocator slack); measured ~560 B on CPython 3.11 / numpy 1.26, rounded up.
# Without it a flush of one tiny row per step was counted at 1/15 of its memory.
ITEM_OVERHEAD = 768
EVENT_BYTES = 2048                   # a queued Event with its message, advice and data
# The writer gathers rows for up to this long before a commit: a transaction per
# training step (every step on CPU) would cost more than the rows themselves.
# flush() and close() cut the wait short; readers poll every ~2 s anyway.
BATCH_SECONDS = 0.2
BATCH_BYTES = 8 * 2 ** 20
# The writer thread touches ``updated_time`` at least this often, rows or not:
# readers call a run "stale" once it is several heartbeats old (see store.py),
# whatever its pid says (pids are reused and are 1 in most containers).
HEARTBEAT_SECONDS = 5.0
CLOSE_TIMEOUT = 30.0                 # close() waits at most this long for the store and the sinks
SINK_QUEUE = 256                     # batches waiting per sink; beyond it the sink's rows are dropped
_TMP = DB_NAME + ".tmp"
_OWN_FILES = {LOCK_NAME, _TMP, _TMP + "-journal"}


def _dumps(obj) -> str:
    """Strict JSON (non-finite numbers as "NaN"/"Inf"/"-Inf"); objects JSON lacks as their str."""
    return json.dumps(json_safe(obj), default=str, allow_nan=False)


def _text(s) -> str:
    """Text SQLite can store: a lone surrogate (possible in a module name) is escaped, not fatal."""
    return str(s).encode("utf-8", "backslashreplace").decode("utf-8")


# ------------------------------------------------------------------ locks
def _try_lock(path: Path) -> int | None:
    """Exclusive advisory lock on ``path`` (created if missing): the fd, or None if taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _lock_with_retry(path: Path, tries: int = 20) -> int | None:
    # A reader probing the lock (store.py) holds it for microseconds: retry briefly.
    for i in range(tries):
        fd = _try_lock(path)
        if fd is not None:
            return fd
        if i == 0:
            gc.collect()  # a guard dropped without close() in this process frees its run when collected
        time.sleep(0.01)
    return None


def _unlock(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)  # closing the only fd releases the flock
        except OSError:
            pass


def _reserve_run_dir(log_dir: Path, run_name: str | None) -> tuple[str, Path, int]:
    """Create (or take over an abandoned) run directory and lock it; never reuse a run."""
    base = check_run_name(run_name) if run_name is not None else time.strftime("%Y%m%d-%H%M%S")
    for i in range(10_000):
        name = base if i == 0 else f"{base}-{i + 1}"
        path = log_dir / name
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                continue
        try:
            fd = _try_lock(path / LOCK_NAME)
        except OSError:
            continue
        if fd is None:
            continue  # a live writer (or a creator racing us) owns it
        try:
            left = {p.name for p in path.iterdir()}
        except OSError:
            left = {DB_NAME}
        if not left <= _OWN_FILES:  # a real run, or someone else's directory
            _unlock(fd)
            continue
        for f in left - {LOCK_NAME}:  # debris of a creation that was killed
            try:
                (path / f).unlink()
            except OSError:
                pass
        return name, path, fd
    raise RuntimeError(f"could not find a free run name starting with {base!r} in {log_dir}")


class _Vanished(RuntimeError):
    pass


# ------------------------------------------------------------------ store
class _StoreWriter:
    """SQLite side of the recorder; used only from the writer thread (after ``open_recorder``).

    The file is created on the first write (or at close): a guard that is built and then
    resumes another run leaves nothing behind, and a kill before that leaves no empty run.
    """

    def __init__(self, path: Path, run_name: str = "", layers: list[dict] | None = None,
                 config: dict | None = None):
        self.path = path
        self.run_name, self.layers, self.config = run_name, list(layers or []), dict(config or {})
        self.con: sqlite3.Connection | None = None
        self.seq = 0
        self.global_cols: tuple | None = None
        self.acc: list[tuple[int, dict] | None] = [None] * (LEVELS + 1)
        self.n_layers = len(self.layers)
        self.parent: tuple[str, int] | None = None
        self.dropped = 0          # rows that never reached the file
        self._dropped_saved = 0
        self.gone = False         # the file was deleted or replaced under us
        self._ino = None
        self.last_commit = 0.0
        self._prepared = False

    @property
    def created(self) -> bool:
        return self.con is not None

    def _pragmas(self, con) -> None:
        con.execute("PRAGMA journal_mode=WAL")
        # 64 MB of WAL between checkpoints: fewer, longer checkpoints (+10% rows/s vs 16 MB).
        con.execute("PRAGMA wal_autocheckpoint=1024")
        # WAL + NORMAL: a commit is not fsynced, so an OS crash or power loss may drop the last
        # commits, but never corrupts; a killed process loses nothing committed (the OS has it).
        # OFF would be ~30% faster but could corrupt the file on power loss.
        con.execute("PRAGMA synchronous=NORMAL")

    def _live_meta(self) -> list[tuple[str, str]]:
        now = time.time()
        meta = {"status": "running", "pid": os.getpid(), "host": socket.gethostname(),
                "updated_time": now, "heartbeat_s": HEARTBEAT_SECONDS}
        if self.parent is not None:
            meta["parent_run"], meta["parent_step"] = self.parent
        return [(k, _text(v)) for k, v in meta.items()]

    def prepare(self) -> None:
        """Write the whole store, tables and metadata, under a temporary name (in the caller's
        thread: a log dir that cannot take it fails here, at ``Guard()``)."""
        tmp = self.path.with_name(_TMP)
        for p in (tmp, tmp.with_name(_TMP + "-journal")):
            if p.exists():
                p.unlink()
        con = sqlite3.connect(tmp, isolation_level=None)
        try:
            # Big pages: per-layer BLOBs are ~300 KB per chunk; 4 KB pages would chain 75 overflow pages.
            con.execute("PRAGMA page_size=65536")
            con.execute("BEGIN")
            for stmt in DDL.split(";"):
                if stmt.strip():
                    con.execute(stmt)
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            meta = [("schema_version", str(SCHEMA_VERSION)), ("run_name", self.run_name),
                    ("config", _dumps(self.config)), ("start_time", str(time.time())), ("rows", "0"),
                    ("dropped_rows", "0")] + self._live_meta()
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta)
            con.executemany("INSERT INTO layers VALUES (?, ?, ?, ?)",
                            [(i, _text(l["name"]), json.dumps(list(l.get("shape", []))),
                              int(l.get("order", i))) for i, l in enumerate(self.layers)])
            con.execute("COMMIT")
        finally:
            con.close()
        self._prepared = True

    def ensure(self) -> None:
        """Publish the prepared store under its real name (on the first write, or at close):
        readers see a complete store or none, and a run resumed into another one or killed
        before its first row leaves no empty run behind."""
        if self.con is not None or self.gone:
            return
        if not self._prepared:
            self.prepare()
        os.replace(self.path.with_name(_TMP), self.path)
        self._open()

    def _open(self) -> None:
        con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._pragmas(con)
        self._ino = os.stat(self.path).st_ino
        self.con = con
        self.last_commit = time.monotonic()

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
        self._pragmas(con)
        self.n_layers = con.execute("SELECT count(*) FROM layers").fetchone()[0]
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        cols = tuple(json.loads(meta["global_cols"])) if "global_cols" in meta else ()
        self.dropped = self._dropped_saved = int(meta.get("dropped_rows", 0) or 0)
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
            con.execute("DELETE FROM meta WHERE key IN ('end_time', 'error')")
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                            self._live_meta() + [("resumed_at", str(int(resume_at)))])
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            con.close()
            raise
        self._ino = os.stat(self.path).st_ino
        self.con = con
        self.last_commit = time.monotonic()

    def _check_file(self) -> None:
        # A deleted run directory: SQLite keeps writing to the unlinked inode, and every row
        # would be lost without a word.  One stat per commit notices it.
        try:
            same = os.stat(self.path).st_ino == self._ino
        except OSError:
            same = False
        if not same:
            self.gone = True
            try:
                self.con.close()
            finally:
                self.con = None
            raise _Vanished(f"the run store {self.path} was deleted or replaced during the run; "
                            "later rows are dropped (counted in recorder.dropped_rows)")

    def write(self, steps: np.ndarray, rows: np.ndarray, global_cols: tuple, events: list) -> None:
        if self.gone:
            raise _Vanished(f"the run store {self.path} is gone")
        self.ensure()
        self._check_file()
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
                    [(int(e.step), _text(e.kind), _text(e.severity), json.dumps(list(e.layers)),
                      _text(e.message), json.dumps(list(e.advice)), _dumps(e.data)) for e in events])
            meta = [("updated_time", str(time.time()))]
            if self.dropped != self._dropped_saved:
                meta.append(("dropped_rows", str(self.dropped)))
            if self.parent is not None:
                meta += [("parent_run", self.parent[0]), ("parent_step", str(self.parent[1]))]
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta)
            con.execute("COMMIT")
            self._dropped_saved = self.dropped
            self.last_commit = time.monotonic()
        except BaseException:
            self.seq, self.acc, self.global_cols = saved
            if con.in_transaction:  # on a full disk SQLite has already rolled back
                con.execute("ROLLBACK")
            raise

    def heartbeat(self) -> None:
        if self.con is None:
            return
        self._check_file()
        self.con.execute("INSERT OR REPLACE INTO meta VALUES ('updated_time', ?)", (str(time.time()),))
        self.last_commit = time.monotonic()

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

    def finish(self, status: str, error: str | None = None) -> None:
        """Final status, end time and lost-row count in one commit; a run that lost rows and
        would read ``finished`` reads ``incomplete``.  If this commit fails (full disk) the run
        keeps ``running`` and readers see it as interrupted/stale, never ``finished``."""
        if self.con is None:
            return
        if status == "finished" and self.dropped:
            status = "incomplete"
        meta = [("status", status), ("end_time", str(time.time())), ("updated_time", str(time.time())),
                ("dropped_rows", str(self.dropped))]
        if error:
            meta.append(("error", _text(error)[:2000]))
        try:
            self._check_file()
            self.con.execute("BEGIN")
            self.con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta)
            self.con.execute("COMMIT")
            try:
                self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # a reader holds the WAL; it is checkpointed later
        finally:
            if self.con is not None:
                if self.con.in_transaction:
                    self.con.execute("ROLLBACK")
                self.con.close()
                self.con = None


# ------------------------------------------------------------------ sinks
class _SinkWorker:
    """One extra sink on its own thread with a bounded queue: a slow or hung sink loses its
    own rows (counted), never the store's."""

    def __init__(self, sink, recorder: "Recorder"):
        self.sink = sink
        self.name = getattr(sink, "name", type(sink).__name__)
        self._rec = weakref.proxy(recorder)
        self._q: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self.thread = threading.Thread(target=self._loop, name=f"gradguard-sink-{self.name}", daemon=True)
        self.thread.start()

    def put(self, method: str, *args) -> None:
        with self._cv:
            if self._closed:
                return
            if len(self._q) >= SINK_QUEUE:
                lost = len(args[0]) if method == "write_steps" else 0
                self._rec._fail(self.name, RuntimeError(f"sink is not keeping up; {lost} rows not sent to it"))
                return
            self._q.append((method, args))
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._q.append(("close", ()))
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._q:
                    self._cv.wait()
                method, args = self._q.popleft()
            fn = getattr(self.sink, method, None)
            if fn is not None:
                try:
                    fn(*args)
                except Exception as e:
                    try:
                        self._rec._fail(self.name, e)
                    except ReferenceError:
                        pass
            if method == "close":
                return


# ----------------------------------------------------------- exit handling
class _Exit:
    """What ended the interpreter: set by the exception hook, read by recorders closed at exit."""
    error: str | None = None
    status = "failed"
    installed = False


def _install_excepthook() -> None:
    if _Exit.installed:
        return
    _Exit.installed = True
    previous = sys.excepthook

    def hook(tp, value, tb):
        _Exit.error = f"{getattr(tp, '__name__', tp)}: {value}"
        _Exit.status = "interrupted" if issubclass(tp, KeyboardInterrupt) else "failed"
        previous(tp, value, tb)

    sys.excepthook = hook


class Recorder:
    """Writes one run: a background thread owns the SQLite store, one thread per extra sink.

    Use ``open_recorder`` (the guard does when given ``log_dir``).

    Attributes:
        run_name: the run's name in the store (unique in its log dir).
        path: the run directory (None when only sinks are written).
        failures: dict sink name -> number of failed writes (0 when healthy).
        dropped_rows: rows that did not reach the store (writer too far behind, a failed
            commit, a deleted run directory); also saved in the store, and a run that lost
            rows ends ``incomplete`` instead of ``finished``.
        parent: ``(run, step)`` this run branched from (see ``resume``), or None.
    """

    def __init__(self, run_name: str, path: Path | None, store: _StoreWriter | None,
                 sinks: list, layers: list[dict], config: dict, lock_fd: int | None = None,
                 requested_name: str | None = None):
        self.run_name = run_name
        self.path = path
        self._store = store
        self._lock_fd = lock_fd
        self._requested = requested_name
        self._layers = layers
        self._config = config
        self.failures: dict[str, int] = {}
        self._fail_lock = threading.Lock()
        self._dropped_queue = 0
        self._pending: list = []
        self._pending_bytes = 0
        self._cv = threading.Condition()
        self._closed = False
        self._done = False
        self._warned: set[str] = set()
        self._pending_source = None
        self._sinks: list[_SinkWorker] = []
        for s in sinks:
            self.add_sink(s)
        self._thread = threading.Thread(target=self._loop, name=f"gradguard-writer-{run_name}", daemon=True)
        self._thread.start()
        _install_excepthook()
        # A run whose owner forgets close() is still flushed at exit.
        atexit.register(_close_at_exit, weakref.ref(self))

    @property
    def dropped_rows(self) -> int:
        return self._dropped_queue + (self._store.dropped if self._store is not None else 0)

    @property
    def parent(self):
        return self._store.parent if self._store is not None else None

    # ----------------------------------------------------------- training side
    def write_steps(self, steps, rows, global_cols) -> None:
        """Queue drained rows (``len(steps)`` x width float32). Never blocks or raises."""
        try:
            steps = np.asarray(steps, dtype=np.int64).reshape(-1)
            rows = np.array(rows, dtype=np.float32, copy=True)  # the caller may reuse its array
            if rows.ndim != 2 or rows.shape[0] != len(steps):
                raise ValueError(f"rows must be ({len(steps)}, width), got {rows.shape}")
            self._put(("steps", steps, rows, tuple(global_cols)), rows.nbytes + steps.nbytes + ITEM_OVERHEAD)
        except Exception as e:  # never into training
            self._fail("recorder", e)

    def write_events(self, events) -> None:
        """Queue events. Never blocks or raises."""
        if not events:
            return
        try:
            events = list(events)
            self._put(("events", events), EVENT_BYTES * len(events))
        except Exception as e:
            self._fail("recorder", e)

    def report_failure(self, who: str, err: BaseException) -> None:
        """Count a failure of ``who`` (a detector, a remedy, a row observer ...) in ``failures``
        and log the first one, like a failing sink."""
        self._fail(str(who), err)

    def add_sink(self, sink) -> None:
        """Forward everything written from now on to ``sink`` too (e.g. ``TensorBoardSink``)."""
        w = _SinkWorker(sink, self)
        w.put("open", self.run_name, self._layers, self._config)
        with self._cv:
            self._sinks.append(w)

    def attach(self, owner, pending=None) -> None:
        """Close this recorder when ``owner`` (the guard) is collected, and at interpreter exit
        hand over the rows ``owner`` still holds.

        Args:
            owner: the object whose collection ends the run (held weakly).
            pending: optional ``() -> (steps, rows, global_cols)`` returning the rows not yet
                passed to ``write_steps``; called once when the recorder closes.  It must not
                reference ``owner`` (that would keep it alive).
        """
        self._pending_source = pending
        weakref.finalize(owner, _close_ref, weakref.ref(self))

    def _put(self, item, nbytes: int) -> None:
        with self._cv:
            if self._closed:
                return
            if self._pending_bytes + nbytes > MAX_PENDING_BYTES:
                if item[0] == "steps":
                    if self._store is not None:
                        self._store.dropped += len(item[1])  # under _cv, like the writer's count
                    else:
                        self._dropped_queue += len(item[1])
                self._fail("recorder", RuntimeError("writer fell behind; dropping rows"))
                return
            self._pending.append(item)
            self._pending_bytes += nbytes
            self._cv.notify()

    def resume(self, run_name: str, step: int) -> bool:
        """Continue the earlier run ``run_name`` of this log dir from ``step``.

        Resumes only when this recorder was opened without a run name or with the checkpoint's
        own (then a taken name gave this one ``NAME-2``): rows and events the earlier run holds
        at or after ``step`` are dropped, and this recorder's own run, still empty, is removed.
        Otherwise this recorder keeps its own new run and records that it branched from
        ``(run_name, step)`` (``meta`` ``parent_run`` / ``parent_step``): a checkpoint of another
        run never overwrites it.  A run whose writer is still alive is never taken over (one
        live writer per run): a warning, and the new run branches instead.

        Returns:
            True when the earlier run is continued.
        """
        if self._store is None or self.path is None or run_name == self.run_name:
            return False
        step = int(step)
        self.flush()
        with self._cv:
            if self._requested is not None and self._requested != run_name:
                self._store.parent = (run_name, step)
                self._pending.append(("parent",))
                self._cv.notify()
                return False
            try:
                target = self.path.parent / check_run_name(run_name)
            except ValueError:
                target = None
            fd, why, store = None, None, None
            if target is not None and not self._store.seq and target.is_dir():
                # The lock first: a live writer may not have published its store yet.
                fd = _lock_with_retry(target / LOCK_NAME)
                if fd is None:
                    why = "it has a live writer (another process or guard still writes it)"
                elif (target / DB_NAME).is_file():
                    try:
                        store = _StoreWriter(target / DB_NAME, run_name)
                        store.reopen(step)
                    except Exception as e:
                        why, store = f"it cannot be continued ({e})", None
                if store is None:
                    _unlock(fd)
            if store is None:
                self._store.parent = (run_name, step)
                self._pending.append(("parent",))
                self._cv.notify()
                if why is not None:
                    log.warning("gradguard: not continuing run %r from step %d: %s; writing run %r "
                                "instead", run_name, step, why, self.run_name)
                return False
            old_store, old_path, old_fd = self._store, self.path, self._lock_fd
            self._store, self.path, self.run_name, self._lock_fd = store, target, run_name, fd
        try:
            old_store.finish("discarded")
        except Exception:
            pass
        shutil.rmtree(old_path, ignore_errors=True)
        _unlock(old_fd)
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written to the store. Returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._flushing += 1
            self._cv.notify_all()
            try:
                while (self._pending or self._busy) and self._thread.is_alive():
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cv.wait(left if left is not None else 1.0)
            finally:
                self._flushing -= 1
        return True

    def close(self, status: str | None = None, error: BaseException | str | None = None,
              timeout: float = CLOSE_TIMEOUT) -> None:
        """Write everything pending, record how the run ended, stop the threads.

        Args:
            status: ``"finished"`` (default), ``"failed"`` (the training raised; the guard passes
                it from ``__exit__``) or ``"interrupted"``.  None: ``"finished"``, unless the
                interpreter is exiting on an uncaught exception (then ``"failed"``, or
                ``"interrupted"`` for KeyboardInterrupt).
            error: the exception (or its text) that ended the run, stored as ``meta.error``.
            timeout: seconds to wait for the store and the sinks (a hung sink is abandoned).
        """
        if status is None:
            status = _Exit.status if _Exit.error else "finished"
            error = error if error is not None else _Exit.error
        elif status not in ("finished", "failed", "interrupted"):
            raise ValueError(f"status must be 'finished', 'failed' or 'interrupted', got {status!r}")
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        source, self._pending_source = self._pending_source, None
        if source is not None and not self._closed:
            try:
                steps, rows, cols = source()
                if len(steps):
                    self.write_steps(steps, rows, cols)
            except Exception as e:
                self._fail("recorder", e)
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        deadline = time.monotonic() + timeout
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("gradguard: the run store did not finish writing within %.0f s; %s left unwritten",
                        timeout, self.run_name)
        elif self._store is not None:
            try:
                self._store.ensure()  # a run that never flushed a row still ran: it is listed
                self._store.finish(status, error)
            except Exception as e:
                self._fail("store", e)
        _unlock(self._lock_fd)
        self._lock_fd = None
        for w in self._sinks:
            w.close()
        for w in self._sinks:
            w.thread.join(max(0.0, deadline - time.monotonic()))
            if w.thread.is_alive():
                self._fail(w.name, RuntimeError(f"did not close within {timeout:.0f} s; abandoned"))
        self._done = True

    # ------------------------------------------------------------ writer side
    _busy = False
    _flushing = 0  # callers waiting in flush(): the writer commits at once

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    if not self._cv.wait(HEARTBEAT_SECONDS / 2):
                        break
                if not self._pending and self._closed:
                    return
                if self._pending:
                    until = time.monotonic() + BATCH_SECONDS
                    while not (self._closed or self._flushing or self._pending_bytes >= BATCH_BYTES):
                        left = until - time.monotonic()
                        if left <= 0:
                            break
                        self._cv.wait(left)
                items, self._pending, self._pending_bytes = self._pending, [], 0
                self._busy = True
                store = self._store
            try:
                if items:  # ("parent",) items only make the branch point reach the store
                    self._write(items, store)
                elif store is not None and store.created and \
                        time.monotonic() - store.last_commit >= HEARTBEAT_SECONDS:
                    store.heartbeat()
            except Exception as e:  # the thread must outlive any bad batch
                self._fail("store" if isinstance(e, (sqlite3.Error, OSError, _Vanished)) else "recorder", e)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
        # close(): create the store of a run that never wrote a row (it still ran)

    def _write(self, items, store) -> None:
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
            elif it[0] == "events":
                events += it[1]
        merged = [(cols, np.concatenate(s), np.concatenate(r)) for cols, s, r in batches]
        if not merged:
            merged.append(((), np.empty(0, np.int64), np.empty((0, 0), np.float32)))
        for i, (cols, steps, rows) in enumerate(merged):
            # A flush's events commit with its rows (a reader never sees a NaN
            # step without its event); if that fails, the events are retried
            # alone so a bad batch of rows cannot take them down with it.
            ev = events if (events and i == len(merged) - 1) else []
            if store is not None:
                try:
                    store.write(steps, rows, cols, ev)
                except Exception as e:
                    with self._cv:
                        store.dropped += len(steps)
                    self._fail("store", e)
                    if ev and len(steps) and not store.gone:
                        try:
                            store.write(np.empty(0, np.int64), np.empty((0, 0), np.float32), (), ev)
                        except Exception as e2:
                            self._fail("store", e2)
            for w in self._sinks:
                if len(steps):
                    w.put("write_steps", steps, rows, cols)
                if ev:
                    w.put("write_events", ev)

    def _fail(self, who: str, err: BaseException) -> None:
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


def _close_ref(ref) -> None:
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
        Recorder (``.run_name`` holds the name actually used).  The store file itself is
        written on the first flush (or at ``close()``).

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
    if run_name is not None:
        check_run_name(run_name)
    _dumps(config)  # an unserialisable config fails here, before anything is on disk
    root.mkdir(parents=True, exist_ok=True)
    name, path, fd = _reserve_run_dir(root, run_name)
    store = _StoreWriter(path / DB_NAME, name, layers, config)
    try:
        store.prepare()
        return Recorder(name, path, store, sinks or [], layers, config, lock_fd=fd, requested_name=run_name)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # nothing of a failed creation stays behind
        _unlock(fd)
        raise
