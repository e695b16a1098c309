"""Pieces shared by the adapters.

Frameworks call ``optimizer.step()`` themselves, so an adapter asks the Guard for
its decision with ``guard.check(loss=...)`` (statistics, clipping, the skip
decision, the row; no optimizer step) and withholds the framework's step by the
framework's own means when ``report.skipped``.  Logging windows are row
observers (``guard.add_row_observer``): they summarise the rows a flush reads
back anyway.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .._validate import check_choice
from ..decide import ON_NONFINITE
from ..layout import COL

__all__ = ["GroupsView", "DecisionOptimizer", "LogWindow", "withhold_step", "check_on_nonfinite"]

class GroupsView(torch.optim.Optimizer):
    """A torch ``Optimizer`` face for something that only has ``param_groups`` (a Keras
    optimizer's learning rate): the Guard records its lr and remedies change it.  It is
    never stepped (adapters use ``guard.check``).

    Args:
        real: anything with ``param_groups`` and ``state``.
    """

    # No super().__init__: the groups and the state are the real object's own.
    def __init__(self, real):  # noqa: D107
        self.real = real
        self.param_groups = real.param_groups
        self.state = real.state
        self.defaults = getattr(real, "defaults", {})

    def step(self, closure=None):
        raise RuntimeError("GroupsView is not stepped: the adapter steps the real optimizer")

    def zero_grad(self, set_to_none: bool = True):
        self.real.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.real.state_dict() if hasattr(self.real, "state_dict") else {}

    def load_state_dict(self, state_dict):
        if hasattr(self.real, "load_state_dict"):
            self.real.load_state_dict(state_dict)

    def __repr__(self):
        return f"GroupsView({type(self.real).__name__})"


DecisionOptimizer = GroupsView  # the 0.1 name, kept for one release


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
    return check_choice("on_nonfinite", value, ON_NONFINITE)


class LogWindow:
    """A row observer: it summarises the rows flushed since the last ``read()``.

    Frameworks log every N steps; this gives them the window's max/mean global
    norm, smallest clip coefficient and skipped steps from rows the guard
    already reads back, so logging adds no host sync of its own.
    """

    _COLS = ("skipped", "bad", "global_norm", "clip_coef")

    def __init__(self):
        self._idx = {c: COL[c] for c in self._COLS}
        self._reset()

    def _reset(self):
        self._n, self._skipped, self._bad = 0, 0, 0
        self._gn_sum, self._gn_n, self._gn_max = 0.0, 0, -math.inf
        self._coef_min = math.inf

    def __call__(self, steps, rows) -> None:
        if not len(steps):
            return
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
