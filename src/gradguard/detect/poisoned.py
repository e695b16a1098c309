"""When the guard keeps seeing poisoned steps: one critical event (``PoisonedRunDetector``),
then ``on_nonfinite``'s budget is spent and the run is declared dead (``DeadRunBudget``)."""
from __future__ import annotations

import numpy as np

from .._validate import check_int as check_arg
from ..events import RunIsDeadError
from ..layout import COL, RowLayout
from . import _window as W
from ._window import names_list
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


class DeadRunBudget:
    """``Guard(nonfinite_budget=N)``: ``N`` consecutive poisoned steps, then ``RunIsDeadError``.

    Under ``on_nonfinite="skip"`` a run whose weights or data went NaN is skipped forever and
    trains nothing; under ``"warn"`` it applies NaN forever.  The streak is counted from the
    rows at each flush (they are read back anyway: no host sync of its own), so on an
    accelerator the error comes at the first flush after the budget is spent (up to
    ``flush_every - 1`` steps later); on CPU a poisoned step is flushed at once.  ``update``
    returns the error for the guard to raise once the flush's rows and events are recorded.

    Args:
        budget: consecutive poisoned steps tolerated (an int >= 1), or None: never raise.
    """

    def __init__(self, budget: int | None):
        self.budget = None if budget is None else check_arg("nonfinite_budget", budget, 1)
        self._streak, self._first = 0, -1

    def update(self, steps, rows: np.ndarray, run) -> RunIsDeadError | None:
        bad = np.asarray(rows)[:, COL["bad"]] > 0
        if not len(bad):
            return None
        streak = int(W.runs(bad, self._streak)[-1])  # the same run length PoisonedRunDetector counts
        if streak <= len(bad):  # the streak began in this flush (or there is none)
            self._first = int(steps[len(bad) - streak]) if streak else -1
        self._streak = streak
        if self.budget is None or self._streak < self.budget:
            return None
        return self._error(int(steps[-1]), rows[-1], run)

    def _error(self, step: int, row: np.ndarray, run) -> RunIsDeadError:
        names = list(run.names)
        max_abs = RowLayout(len(names)).max_abs(np.asarray(row)).astype(np.float64)
        layers = [names[i] for i in np.flatnonzero(~np.isfinite(max_abs))][::-1]  # output side back
        what = (f"NaN/Inf in the gradients of {names_list(layers)}" if layers else
                "the loss is NaN/Inf" if row[COL["loss_bad"]] > 0 else "the global grad norm overflowed")
        done = ("every one skipped: the model has not trained since" if row[COL["skipped"]] > 0
                else "every one applied anyway: the weights are likely NaN")
        msg = (f"the run is dead: {self._streak} consecutive poisoned steps (steps {self._first}-{step}, "
               f"{done}); {what}. nonfinite_budget={self.budget} is spent. Restore the last good "
               f"checkpoint, then lower the learning rate or clip the gradients, and check the batch "
               f"of step {self._first} and the inputs/weights of the layers named (Guard(..., "
               "nonfinite_budget=None) skips forever instead).")
        return RunIsDeadError(msg, step, layers, self._first, self._streak)

    def state_dict(self) -> dict:
        return {"streak": self._streak, "first": self._first}

    def load_state_dict(self, sd: dict) -> None:
        self._streak, self._first = int(sd["streak"]), int(sd["first"])
