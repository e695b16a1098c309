"""PoisonedRunDetector: one critical event when the guard keeps seeing poisoned steps."""
from __future__ import annotations

import numpy as np

from ..layout import COL
from . import _window as W
from .base import Detector, Scan, check_int


class PoisonedRunDetector(Detector):
    """``patience`` consecutive poisoned steps (NaN/Inf gradients or loss): the run is dead.

    The core reports every poisoned step (``nonfinite``); a run whose weights or data went
    NaN is poisoned on every step after, and skipping (or applying) forever says nothing new.
    This detector raises one critical ``nonfinite`` event when a streak reaches ``patience``
    steps, with the streak's first step and length, and again only after a clean step has
    ended the streak.  Culprits: the tensors whose gradients are non-finite on the streak's
    ``patience``-th step, from the output side back.

    Args:
        patience: consecutive poisoned steps (default 20).
    """

    kind = "nonfinite"
    rescan = False  # the streak counter is the same whether a row fires or not

    def __init__(self, patience: int = 20):
        super().__init__(0)
        self.patience = check_int("patience", patience, 1)
        self._streak = 0

    def _scan(self, steps, rows):
        run = W.runs(rows[:, COL["bad"]] > 0, self._streak)
        fired = np.flatnonzero(run == self.patience).tolist()  # numpy, no host sync
        return Scan(fired, len(rows), np.arange(len(rows)), rows=rows, steps=steps, run=run)

    def _absorb(self, s, a, b):
        if b > a:
            self._streak = int(s.run[b - 1])

    def _fire(self, s, k):
        self._absorb(s, k, k + 1)
        step = int(s.steps[k])
        bad = np.flatnonzero(~np.isfinite(self.layout.max_abs(s.rows[k]).astype(np.float64)))
        layers = [self.names[i] for i in bad][::-1]
        first = step - self.patience + 1
        skipped = bool(s.rows[k, COL["skipped"]] > 0)
        what = ("every one of them skipped: training has stopped" if skipped
                else "every one of them applied anyway: the weights are likely NaN")
        return self._emit(step, "critical", layers,
                          f"{self.patience} consecutive poisoned steps (since step {first}), {what}. "
                          "The run is dead: restore a checkpoint and fix the cause.",
                          {"count": self.patience, "first_step": first, "last_step": step,
                           "skipped": skipped})

    def state_dict(self):
        return {**self._base_state(), "streak": self._streak}

    def load_state_dict(self, sd):
        self._load_base(sd)
        self._streak = int(sd["streak"])
