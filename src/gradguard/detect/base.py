"""The Detector base class: one rule per detector, evaluated on a whole batch of rows.

A detector is bound to a ``RunInfo`` (names, shapes, owning module types), never to
the guard, and reads rows (numpy float32, layout ``gradguard.layout``) by column name.

How a rule runs (``Detector.update``): ``_scan`` evaluates the rule on every row of
the batch at once, from the current state, as if no earlier row of the batch had
fired.  That is exact up to and including the first row that fires.  The rows before
it are absorbed at once (``_absorb``), the firing row is handled (``_fire``: its event,
and whatever firing changes in the state), and the rest of the batch is scanned again
-- or, for a detector whose state does not depend on firing (``rescan = False``),
read on from the same scan.  A single row is a batch of one, so feeding the rows in
any chunking gives the same events and the same state.
"""
from __future__ import annotations

import math

import numpy as np

from ..advice import advice_for
from .._json import json_safe
from ..events import Event
from ..layout import COL

SEV = {"info": 0, "warning": 1, "critical": 2}


def check_pos(name: str, v, *, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
            or (v == 0 and not allow_zero):
        rng = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {rng}, got {v!r}")
    return float(v)


def check_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def check_unit(name: str, v) -> float:
    """A number in (0, 1] (NaN fails)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {v!r}")
    return float(v)


def valid_global(rows: np.ndarray) -> np.ndarray:
    """Indices of rows with no NaN/Inf and a finite, positive global norm."""
    g = rows[:, COL["global_norm"]].astype(np.float64)
    return np.flatnonzero((rows[:, COL["bad"]] == 0) & np.isfinite(g) & (g > 0))  # NaN compares False


class Detector:
    """Base class: binding, the batch loop, cooldown, advice and state.

    Subclasses implement ``_scan(steps, rows) -> Scan`` (``fired``: the rows where the rule
    holds, judged from the current state), ``_absorb(scan, a, b)`` (take rows ``a:b``,
    none of which fires, into the state) and ``_fire(scan, k) -> Event | None``.

    A detector emits at most one event of its kind per ``cooldown`` steps,
    unless the new event is more severe than the last one.
    """

    kind = ""
    rescan = True  # does handling a firing row change what the later rows of the batch see?

    def __init__(self, cooldown: int):
        self.cooldown = check_int("cooldown", cooldown, 0)
        self._last_step = -(10 ** 12)
        self._last_sev = -1

    # -- wiring
    def bind(self, run) -> None:
        """Attach to a run (a ``gradguard.layout.RunInfo``)."""
        self.run = run
        self.names = list(run.names)
        self.n = len(self.names)
        self.layout = run.layout
        self.weight_idx = run.weight_idx

    def update(self, steps, rows: np.ndarray, run=None) -> list[Event]:
        """Events for ``rows`` (float32, one per step in ``steps``), in step order."""
        if not isinstance(steps, np.ndarray) or steps.dtype != np.int64:
            steps = np.asarray(steps, np.int64)
        rows = np.asarray(rows)
        if rows.ndim == 1:
            rows = rows[None]
        out: list[Event] = []
        i, total = 0, len(steps)
        while i < total:
            scan = self._scan(steps[i:], rows[i:]) if i else self._scan(steps, rows)
            start = 0
            for k in scan.fired:
                self._absorb(scan, start, k)
                ev = self._fire(scan, k)
                if ev is not None:
                    out.append(ev)
                start = k + 1
                if self.rescan:
                    break  # the rest of the batch is judged again, against the new state
            else:
                self._absorb(scan, start, total - i)
                break
            i += start
        return out

    def _scan(self, steps: np.ndarray, rows: np.ndarray):
        raise NotImplementedError

    def _absorb(self, scan, a: int, b: int) -> None:
        raise NotImplementedError

    def _fire(self, scan, k: int) -> Event | None:
        raise NotImplementedError

    # -- helpers
    def _emit(self, step, severity, layers, message, data) -> Event | None:
        sev = SEV[severity]
        if step - self._last_step < self.cooldown and sev <= self._last_sev:
            return None
        self._last_step, self._last_sev = int(step), sev
        adv = advice_for(self.kind, layers, self.run.owner, self.run.module_types, data)
        return Event(int(step), self.kind, severity, list(layers), message, adv, json_safe(data))

    def _base_state(self) -> dict:
        return {"last_step": self._last_step, "last_sev": self._last_sev}

    def _load_base(self, sd: dict) -> None:
        self._last_step = int(sd["last_step"])
        self._last_sev = int(sd["last_sev"])

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, sd: dict) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Scan:
    """What ``_scan`` found: ``fired`` (ascending batch-row indices of the rows where the rule
    holds), ``n`` (rows scanned), ``idx`` (the rows the rule reads, ascending) and whatever else
    the detector keeps (attributes)."""

    def __init__(self, fired: list, n: int, idx: np.ndarray, **kw):
        self.fired, self.n, self.idx = fired, n, idx
        self.__dict__.update(kw)

    def span(self, a: int, b: int) -> tuple[int, int]:
        """Positions in ``idx`` of the rows ``a:b``."""
        if a == 0 and b >= self.n:
            return 0, len(self.idx)
        ja, jb = np.searchsorted(self.idx, (a, b)).tolist()  # numpy, no host sync
        return ja, jb

    def at(self, k: int) -> int:
        """Position in ``idx`` of row ``k`` (a row the rule read)."""
        return int(np.searchsorted(self.idx, k))
