"""Read-only access to a log dir of runs: what the dashboard, report and CLI read.

Every query opens its own read-only SQLite connection, so a ``RunStore`` may
be shared by threads and read while a training process is still writing (WAL
lets readers see the last committed flush).  Long ranges come back
downsampled from the min/max pyramid (``schema.py``): each bucket keeps its
min and max, so a one-step spike in a million steps stays visible.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
from pathlib import Path

import numpy as np

from .._json import json_safe
from .._validate import check_int
from ..events import Event
from .schema import DB_NAME, LEVELS, RUN_NAME_RE, SCHEMA_VERSION, raw_aggregates, reduce_groups

__all__ = ["RunStore", "RunNotFound"]

_F32 = np.float32


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
        >>> store = RunStore("runs")
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
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            con.close()
            raise ValueError(f"run {run!r} was written with store schema v{version}; this gradguard "
                             f"reads up to v{SCHEMA_VERSION}: upgrade gradguard")
        return con

    def _meta(self, con) -> dict:
        return dict(con.execute("SELECT key, value FROM meta").fetchall())

    # ---------------------------------------------------------------- runs
    def runs(self) -> list[dict]:
        """Every run, oldest first.

        Returns:
            list of dicts: name, config (dict), start_time / end_time (epoch
            seconds or None), status (``running`` | ``finished`` |
            ``interrupted``: the writing process died), rows, last_step
            (None before the first flush), n_events.
        """
        out = []
        if not self.root.is_dir():
            return out
        for d in sorted(self.root.iterdir()):
            if not (d / DB_NAME).is_file() or not RUN_NAME_RE.match(d.name):
                continue
            try:
                out.append(self.info(d.name))
            except (sqlite3.Error, ValueError, RunNotFound):
                continue  # a run being created, or from a newer gradguard: skip in listings
        out.sort(key=lambda r: (r["start_time"] or 0, r["name"]))
        return out

    def info(self, run: str) -> dict:
        """One entry of ``runs()`` (plus ``global_cols``)."""
        con = self._connect(run)
        try:
            m = self._meta(con)
            last = con.execute("SELECT max(step_hi) FROM chunks").fetchone()[0]
            n_events = con.execute("SELECT count(*) FROM events").fetchone()[0]
        finally:
            con.close()
        status = m.get("status", "running")
        if status == "running" and m.get("host") == socket.gethostname() and not _alive(m.get("pid")):
            status = "interrupted"
        return {"name": run, "config": _loads(m.get("config", "{}")),
                "start_time": _float(m.get("start_time")), "end_time": _float(m.get("end_time")),
                "updated_time": _float(m.get("updated_time")), "status": status,
                "rows": int(m.get("rows", 0)), "last_step": last, "n_events": n_events,
                "global_cols": json.loads(m.get("global_cols", "[]"))}

    def layers(self, run: str) -> list[dict]:
        """Watched parameters in row order: dicts with name, shape, order."""
        con = self._connect(run)
        try:
            rows = con.execute("SELECT name, shape, ord FROM layers ORDER BY idx").fetchall()
        finally:
            con.close()
        return [{"name": n, "shape": json.loads(s), "order": o} for n, s, o in rows]

    def events(self, run: str, start: int | None = None, end: int | None = None) -> list[Event]:
        """Events in step order (``start <= step <= end`` when given).

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
        return [Event(step=s, kind=k, severity=sev, layers=json.loads(la), message=msg,
                      advice=json.loads(adv), data=_loads(d)) for s, k, sev, la, msg, adv, d in rows]

    # -------------------------------------------------------------- series
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

    def layer_summary(self, run: str) -> list[dict]:
        """Per-layer table: ``layers()`` entries plus latest / max / min norm and
        the number of steps with a non-finite gradient (over the whole run)."""
        layers = self.layers(run)
        L = len(layers)
        con = self._connect(run)
        try:
            last = con.execute("SELECT n, norms FROM chunks ORDER BY seq0 DESC LIMIT 1").fetchone()
            top = con.execute("SELECT nmax, nmin, nfc FROM summary WHERE level = ?", (LEVELS,)).fetchall()
        finally:
            con.close()
        latest = (np.frombuffer(last[1], _F32).reshape(last[0], L)[-1] if last else np.full(L, np.nan, _F32))
        if top:
            nmax = np.fmax.reduce(_blobs([t[0] for t in top], L), axis=0)
            nmin = np.fmin.reduce(_blobs([t[1] for t in top], L), axis=0)
            nfc = _blobs([t[2] for t in top], L).sum(0)
        else:
            nmax = nmin = np.full(L, np.nan, _F32)
            nfc = np.zeros(L, _F32)
        for i, d in enumerate(layers):
            d.update(latest=float(latest[i]), max=float(nmax[i]), min=float(nmin[i]), nonfinite=int(nfc[i]))
        return layers

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
    return (-(2 ** 62) if start is None else int(start)), (2 ** 62 if end is None else int(end))


def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True

