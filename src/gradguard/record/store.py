"""Read-only access to a log dir of runs: what the dashboard, report and CLI read.

Every query opens its own read-only SQLite connection, so a ``RunStore`` may
be shared by threads and read while a training process is still writing (WAL
lets readers see the last committed flush).  Long ranges come back
downsampled from the min/max pyramid (``schema.py``): each bucket keeps its
min and max, so a one-step spike in a million steps stays visible.
"""
from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
from pathlib import Path

import numpy as np

from .._json import json_safe
from .._validate import check_int
from ..events import Event, event_order
from .schema import (DB_NAME, LEVELS, LOCK_NAME, RUN_NAME_RE, SCHEMA_VERSION, raw_aggregates, unpack_bnorms,
                     reduce_groups)

try:
    import fcntl
except ImportError:  # Windows: liveness from the heartbeat alone
    fcntl = None

__all__ = ["RunStore", "RunNotFound", "RunUnreadable", "STALE_HEARTBEATS"]

_F32 = np.float32
# A running run whose last update is older than this many writer heartbeats (``meta.heartbeat_s``,
# at least ``STALE_MIN_SECONDS``) reads "stale": its writer died on another machine, hangs, or
# cannot write.  Not the pid: pids are reused, and are 1 in most containers.
STALE_HEARTBEATS = 4
STALE_MIN_SECONDS = 20.0
_STEP_MAX = 2 ** 62


class RunUnreadable(ValueError):
    """The run's store exists but cannot be read: not SQLite, empty, truncated, corrupt, or
    written by a newer gradguard.  The message says which."""


def _readable(method):
    """SQLite errors of a per-run query become ``RunUnreadable`` naming the run (never a 500)."""
    @functools.wraps(method)
    def wrapper(self, run, *args, **kwargs):
        try:
            return method(self, run, *args, **kwargs)
        except sqlite3.Error as e:
            raise RunUnreadable(f"run {run!r} cannot be read: {e} (not a gradguard store, or "
                                f"truncated/corrupt)") from None
    return wrapper


class RunNotFound(KeyError):
    """The run name is not a run of this log dir (also for traversal attempts)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "run not found"


def _blobs(rows, width: int, dtype=_F32) -> np.ndarray:
    return np.frombuffer(b"".join(rows), dtype=dtype).reshape(len(rows), width) if rows else \
        np.empty((0, width), dtype)


class RunStore:
    """Read-only view of the runs under ``log_dir``.

    Args:
        log_dir: directory given to ``Guard(log_dir=...)`` (may not exist yet:
            it then holds no runs).

    Example:
        >>> store = RunStore("gradguard-runs")
        >>> [r["name"] for r in store.runs()]
        ['20250101-120000']
        >>> s = store.steps("20250101-120000", max_points=2000)
        >>> s["step"], s["global_norm"]
    """

    def __init__(self, log_dir):
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a path, got {type(log_dir).__name__}")
        self.root = Path(log_dir).resolve()

    # ----------------------------------------------------------- connections
    def _path(self, run) -> Path:
        # Names come from URLs: accept only plain run names that exist as
        # direct children of the log dir, so nothing outside can be reached.
        if not isinstance(run, str) or not RUN_NAME_RE.match(run):
            raise RunNotFound(f"no run {run!r} in {self.root}")
        path = self.root / run / DB_NAME
        if path.parent.parent != self.root or not path.is_file():
            raise RunNotFound(f"no run {run!r} in {self.root}")
        return path

    def _connect(self, run) -> sqlite3.Connection:
        path = self._path(run)
        con = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True, timeout=10)
        try:
            version = con.execute("PRAGMA user_version").fetchone()[0]
        except BaseException:
            con.close()
            raise
        if version > SCHEMA_VERSION:
            con.close()
            raise RunUnreadable(f"run {run!r} was written with store schema v{version}; this gradguard "
                             f"reads up to v{SCHEMA_VERSION}: upgrade gradguard")
        return con

    def _meta(self, con) -> dict:
        return dict(con.execute("SELECT key, value FROM meta").fetchall())

    # ---------------------------------------------------------------- runs
    def runs(self) -> list[dict]:
        """Every run, oldest first.

        Returns:
            list of dicts: name, config (dict), start_time / end_time (epoch
            seconds or None), updated_time, status, rows, dropped_rows (rows
            that never reached the store), last_step (None before the first
            flush), n_events, parent (``{"run", "step"}`` it branched from, or
            None), error (why it failed, or why it cannot be read).

            status: ``running`` (its writer updated it within the last few
            heartbeats), ``stale`` (marked running, but no update for longer:
            the writer hangs, or died where this machine cannot tell),
            ``interrupted`` (the writer process is gone: killed, or exited
            without closing), ``finished``, ``incomplete`` (finished, but rows
            were lost: see dropped_rows), ``failed`` (training raised),
            ``unreadable`` (the store file is not SQLite, is truncated, or was
            written by a newer gradguard: only name, status and error are set).
        """
        out = []
        if not self.root.is_dir():
            return out
        for d in sorted(self.root.iterdir()):
            if not (d / DB_NAME).is_file() or not RUN_NAME_RE.match(d.name):
                continue  # a directory without a store is a run still being created (or abandoned)
            try:
                out.append(self.info(d.name))
            except RunNotFound:
                continue  # deleted meanwhile
            except (RunUnreadable, OSError) as e:
                out.append({"name": d.name, "status": "unreadable", "error": str(e), "config": {},
                            "start_time": None, "end_time": None, "updated_time": None, "rows": 0,
                            "dropped_rows": 0, "last_step": None, "n_events": 0, "parent": None,
                            "global_cols": []})
        out.sort(key=lambda r: (r["start_time"] or 0, r["name"]))
        return out

    @_readable
    def info(self, run: str) -> dict:
        """One entry of ``runs()`` (plus ``global_cols``); ``RunUnreadable`` if it cannot be read."""
        con = self._connect(run)
        try:
            m = self._meta(con)
            last = con.execute("SELECT max(step_hi) FROM chunks").fetchone()[0]
            n_events = con.execute("SELECT count(*) FROM events").fetchone()[0]
        finally:
            con.close()
        parent = {"run": m["parent_run"], "step": _int(m.get("parent_step"))} if m.get("parent_run") else None
        return {"name": run, "config": _loads(m.get("config", "{}")),
                "start_time": _float(m.get("start_time")), "end_time": _float(m.get("end_time")),
                "updated_time": _float(m.get("updated_time")),
                "status": _status(self.root / run, m),
                "rows": _int(m.get("rows")) or 0, "dropped_rows": _int(m.get("dropped_rows")) or 0,
                "last_step": last, "n_events": n_events, "parent": parent, "error": m.get("error"),
                "global_cols": json.loads(m.get("global_cols", "[]"))}

    @_readable
    def layers(self, run: str) -> list[dict]:
        """Watched parameters in row order: dicts with name, shape, order."""
        con = self._connect(run)
        try:
            rows = con.execute("SELECT name, shape, ord FROM layers ORDER BY idx").fetchall()
        finally:
            con.close()
        return [{"name": n, "shape": json.loads(s), "order": o} for n, s, o in rows]

    @_readable
    def events(self, run: str, start: int | None = None, end: int | None = None) -> list[Event]:
        """Events in step order, within a step from cause to consequence as ``guard.events``
        lists them (``gradguard.events.event_order``; ``start <= step <= end`` when given).

        Non-finite numbers in ``data`` come back as ``"NaN"`` / ``"Inf"`` / ``"-Inf"``
        (``gradguard._json.json_safe``), whichever gradguard version wrote the store.
        """
        lo, hi = _range(start, end)
        con = self._connect(run)
        try:
            rows = con.execute("SELECT step, kind, severity, layers, message, advice, data FROM events "
                               "WHERE step >= ? AND step <= ? ORDER BY step, id", (lo, hi)).fetchall()
        finally:
            con.close()
        return sorted((Event(step=s, kind=k, severity=sev, layers=json.loads(la), message=msg,
                             advice=json.loads(adv), data=_loads(d)) for s, k, sev, la, msg, adv, d in rows),
                      key=event_order)  # within a step: as the guard lists them (the sort is stable)

    # -------------------------------------------------------------- series
    @_readable
    def steps(self, run: str, start: int | None = None, end: int | None = None,
              max_points: int | None = None) -> dict[str, np.ndarray]:
        """Per-step global values, downsampled to at most ``max_points`` points.

        Args:
            run: run name.
            start, end: inclusive step range (None: open).
            max_points: None returns every row.  Otherwise, if more rows fall in
                range, rows are grouped into ``max_points // 2`` buckets and
                each bucket gives two points: its per-column minimum at its
                first step and its maximum at its last step.
        Returns:
            dict: ``step`` (int64) and one float32 array per global column
            (``loss``, ``global_norm``, ``clip_coef``, ``skipped``, ``bad``, ``lr`` ...).
        """
        con = self._connect(run)
        try:
            cols = json.loads(self._meta(con).get("global_cols", "[]"))
            agg, raw = self._read(con, ("gmin", "gmax"), start, end,
                                  None if max_points is None else max(1, _points(max_points) // 2),
                                  len(cols), 0)
        finally:
            con.close()
        if raw:
            out = {"step": agg["step_lo"]}
            vals = agg["gmin"]
        else:
            k = len(agg["n"])
            out = {"step": np.stack([agg["step_lo"], agg["step_hi"]], 1).reshape(2 * k)}
            vals = np.stack([agg["gmin"], agg["gmax"]], 1).reshape(2 * k, len(cols))
        for i, c in enumerate(cols):
            out[c] = vals[:, i]
        return out

    @_readable
    def layer_norms(self, run: str, start: int | None = None, end: int | None = None,
                    max_points: int | None = None) -> dict[str, np.ndarray]:
        """Steps x layers matrices for the heatmap, at most ``max_points`` step buckets.

        Returns:
            dict: ``step`` / ``step_hi`` (first / last step of each bucket),
            ``norm`` (bucket max of each layer's gradient L2 norm; NaN = no
            finite gradient), ``norm_min`` (bucket min), ``max_abs`` (bucket
            max of max |g|) and ``nonfinite`` (steps with NaN/Inf gradients),
            each (buckets, layers) float32.
        """
        con = self._connect(run)
        try:
            L = con.execute("SELECT count(*) FROM layers").fetchone()[0]
            agg, _ = self._read(con, ("nmax", "nmin", "xmax", "nfc"), start, end,
                                None if max_points is None else _points(max_points), 0, L)
        finally:
            con.close()
        return {"step": agg["step_lo"], "step_hi": agg["step_hi"], "norm": agg["nmax"],
                "norm_min": agg["nmin"], "max_abs": agg["xmax"], "nonfinite": agg["nfc"]}

    @_readable
    def param_norms(self, run: str, start: int | None = None, end: int | None = None) -> dict[str, np.ndarray]:
        """Per-layer parameter L2 norms on the steps that measured them (every
        ``Guard(param_norm_every=)`` steps), in the inclusive step range.

        Returns:
            dict: ``step`` (int64, measuring steps only) and ``norm`` (steps x layers float32).
            A run written by a gradguard without per-layer parameter norms gives no steps.
        """
        lo, hi = _range(start, end)
        con = self._connect(run)
        try:
            L = con.execute("SELECT count(*) FROM layers").fetchone()[0]
            has = _has_pnorms(con)
            rows = con.execute("SELECT steps, pidx, pnorms FROM chunks WHERE step_hi >= ? AND step_lo <= ? "
                               "AND pidx IS NOT NULL ORDER BY seq0", (lo, hi)).fetchall() if has else []
        finally:
            con.close()
        idx = [np.frombuffer(r[1], np.int32) for r in rows]
        steps = np.concatenate([np.frombuffer(r[0], np.int64)[i] for r, i in zip(rows, idx)] or
                               [np.empty(0, np.int64)])
        norms = np.frombuffer(b"".join(r[2] for r in rows), _F32).reshape(-1, L) if L else \
            np.empty((len(steps), 0), _F32)
        keep = (steps >= lo) & (steps <= hi)
        return {"step": steps[keep], "norm": norms[keep]}

    @_readable
    def buffer_norms(self, run: str, start: int | None = None, end: int | None = None) -> dict:
        """The watched buffers' L2 norms (BatchNorm running variances, measured every step) in the
        inclusive step range.

        Returns:
            dict: ``names`` (the buffers), ``step`` (int64) and ``norm`` (steps x buffers float32;
            NaN in rows written before buffers were stored).
        """
        lo, hi = _range(start, end)
        con = self._connect(run)
        try:
            meta = dict(con.execute("SELECT key, value FROM meta WHERE key = 'buffers'").fetchall())
            names = json.loads(meta.get("buffers", "[]"))
            has = names and any(c[1] == "bnorms" for c in con.execute("PRAGMA table_info(chunks)"))
            rows = con.execute("SELECT n, steps, bnorms FROM chunks WHERE step_hi >= ? AND step_lo <= ? "
                               "ORDER BY seq0", (lo, hi)).fetchall() if has else []
        finally:
            con.close()
        B = len(names)
        steps = np.concatenate([np.frombuffer(r[1], np.int64) for r in rows] or [np.empty(0, np.int64)])
        norms = np.concatenate([unpack_bnorms(r[2], r[0], B) for r in rows] or [np.empty((0, B), _F32)])
        keep = (steps >= lo) & (steps <= hi)
        return {"names": names, "step": steps[keep], "norm": norms[keep]}

    @_readable
    def layer_summary(self, run: str) -> list[dict]:
        """Per-layer table: ``layers()`` entries plus the gradient norm's latest / max / min, the
        number of steps with a non-finite gradient (over the whole run), ``weight`` (the latest
        measured parameter norm) and ``weight_growth`` (that over the first measured one; NaN
        where none was measured, or the first was 0)."""
        layers = self.layers(run)
        L = len(layers)
        con = self._connect(run)
        try:
            last = con.execute("SELECT n, norms FROM chunks ORDER BY seq0 DESC LIMIT 1").fetchone()
            top = con.execute("SELECT nmax, nmin, nfc FROM summary WHERE level = ?", (LEVELS,)).fetchall()
            measured = []
            if _has_pnorms(con):
                q = "SELECT pnorms FROM chunks WHERE length(pidx) > 0 ORDER BY seq0 {} LIMIT 1"
                measured = [con.execute(q.format(o)).fetchone() for o in ("ASC", "DESC")]
        finally:
            con.close()
        if measured and measured[0] and L:
            w0 = np.frombuffer(measured[0][0], _F32).reshape(-1, L)[0].astype(np.float64)
            w1 = np.frombuffer(measured[1][0], _F32).reshape(-1, L)[-1].astype(np.float64)
            with np.errstate(all="ignore"):
                growth = np.where(w0 > 0, w1 / w0, np.nan)
        else:
            w1 = growth = np.full(L, np.nan)
        latest = (np.frombuffer(last[1], _F32).reshape(last[0], L)[-1] if last else np.full(L, np.nan, _F32))
        if top:
            nmax = np.fmax.reduce(_blobs([t[0] for t in top], L), axis=0)
            nmin = np.fmin.reduce(_blobs([t[1] for t in top], L), axis=0)
            nfc = _blobs([t[2] for t in top], L).sum(0)
        else:
            nmax = nmin = np.full(L, np.nan, _F32)
            nfc = np.zeros(L, _F32)
        for i, d in enumerate(layers):
            d.update(latest=float(latest[i]), max=float(nmax[i]), min=float(nmin[i]), nonfinite=int(nfc[i]),
                     weight=float(w1[i]), weight_growth=float(growth[i]))
        return layers

    @_readable
    def skipped_steps(self, run: str) -> int:
        """Steps whose update was skipped (``skipped`` > 0), over the whole run.

        Reads only the global columns of the raw chunks (G floats per row, not the
        per-layer blobs): the run list shows it for every run."""
        con = self._connect(run)
        try:
            cols = json.loads(self._meta(con).get("global_cols", "[]"))
            if "skipped" not in cols:
                return 0
            k, G = cols.index("skipped"), len(cols)
            return int(sum(int((np.frombuffer(g, _F32).reshape(-1, G)[:, k] > 0).sum())
                           for (g,) in con.execute("SELECT glob FROM chunks")))
        finally:
            con.close()

    # ------------------------------------------------------------ internals
    def _read(self, con, fields, start, end, buckets, G, L):
        """Aggregates over ``[start, end]`` with at most ``buckets`` entries.

        Reads the finest pyramid level with at most 4x that many buckets in
        range (raw chunks when few enough rows), then groups consecutive
        entries down to ``buckets``.  Returns (agg dict, raw: bool).
        """
        lo, hi = _range(start, end)
        level = 0
        if buckets is not None:
            cap = 4 * buckets
            for lv in range(1, LEVELS + 1):
                cnt = con.execute("SELECT count(*) FROM summary WHERE level = ? AND step_hi >= ? "
                                  "AND step_lo <= ?", (lv, lo, hi)).fetchone()[0]
                if lv == 1 and cnt * 8 <= cap:
                    break
                level = lv
                if cnt <= cap:
                    break
        width = {"gmin": G, "gmax": G}
        if level == 0:
            agg = self._read_raw(con, lo, hi, G, L)
            agg = {k: agg[k] for k in ("n", "step_lo", "step_hi") + tuple(fields)}
        else:
            rows = con.execute(f"SELECT n, step_lo, step_hi, {', '.join(fields)} FROM summary "
                               "WHERE level = ? AND step_hi >= ? AND step_lo <= ? ORDER BY bucket",
                               (level, lo, hi)).fetchall()
            agg = {"n": np.array([r[0] for r in rows], np.int64),
                   "step_lo": np.array([r[1] for r in rows], np.int64),
                   "step_hi": np.array([r[2] for r in rows], np.int64)}
            for j, f in enumerate(fields):
                agg[f] = _blobs([r[3 + j] for r in rows], width.get(f, L))
        m = len(agg["n"])
        raw = level == 0
        if buckets is not None and m > buckets:
            agg = reduce_groups(agg, np.arange(0, m, -(-m // buckets)))
            raw = False
        return agg, raw

    def _read_raw(self, con, lo, hi, G, L) -> dict:
        rows = con.execute("SELECT n, steps, glob, norms, maxabs FROM chunks WHERE step_hi >= ? "
                           "AND step_lo <= ? ORDER BY seq0", (lo, hi)).fetchall()
        steps = np.frombuffer(b"".join(r[1] for r in rows), np.int64)
        glob = np.frombuffer(b"".join(r[2] for r in rows), _F32).reshape(-1, G) if G else \
            np.empty((len(steps), 0), _F32)
        norms = np.frombuffer(b"".join(r[3] for r in rows), _F32).reshape(-1, L) if L else \
            np.empty((len(steps), 0), _F32)
        maxabs = np.frombuffer(b"".join(r[4] for r in rows), _F32).reshape(-1, L) if L else \
            np.empty((len(steps), 0), _F32)
        keep = (steps >= lo) & (steps <= hi)
        if not keep.all():
            steps, glob, norms, maxabs = steps[keep], glob[keep], norms[keep], maxabs[keep]
        return raw_aggregates(steps, glob, norms, maxabs)


def _has_pnorms(con) -> bool:
    """Whether the store has parameter-norm columns (schema v2; a v1 store has none)."""
    return any(c[1] == "pnorms" for c in con.execute("PRAGMA table_info(chunks)"))


def _points(max_points) -> int:
    return check_int("max_points", max_points, 2)


def _loads(text: str):
    # Stores written before the shared JSON convention hold bare NaN/Infinity
    # tokens (json.loads reads them); both forms come back as "NaN"/"Inf"/"-Inf".
    return json_safe(json.loads(text))


def _range(start, end) -> tuple[int, int]:
    for name, v in (("start", start), ("end", end)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise TypeError(f"{name} must be an int step or None, got {v!r}")
    # Clamped: SQLite integers are 64-bit, and no step lies beyond +-2**62 anyway.
    lo = -_STEP_MAX if start is None else max(-_STEP_MAX, min(_STEP_MAX, int(start)))
    hi = _STEP_MAX if end is None else max(-_STEP_MAX, min(_STEP_MAX, int(end)))
    return lo, hi


def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _int(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _writer_gone(run_dir: Path) -> bool:
    """True when the run's writer lock exists and nobody holds it: the writer process is gone
    (the kernel releases the lock when a process dies, whatever its pid)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False  # no lock file (a store from before locks): the heartbeat decides
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False  # held: a live writer
    else:
        return True
    finally:
        os.close(fd)


def _status(run_dir: Path, m: dict) -> str:
    status = m.get("status", "running")
    if status != "running":
        return status
    if _writer_gone(run_dir):
        return "interrupted"
    beat = _float(m.get("heartbeat_s")) or 5.0
    updated = _float(m.get("updated_time"))
    if updated is None or time.time() - updated > max(STALE_HEARTBEATS * beat, STALE_MIN_SECONDS):
        return "stale"
    return "running"

