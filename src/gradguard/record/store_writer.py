"""The SQLite side of the recorder: creates, continues and writes one run's store.

Used only from the recorder's writer thread (after ``open_recorder`` prepared it).
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from pathlib import Path

import numpy as np

from ._files import TMP_NAME, _dumps, _text, _Vanished
from .schema import (DDL, FACTOR_BITS, LEVELS, SCHEMA_VERSION, level_aggregates, pack_pnorms,
                     raw_aggregates, reduce_groups, unpack_bnorms, unpack_pnorms)

__all__ = ["CHUNK_ROWS", "HEARTBEAT_SECONDS"]

CHUNK_ROWS = 256                     # raw rows per stored chunk
# The writer thread touches ``updated_time`` at least this often, rows or not:
# readers call a run "stale" once it is several heartbeats old (see store.py),
# whatever its pid says (pids are reused and are 1 in most containers).
HEARTBEAT_SECONDS = 5.0


class _StoreWriter:
    """SQLite side of the recorder; used only from the writer thread (after ``open_recorder``).

    The file is created on the first write (or at close): a guard that is built and then
    resumes another run leaves nothing behind, and a kill before that leaves no empty run.
    """

    def __init__(self, path: Path, run_name: str = "", layers: list[dict] | None = None,
                 config: dict | None = None, buffers: list[str] | None = None):
        self.path = path
        self.run_name, self.layers, self.config = run_name, list(layers or []), dict(config or {})
        self.buffers = list(buffers or [])
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
        tmp = self.path.with_name(TMP_NAME)
        for p in (tmp, tmp.with_name(TMP_NAME + "-journal")):
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
                    ("dropped_rows", "0"), ("buffers", json.dumps(self.buffers))] + self._live_meta()
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
        os.replace(self.path.with_name(TMP_NAME), self.path)
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
        if version not in (1, 2, SCHEMA_VERSION):
            con.close()
            raise ValueError(f"run store {self.path} has schema version {version}; this gradguard "
                             f"writes {SCHEMA_VERSION}")
        self._pragmas(con)
        if version < SCHEMA_VERSION:  # older chunks keep NULL in the new columns (read as NaN)
            con.execute("BEGIN")
            have = {c[1] for c in con.execute("PRAGMA table_info(chunks)")}
            for col in ("pidx", "pnorms", "bnorms"):  # v1 had no parameter norms, v2 no buffers'
                if col not in have:
                    con.execute(f"ALTER TABLE chunks ADD COLUMN {col} BLOB")
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            con.execute("COMMIT")
        self.n_layers = con.execute("SELECT count(*) FROM layers").fetchone()[0]
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        cols = tuple(json.loads(meta["global_cols"])) if "global_cols" in meta else ()
        self.dropped = self._dropped_saved = int(meta.get("dropped_rows", 0) or 0)
        if "buffers" in meta:  # a store from before v3 has none: its rows carry no buffer block
            stored = json.loads(meta["buffers"])
            if self.buffers and stored != self.buffers:
                con.close()
                raise ValueError(f"run store {self.path} watches buffers {stored}, this guard {self.buffers}")
            self.buffers = stored
        G, L, B = len(cols), self.n_layers, len(self.buffers)
        seqs = [r[0] for r in con.execute("SELECT seq0 FROM chunks ORDER BY seq0")]
        self.seq, self.acc, self.global_cols = 0, [None] * (LEVELS + 1), None
        con.execute("BEGIN")
        try:
            con.execute("DELETE FROM summary")
            con.execute("DELETE FROM events WHERE step >= ?", (int(resume_at),))
            for seq0 in seqs:  # in order: rewritten rows never overtake unread chunks
                n, steps, glob, norms, maxabs, pidx, pnorms, bnorms = con.execute(
                    "SELECT n, steps, glob, norms, maxabs, pidx, pnorms, bnorms FROM chunks WHERE seq0 = ?",
                    (seq0,)).fetchone()
                con.execute("DELETE FROM chunks WHERE seq0 = ?", (seq0,))
                steps = np.frombuffer(steps, np.int64)
                rows = np.concatenate([np.frombuffer(glob, np.float32).reshape(n, G),
                                       np.frombuffer(norms, np.float32).reshape(n, L),
                                       np.frombuffer(maxabs, np.float32).reshape(n, L),
                                       unpack_pnorms(pidx, pnorms, n, L),
                                       unpack_bnorms(bnorms, n, B)], axis=1)
                keep = steps < resume_at
                if keep.any():
                    self._write_rows(con, steps[keep], rows[keep], cols)
            con.execute("INSERT OR REPLACE INTO meta VALUES ('rows', ?)", (str(self.seq),))
            con.execute("DELETE FROM meta WHERE key IN ('end_time', 'error')")
            con.execute("INSERT OR REPLACE INTO meta VALUES ('buffers', ?)", (json.dumps(self.buffers),))
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
        L, B = self.n_layers, len(self.buffers)
        G = len(global_cols)
        if rows.ndim != 2 or rows.shape[1] != G + 3 * L + B:
            raise ValueError(f"rows have width {rows.shape[1:]}, expected {G} globals + 3x{L} layers"
                             f" + {B} buffers")
        if self.global_cols is None:
            self.global_cols = tuple(global_cols)
            con.execute("INSERT OR REPLACE INTO meta VALUES ('global_cols', ?)", (json.dumps(self.global_cols),))
        elif tuple(global_cols) != self.global_cols:
            raise ValueError(f"global columns changed from {self.global_cols} to {tuple(global_cols)}")
        # Views, not copies: tobytes() below writes each chunk's slice contiguously anyway.
        glob, norms, maxabs = rows[:, :G], rows[:, G:G + L], rows[:, G + L:G + 2 * L]
        pnorms, bnorms = rows[:, G + 2 * L:G + 3 * L], rows[:, G + 3 * L:]
        n = len(steps)
        for a in range(0, n, CHUNK_ROWS):
            b = min(n, a + CHUNK_ROWS)
            s = steps[a:b]
            con.execute("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (self.seq + a, b - a, int(s.min()), int(s.max()), s.tobytes(),
                         glob[a:b].tobytes(), norms[a:b].tobytes(), maxabs[a:b].tobytes(),
                         *pack_pnorms(pnorms[a:b]), bnorms[a:b].tobytes() if B else None))
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


