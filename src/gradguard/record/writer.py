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
import logging
import os
import re
import shutil
import sqlite3
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np

from ._files import _dumps, _lock_with_retry, _reserve_run_dir, _unlock, _Vanished
from .schema import DB_NAME, LOCK_NAME, check_run_name
from .sink_thread import SINK_QUEUE, _SinkWorker
from .store_writer import CHUNK_ROWS, HEARTBEAT_SECONDS, _StoreWriter

__all__ = ["Recorder", "open_recorder", "CHUNK_ROWS", "MAX_PENDING_BYTES", "HEARTBEAT_SECONDS",
           "CLOSE_TIMEOUT", "SINK_QUEUE"]

log = logging.getLogger("gradguard.record")
MAX_PENDING_BYTES = 512 * 2 ** 20    # beyond this, rows are dropped (and counted), not queued
# What a queued flush costs beyond its arrays' data (two ndarray headers, a tuple, allocator
# slack); test_back_pressure_counts_real_memory holds the count above tracemalloc's for one
# tiny row per flush, which row bytes alone undercounted ~15x.
ITEM_OVERHEAD = 768
EVENT_BYTES = 2048                   # a queued Event with its message, advice and data
# The writer gathers rows for up to this long before a commit: a transaction per
# training step (every step on CPU) would cost more than the rows themselves.
# flush() and close() cut the wait short; readers poll every ~2 s anyway.
BATCH_SECONDS = 0.2
BATCH_BYTES = 8 * 2 ** 20
CLOSE_TIMEOUT = 30.0                 # close() waits at most this long for the store and the sinks


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
        if not hasattr(sys, "ps1"):  # at an interactive prompt an uncaught exception ends nothing
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

        Resumes only when this recorder was opened without a run name, or with the name the
        checkpoint's run was asked for (``NAME``, or ``NAME-k`` when ``NAME`` was taken): rows and events the earlier run holds
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
            # Same script, same name: the checkpoint's run is NAME or the NAME-k it was given
            # because NAME was taken; any other name is another run's checkpoint: branch.
            if self._requested is not None and not re.fullmatch(re.escape(self._requested) + r"(-\d+)?",
                                                                 run_name):
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
                        store = _StoreWriter(target / DB_NAME, run_name, buffers=self._store.buffers)
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
                  config: dict | None = None, sinks: list | None = None,
                  buffers: list[str] | None = None) -> Recorder:
    """Create a new run under ``log_dir`` and return its ``Recorder``.

    Args:
        log_dir: directory of runs (created if missing), or None to write only ``sinks``.
        run_name: the run's name; None picks a timestamp.  An existing run is
            never overwritten: a taken name gets a ``-2``, ``-3`` ... suffix.
        layers: ``[{"name", "shape", "order"}, ...]`` in row order.
        config: JSON-serialisable run configuration.
        sinks: extra sinks (e.g. ``gradguard.sinks.TensorBoardSink(...)``).
        buffers: watched buffer names (``RunInfo.buffers``): the rows' last block.
    Returns:
        Recorder (``.run_name`` holds the name actually used).  The store file itself is
        written on the first flush (or at ``close()``).

    Example:
        >>> rec = open_recorder("gradguard-runs", layers=[{"name": "w", "shape": [3], "order": 0}])
        >>> rec.write_steps([0], rows, GLOBAL_COLS); rec.close()
    """
    layers = list(layers or [])
    config = dict(config or {})
    if buffers is not None and (not isinstance(buffers, (list, tuple)) or
                                not all(isinstance(b, str) for b in buffers)):
        raise TypeError(f"buffers must be a list of names (str), got {buffers!r}")
    buffers = list(buffers or [])
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
    store = _StoreWriter(path / DB_NAME, name, layers, config, buffers)
    try:
        store.prepare()
        return Recorder(name, path, store, sinks or [], layers, config, lock_fd=fd, requested_name=run_name)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # nothing of a failed creation stays behind
        _unlock(fd)
        raise

