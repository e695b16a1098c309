"""UnusedDetector: trainable parameters that never received a gradient."""
from __future__ import annotations

import numpy as np

from . import _window as W
from .base import Detector, Scan, check_int


class UnusedDetector(Detector):
    """Trainable parameters that never received a gradient (an unused layer, a detached branch).

    After ``patience`` steps, one warning event names every parameter with
    ``requires_grad=True`` (``RunInfo.trainable``) that had no gradient on any step
    so far (in the rows, "no gradient" is a NaN norm).  Frozen parameters are not
    reported.
    """

    kind = "unused"

    def __init__(self, patience: int = 100):
        super().__init__(cooldown=0)
        self.patience = check_int("patience", patience, 1)
        self._seen: np.ndarray | None = None
        self._count = 0
        self._done = False

    def bind(self, run):
        super().bind(run)
        self._trainable = np.asarray(run.trainable, dtype=bool).reshape(self.n)
        if self._seen is None or len(self._seen) != self.n:
            self._seen = np.zeros(self.n, dtype=bool)

    def _scan(self, steps, rows):
        fired = []
        if not self._done and self._count + len(rows) >= self.patience:
            fired = [max(self.patience - self._count - 1, 0)]  # the row that completes the count
        return Scan(fired, len(rows), None, steps=steps, rows=rows)

    def _absorb(self, s, a, b):
        if b > a and not self._done:
            self._seen |= ~np.isnan(self.layout.norms(s.rows[a:b])).all(0)
            self._count += b - a

    def _fire(self, s, k):
        self._absorb(s, k, k + 1)
        self._done = True
        never = [self.names[i] for i in np.flatnonzero(self._trainable & ~self._seen)]
        if not never:
            return None
        return self._emit(s.steps[k], "warning", never,
                          f"{len(never)} trainable parameter(s) got no gradient in {self._count} steps "
                          f"({W.names_list(never)}): they are not trained.", {"steps": self._count})

    def state_dict(self):
        return {"seen": self._seen.tolist() if self._seen is not None else None,  # numpy, no host sync
                "count": self._count, "done": self._done}

    def load_state_dict(self, sd):
        if sd.get("seen") is not None:
            self._seen = np.array(sd["seen"], dtype=bool)
        self._count = int(sd["count"])
        self._done = bool(sd["done"])
