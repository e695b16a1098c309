"""WeightGrowthDetector: the parameter norm growing fast, becoming very large, or non-finite."""
from __future__ import annotations

import math
from collections import deque

import numpy as np

from .._json import array_to_list, list_to_array
from ..layout import COL
from . import _window as W
from .base import Detector, Scan, check_int, check_pos


class WeightGrowthDetector(Detector):
    """Parameter norms growing fast, becoming very large, or non-finite.

    Reads the ``param_norm`` column (total parameter L2 norm, recorded by the
    guard every ``param_norm_every`` steps; NaN rows in between are ignored)
    and works on the RMS weight, ``param_norm / sqrt(numel)``:

    - growth: RMS >= ``growth`` x its minimum over the last ``window`` steps;
    - large: RMS >= ``max_rms`` (critical);
    - non-finite parameters (critical).

    The detector never reads the parameters.  Culprits are the tensors whose
    gradient norm at the firing step is largest relative to their reference:
    each tensor's parameter norm when the guard was built
    (``RunInfo.init_layer_norms``), or, without it, the tensor's gradient norm on
    the first step with a measured parameter norm.

    Args:
        growth: growth factor over the window (default 10).
        window: steps (default 200).
        max_rms: RMS weight limit (default 100).
        cooldown: steps between two events (default 200).
    """

    kind = "weight_growth"
    rescan = False  # every measured row enters the window as it is, firing or not
    # The rule reads one row in param_norm_every (the measuring steps): a short Python loop over
    # those rows is cheaper than array set-up for a handful of values.

    def __init__(self, growth: float = 10.0, window: int = 200, max_rms: float = 100.0,
                 cooldown: int = 200):
        super().__init__(cooldown)
        self.growth = check_pos("growth", growth)
        self.window = check_int("window", window, 1)
        self.max_rms = check_pos("max_rms", max_rms)
        self._hist: deque = deque()  # (step, rms)
        self._init: np.ndarray | None = None  # per-tensor reference norms (see the class doc)
        self._ref = "weights"  # what _init holds: "weights" (parameter norms) or "gradients"

    def bind(self, run):
        super().bind(run)
        self._numel = max(run.numel, 1)
        self._every = int(run.param_norm_every or 0)
        if self._init is None and run.init_layer_norms is not None:
            self._init, self._ref = np.asarray(run.init_layer_norms, np.float64), "weights"

    def _scan(self, steps, rows):
        pn = rows[:, COL["param_norm"]]
        # rows with a measurement: a number, or NaN on a measuring step (a NaN in between: not measured)
        read = ~np.isnan(pn)
        if self._every > 0:
            read |= steps % self._every == 0
        idx = np.flatnonzero(read)
        if not len(idx):
            return Scan([], len(rows), idx)
        p = pn[idx].astype(np.float64).tolist()  # numpy, no host sync
        st = steps[idx].tolist()  # numpy, no host sync
        rms = [v / math.sqrt(self._numel) for v in p]
        # the minimum RMS over the `window` steps before each row: the history, then the earlier rows
        hist = list(self._hist)
        lo, fired = [], []
        for j, (s, v, r) in enumerate(zip(st, p, rms)):
            if not math.isfinite(v):
                lo.append(math.nan)
                fired.append(int(idx[j]))
                continue
            hist = [e for e in hist if e[0] >= s - self.window]
            m = min((e[1] for e in hist), default=r)
            lo.append(m)
            hist.append((s, r))
            if r >= self.max_rms or (m > 0 and r / m >= self.growth):
                fired.append(int(idx[j]))
        return Scan(fired, len(rows), idx, steps=steps, rows=rows, pn=p, rms=rms, lo=lo)

    def _absorb(self, s, a, b):
        ja, jb = s.span(a, b) if b > a else (0, 0)
        keep = [(int(s.steps[s.idx[j]]), s.rms[j]) for j in range(ja, jb) if math.isfinite(s.pn[j])]
        if not keep:
            return
        if self._init is None:  # no reference from the guard: the first measured row is it
            first = next(j for j in range(ja, jb) if math.isfinite(s.pn[j]))
            self._init = self.layout.norms(s.rows[s.idx[first]]).astype(np.float64)
            self._ref = "gradients"
        self._hist.extend(keep)
        last = keep[-1][0]
        while self._hist and self._hist[0][0] < last - self.window:
            self._hist.popleft()

    def _fire(self, s, k):
        j = s.at(k)
        step, pn = int(s.steps[k]), s.pn[j]
        if not math.isfinite(pn):
            bad = np.flatnonzero(~np.isfinite(self.layout.max_abs(s.rows[k])))
            layers = [self.names[i] for i in bad]
            grads = f"; {len(layers)} tensors have non-finite gradients ({W.names_list(layers)})" if layers else ""
            return self._emit(step, "critical", layers,
                              f"parameter norm is {W.fmt(pn)}: the weights hold NaN/Inf{grads}.",
                              {"param_norm": pn})
        rms, lo = s.rms[j], s.lo[j]
        self._absorb(s, k, k + 1)
        if rms >= self.max_rms:
            sev, msg = "critical", (f"RMS weight {rms:.3g} (parameter norm {pn:.3g}) is above the limit "
                                    f"{self.max_rms:g}")
        else:
            sev, msg = "warning", (f"RMS weight grew {rms / lo:.1f}x in the last {self.window} steps "
                                   f"to {rms:.3g} (parameter norm {pn:.3g})")
        layers, scores = self._culprits(self.layout.norms(s.rows[k]))
        if layers:
            what = "its initial weight norm" if self._ref == "weights" else "the first measured step"
            msg += f"; largest gradient relative to {what}: {layers[0]} ({scores[0]:.3g}x)"
        return self._emit(step, sev, layers, msg + ".",
                          {"rms": rms, "param_norm": pn, "growth": rms / lo if lo > 0 else math.inf,
                           "culprit_scores": scores})

    def _culprits(self, norms: np.ndarray, k: int = 5) -> tuple[list[str], list[float]]:
        """Tensors with the largest gradient norm / reference norm (within 10x of the largest)."""
        with np.errstate(all="ignore"):
            score = norms.astype(np.float64) / np.maximum(self._init, 1e-12)
        score = np.where(np.isnan(score), -np.inf, score)  # no gradient: not a culprit
        order = np.argsort(-score, kind="stable")[:k]
        if not len(order) or not score[order[0]] > 0:
            return [], []
        picked = [int(i) for i in order if score[i] >= 0.1 * score[order[0]]]
        return [self.names[i] for i in picked], [float(score[i]) for i in picked]

    def state_dict(self):
        return {**self._base_state(), "hist": [list(h) for h in self._hist],
                "init": None if self._init is None else array_to_list(self._init), "ref": self._ref}

    def load_state_dict(self, sd):
        self._load_base(sd)
        self._hist = deque((int(s), float(r)) for s, r in sd["hist"])
        if sd.get("init") is not None:
            self._init = list_to_array(sd["init"])
            self._ref = sd.get("ref", "weights")  # states saved before "ref" held parameter norms
