"""OverClippingDetector: the clip threshold freezing training."""
from __future__ import annotations

from collections import deque

import numpy as np

from ..layout import COL
from ._window import runs
from .base import Detector, Scan, check_int, check_pos, check_unit


class OverClippingDetector(Detector):
    """The clip threshold freezing training.

    - tiny: the clip coefficient < ``tiny`` for ``tiny_steps`` consecutive
      steps (critical: updates are scaled to almost nothing).
    - frequent: clipped (coefficient < 1) on at least ``frac`` of the last
      ``window`` steps (warning).

    Silent when no clipping policy is set (the coefficient is then 1).

    Args:
        tiny: coefficient floor (default 1e-3).
        tiny_steps: consecutive steps (default 10).
        window: steps for the clipping rate (default 200).
        frac: clipping rate that fires (default 0.95).
        cooldown: steps between two events (default 500).
    """

    kind = "over_clipping"
    rescan = False  # the windows go on the same way whether a row fires or not

    def __init__(self, tiny: float = 1e-3, tiny_steps: int = 10, window: int = 200,
                 frac: float = 0.95, cooldown: int = 500):
        super().__init__(cooldown)
        self.tiny = check_pos("tiny", tiny)
        self.tiny_steps = check_int("tiny_steps", tiny_steps, 1)
        self.window = check_int("window", window, 1)
        self.frac = check_unit("frac", frac)
        self._run = 0
        self._clipped: deque = deque(maxlen=self.window)
        self._coefs: deque = deque(maxlen=self.window)
        self._gnorms: deque = deque(maxlen=self.window)

    def _scan(self, steps, rows):
        c = rows[:, COL["clip_coef"]].astype(np.float64)
        g = rows[:, COL["global_norm"]].astype(np.float64)
        idx = np.flatnonzero((rows[:, COL["bad"]] == 0) & np.isfinite(c) & np.isfinite(g))
        c, g = c[idx], g[idx]
        run = runs(c < self.tiny, self._run)
        clipped = c < 1.0 - 1e-6
        # clipping count over the window ending at each row (the row included)
        cs = np.concatenate([[0], np.cumsum(np.concatenate([np.fromiter(self._clipped, bool, len(self._clipped)),
                                                           clipped]))])
        end = len(self._clipped) + np.arange(1, len(idx) + 1)
        count = cs[end] - cs[np.maximum(end - self.window, 0)]
        full = np.minimum(end, self.window) == self.window
        rate = count / self.window
        frequent = full & (count >= self.frac * self.window) & (rate >= self.frac)
        fired = idx[(run >= self.tiny_steps) | frequent].tolist()  # numpy, no host sync
        return Scan(fired, len(rows), idx, steps=steps, c=c.tolist(), g=g.tolist(),  # numpy, no host sync
                    clipped=clipped.tolist(), run=run, rate=rate)  # numpy, no host sync

    def _absorb(self, s, a, b):
        ja, jb = s.span(a, b) if b > a else (0, 0)
        if jb > ja:
            self._run = int(s.run[jb - 1])
            self._clipped.extend(s.clipped[ja:jb])
            self._coefs.extend(s.c[ja:jb])
            self._gnorms.extend(s.g[ja:jb])

    def _fire(self, s, k):
        j = s.at(k)
        self._absorb(s, k, k + 1)
        c, g = s.c[j], s.g[j]
        med_g = float(np.median(self._gnorms))
        data = {"clip_coef": c, "global_norm": g, "median_norm": med_g}
        if self._run >= self.tiny_steps:
            return self._emit(s.steps[k], "critical", [],
                              f"clip coefficient has been below {self.tiny:g} for {self._run} steps "
                              f"(now {c:.2g}, pre-clip norm {g:.3g}): updates are scaled to almost "
                              f"nothing.", data)
        rate = float(s.rate[j])
        data["rate"] = rate
        return self._emit(s.steps[k], "warning", [],
                          f"gradients were clipped on {rate:.0%} of the last {self.window} "
                          f"steps (median coefficient {float(np.median(self._coefs)):.2g}, median "
                          f"pre-clip norm {med_g:.3g}).", data)

    def state_dict(self):
        return {**self._base_state(), "run": self._run, "clipped": list(self._clipped),
                "coefs": list(self._coefs), "gnorms": list(self._gnorms)}

    def load_state_dict(self, sd):
        self._load_base(sd)
        self._run = int(sd["run"])
        self._clipped = deque([bool(x) for x in sd["clipped"]], maxlen=self.window)
        self._coefs = deque(sd["coefs"], maxlen=self.window)
        self._gnorms = deque(sd["gnorms"], maxlen=self.window)
