"""SpikeDetector: a one-step outlier of the global gradient norm."""
from __future__ import annotations

import math
from collections import deque
from itertools import chain

import numpy as np

from ..layout import COL
from . import _window as W
from .base import Detector, Scan, check_int, check_pos, valid_global


class BaselineDetector(Detector):
    """State shared by the spike detectors: a window of finite values and per-layer baselines."""

    def state_dict(self):
        return {**self._base_state(), "hist": list(self._hist), "layers": self._layers.state_dict()}

    def load_state_dict(self, sd):
        self._load_base(sd)
        self._hist = deque((float(v) for v in sd["hist"]), maxlen=self.window)
        self._layers.load_state_dict(sd["layers"])

    def _check_baseline(self, window, warmup, z, ratio, critical) -> None:
        """The arguments both spike detectors share, checked once."""
        self.critical = check_pos("critical", critical)
        self.window = check_int("window", window, 2)
        self.warmup = check_int("warmup", warmup, 1)
        self.z = check_pos("z", z)
        self.ratio = check_pos("ratio", ratio)
        if self.ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {ratio!r}")


class SpikeDetector(BaselineDetector):
    """One-step outlier of the global gradient norm against a robust baseline.

    The baseline is the median / MAD of the log global norm over the last
    ``window`` finite steps.  After ``warmup`` steps, a step fires when its log
    norm is ``z`` robust standard deviations above the median AND the norm is
    at least ``ratio`` times the median.  A spike enters the baseline clipped to
    the threshold, so one outlier cannot drag the baseline up.

    Severity: ``info``.  A gradient spike is a fact, not yet a problem: heavy-tailed data
    makes 10x spikes that the loss and the weights ignore.  When they respond, the
    ``diverging``, ``loss_spike`` and ``weight_growth`` detectors warn.  A jump of at least
    ``critical`` x the median is critical at once (an update of that size, unclipped,
    wrecks the weights).

    Args:
        window: steps in the baseline (default 100).
        warmup: finite steps before any verdict (default 20).
        z: robust z-score threshold on the log norm (default 6).
        ratio: minimum norm / median ratio (default 5).
        min_scale: floor of the log-space spread, so a flat history does not
            make tiny jumps significant (default 0.1, i.e. ~10%).
        cooldown: steps between two spike events (default 10).
        critical: ratio to the median that makes a spike critical (default 1e4).

    Example:
        >>> gg.Guard(model, opt, detectors=[gg.SpikeDetector(ratio=10)])
    """

    kind = "spike"
    rescan = True  # a spike enters the baseline clipped: the later rows see the threshold

    def __init__(self, window: int = 100, warmup: int = 20, z: float = 6.0, ratio: float = 5.0,
                 min_scale: float = 0.1, cooldown: int = 10, critical: float = 1e4):
        super().__init__(cooldown)
        self._check_baseline(window, warmup, z, ratio, critical)
        self.min_scale = check_pos("min_scale", min_scale)
        self._hist: deque = deque(maxlen=self.window)  # finite log global norms
        self._layers = W.LayerRing(self.window)

    def _scan(self, steps, rows):
        idx = valid_global(rows)
        lgs = W.logs(rows[idx, COL["global_norm"]].astype(np.float64).tolist())  # numpy, no host sync
        h, k = len(self._hist), len(lgs)
        # judged: rows with `warmup` values in their window before them (a suffix of the batch)
        j0 = max(self.warmup - h, 0) if self.window >= self.warmup else k
        fired, med, scale, thr = [], None, None, None
        if j0 < k:
            cat = np.fromiter(chain(self._hist, lgs), np.float64, h + k)
            med, mad = W.rolling_robust(cat, h + j0, self.window)
            scale = np.maximum(mad, self.min_scale)
            thr = med + np.maximum(self.z * scale, math.log(self.ratio))
            fired = idx[j0:][cat[h + j0:] > thr].tolist()  # numpy, no host sync
        return Scan(fired, len(rows), idx, rows=rows, steps=steps, lgs=lgs, j0=j0, med=med, scale=scale,
                    thr=thr)

    def _absorb(self, s, a, b):
        if b > a:
            ja, jb = s.span(a, b)
            if jb > ja:
                self._hist.extend(s.lgs[ja:jb])
                self._layers.push_many(W.log(self.layout.norms(s.rows[s.idx[ja:jb]])))

    def _fire(self, s, k):
        j = s.at(k)
        lg, t = s.lgs[j], j - s.j0
        med, scale, thr = float(s.med[t]), float(s.scale[t]), float(s.thr[t])
        norms = self.layout.norms(s.rows[k])
        g = float(s.rows[k, COL["global_norm"]])
        ratio = math.exp(lg - med)
        layers, shares = W.jump_culprits(self.names, norms, self._layers.median())
        top = f"; {shares[0]:.0%} of the jump from {layers[0]}" if layers else ""
        msg = (f"global grad norm {g:.3g} is {ratio:.0f}x its median {math.exp(med):.3g} over "
               f"the last {len(self._hist)} steps (robust z {(lg - med) / scale:.0f}){top}.")
        ev = self._emit(s.steps[k], "critical" if ratio >= self.critical else "info", layers, msg, {
            "global_norm": g, "median_norm": math.exp(med), "ratio": ratio,
            "z": (lg - med) / scale, "shares": shares})
        self._hist.append(thr)
        self._layers.push_many(W.log(norms)[None])
        return ev
