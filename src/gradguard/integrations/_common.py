"""Pieces shared by the adapters: a stand-in optimizer and a log window.

Frameworks call ``optimizer.step()`` themselves, so an adapter needs the Guard's
decision (statistics, clipping, skip?) without the Guard stepping.  The Guard
is given a ``DecisionOptimizer``: it shares the real optimizer's
``param_groups`` and ``state`` (so the lr column and remedies that touch the
groups see the real values) and its ``step()`` only records that the guard
would have stepped.  The adapter then lets the framework step, or withholds
the step by the framework's own means.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..guard import GLOBAL_COLS

__all__ = ["DecisionOptimizer", "LogWindow", "withhold_step", "check_on_nonfinite"]


class DecisionOptimizer(torch.optim.Optimizer):
    """Stands in for ``real`` inside a Guard: ``step()`` records "go" and does nothing else.

    Args:
        real: the optimizer the framework steps (a ``torch.optim.Optimizer``,
            or anything with ``param_groups`` and ``state``).
    """

    # No super().__init__: the groups and the state are the real optimizer's own objects.
    def __init__(self, real):  # noqa: D107
        self.real = real
        self.param_groups = real.param_groups
        self.state = real.state
        self.defaults = getattr(real, "defaults", {})
        self.go = False

    def step(self, closure=None):
        """Record that the guard decided to step (called by ``Guard.step``)."""
        self.go = True
        return None

    def zero_grad(self, set_to_none: bool = True):
        self.real.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.real.state_dict()

    def load_state_dict(self, state_dict):
        self.real.load_state_dict(state_dict)

    def __repr__(self):
        return f"DecisionOptimizer({type(self.real).__name__})"


def withhold_step(params) -> None:
    """Withhold the coming ``optimizer.step()`` by setting every gradient to None.

    torch optimizers update only parameters that have a gradient, and create or
    advance their state only for those, so the step that follows leaves weights
    and optimizer state bitwise unchanged.  Used where the framework, not the
    adapter, calls ``optimizer.step()``.
    """
    for p in params:
        p.grad = None


def check_on_nonfinite(value) -> str:
    from ..guard import ON_NONFINITE

    if value not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {value!r}")
    return value


class LogWindow:
    """A detector that finds nothing: it summarises the rows flushed since the last ``read()``.

    Frameworks log every N steps; this gives them the window's max/mean global
    norm, smallest clip coefficient and skipped steps from rows the guard
    already reads back, so logging adds no host sync of its own.
    """

    _COLS = ("skipped", "bad", "global_norm", "clip_coef")

    def __init__(self):
        self._idx = {c: GLOBAL_COLS.index(c) for c in self._COLS}
        self._reset()

    def _reset(self):
        self._n, self._skipped, self._bad = 0, 0, 0
        self._gn_sum, self._gn_n, self._gn_max = 0.0, 0, -math.inf
        self._coef_min = math.inf

    def bind(self, guard) -> None:
        pass

    def update(self, steps, rows, guard) -> list:
        if not len(steps):
            return []
        rows = np.asarray(rows)
        gn = rows[:, self._idx["global_norm"]].astype(np.float64)
        fin = np.isfinite(gn)  # a poisoned step's norm stays out of the summaries
        self._n += len(steps)
        self._skipped += int((rows[:, self._idx["skipped"]] > 0).sum())
        self._bad += int((rows[:, self._idx["bad"]] > 0).sum())
        if fin.any():
            self._gn_sum += float(gn[fin].sum())
            self._gn_n += int(fin.sum())
            self._gn_max = max(self._gn_max, float(gn[fin].max()))
        coef = rows[:, self._idx["clip_coef"]].astype(np.float64)
        coef = coef[np.isfinite(coef)]
        if coef.size:
            self._coef_min = min(self._coef_min, float(coef.min()))
        return []

    def read(self, prefix: str = "gradguard/") -> dict:
        """The window's summary (empty if no step was flushed) and a fresh window."""
        if self._n == 0:
            return {}
        out = {f"{prefix}steps": self._n, f"{prefix}skipped": self._skipped,
               f"{prefix}nonfinite": self._bad}
        if self._gn_n:
            out[f"{prefix}global_norm_max"] = self._gn_max
            out[f"{prefix}global_norm_mean"] = self._gn_sum / self._gn_n
        if math.isfinite(self._coef_min):
            out[f"{prefix}clip_coef_min"] = self._coef_min
        self._reset()
        return out

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
