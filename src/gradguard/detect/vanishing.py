"""VanishingDetector: weight layers whose gradients stay tiny, or shrink through depth."""
from __future__ import annotations

import math

import numpy as np

from ..layout import COL
from ._window import runs
from .base import Detector, Scan, check_int, check_pos, check_unit


class VanishingDetector(Detector):
    """Weight layers whose gradients stay tiny, or shrink geometrically through depth.

    Only weight matrices / kernels (parameters with >= 2 dims) are judged:
    biases next to BatchNorm legitimately get ~0 gradient.

    - tiny: a layer's norm < ``rel`` x the largest weight-layer norm, or <
      ``floor``, for ``patience`` consecutive steps.
    - depth: norms shrink from the output back to the input, last / first
      >= ``depth_ratio`` with at least ``depth_monotone`` of the neighbouring
      pairs shrinking, for ``patience`` consecutive steps.

    Culprits: the vanishing layers in model order, earliest first.

    Args:
        rel: relative floor (default 1e-3).
        floor: absolute floor (default 1e-9).
        patience: consecutive steps (default 20).
        depth_ratio: output/input ratio for the depth rule (default 1e3).
        depth_monotone: fraction of shrinking neighbour pairs (default 0.75).
        depth_min_layers: weight layers needed for the depth rule (default 4).
        cooldown: steps between two events (default 200).
    """

    kind = "vanishing"
    rescan = False  # the run counters go on the same way whether a row fires or not

    def __init__(self, rel: float = 1e-3, floor: float = 1e-9, patience: int = 20,
                 depth_ratio: float = 1e3, depth_monotone: float = 0.75, depth_min_layers: int = 4,
                 cooldown: int = 200):
        super().__init__(cooldown)
        self.rel = check_pos("rel", rel)
        self.floor = check_pos("floor", floor, allow_zero=True)
        self.patience = check_int("patience", patience, 1)
        self.depth_ratio = check_pos("depth_ratio", depth_ratio)
        self.depth_monotone = check_unit("depth_monotone", depth_monotone)
        self.depth_min_layers = check_int("depth_min_layers", depth_min_layers, 2)
        self._count: np.ndarray | None = None  # consecutive tiny steps, per weight layer
        self._depth = 0  # consecutive steps of the depth pattern

    def _scan(self, steps, rows):
        nw = len(self.weight_idx)
        if nw < 2:
            return Scan([], len(rows), np.zeros(0, np.int64))
        w = self.layout.norms(rows)[:, self.weight_idx].astype(np.float64)
        # a layer without gradient this step (or a poisoned step): no verdict, no change
        idx = np.flatnonzero((rows[:, COL["bad"]] == 0) & np.isfinite(w).all(1))
        w = w[idx]
        top = w.max(1)
        tiny = (w < self.rel * top[:, None]) | (w < self.floor)
        count = runs(tiny, np.zeros(nw, np.int64) if self._count is None else self._count)
        if nw >= self.depth_min_layers:
            first = w[:, 0]
            ratio = np.divide(w[:, -1], first, out=np.zeros(len(w)), where=first > 0)  # no verdict at 0
            d_ok = (first > 0) & (ratio >= self.depth_ratio) & ((w[:, :-1] < w[:, 1:]).mean(1) >= self.depth_monotone)
        else:
            d_ok = np.zeros(len(w), bool)
        depth = runs(d_ok, self._depth)
        stuck = (count >= self.patience).any(1)
        fired = idx[stuck | (depth >= self.patience)].tolist()  # numpy, no host sync
        return Scan(fired, len(rows), idx, steps=steps, w=w, top=top, count=count, depth=depth, stuck=stuck)

    def _absorb(self, s, a, b):
        if b > a:
            ja, jb = s.span(a, b)
            if jb > ja:
                self._count, self._depth = s.count[jb - 1], int(s.depth[jb - 1])

    def _fire(self, s, k):
        j = s.at(k)
        self._absorb(s, k, k + 1)
        w, top, names, wi = s.w[j], float(s.top[j]), self.names, self.weight_idx
        if s.stuck[j]:
            idx = np.flatnonzero(s.count[j] >= self.patience)
            lo = int(idx[np.argmin(w[idx])])
            if top <= self.floor:
                msg = (f"all {len(w)} weight layers have had grad norms below {self.floor:g} for "
                       f"{self.patience}+ steps (largest {top:.3g}): no layer is learning (dead units?).")
            else:
                msg = (f"{len(idx)} of {len(w)} weight layers have had grad norms below {self.rel:g}x "
                       f"the largest ({top:.3g}) for {self.patience}+ steps; smallest {w[lo]:.3g} at "
                       f"{names[wi[lo]]}.")
            data = {"rule": "tiny", "largest": top, "smallest": float(w[lo])}
        else:
            r = w[-1] / max(w[0], 1e-300)
            per = r ** (1.0 / (len(w) - 1))
            idx = np.flatnonzero(w < top / math.sqrt(self.depth_ratio))
            if not len(idx):
                idx = np.array([0])
            msg = (f"grad norms shrink {per:.2f}x per layer from the output back to the input "
                   f"({w[-1]:.3g} at {names[wi[-1]]} vs {w[0]:.3g} at {names[wi[0]]}) for "
                   f"{int(s.depth[j])} steps.")
            data = {"rule": "depth", "ratio": float(r), "per_layer": float(per)}
        layers = [names[wi[i]] for i in sorted(idx)]  # earliest first
        data["norms"] = {names[wi[i]]: float(w[i]) for i in sorted(idx)[:10]}
        return self._emit(s.steps[k], "warning", layers, msg, data)

    def state_dict(self):
        count = None if self._count is None else self._count.tolist()  # numpy, no host sync
        return {**self._base_state(), "count": count, "depth": self._depth}

    def load_state_dict(self, sd):
        self._load_base(sd)
        self._count = None if sd["count"] is None else np.asarray(sd["count"], np.int64)
        self._depth = int(sd["depth"])
