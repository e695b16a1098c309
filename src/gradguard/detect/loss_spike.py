"""LossSpikeDetector: the loss jumping against its robust baseline."""
from __future__ import annotations

import math
from collections import deque
from itertools import chain

import numpy as np

from ..layout import COL
from . import _window as W
from .base import Scan, check_pos
from .spike import BaselineDetector


class LossSpikeDetector(BaselineDetector):
    """The loss jumping against its robust baseline (median / MAD of the last ``window`` losses).

    While every loss in the window is positive the baseline is taken on
    log(loss): loss distributions near convergence are skewed (a batch at 5x
    the median loss is ordinary when the median is 0.02), and a jump in a
    large loss (2.5 -> 4 for a language model) is still many MADs.  Otherwise
    (losses <= 0) it works on the raw values.  Fires when the value exceeds
    ``median + max(z * MAD_sigma, min_jump)`` after ``warmup`` finite losses,
    where ``min_jump`` is ``log(ratio)`` in log space or ``abs_min`` raw.  A
    spike enters the baseline clipped to the threshold.  Culprits: layers whose
    gradient norm jumped most at that step.

    Severity: ``info``.  One batch with a high loss is a fact about that batch
    (heavy-tailed data gives 300x batches in runs that converge); a loss that stays
    up is ``diverging``'s to report.  A jump of ``critical`` x the median or more is
    a warning at once.

    Args:
        window: losses in the baseline (default 100).
        warmup: finite losses before any verdict (default 20).
        z: robust z-score threshold (default 12; heavy-tailed batch losses near
            convergence reach z 9 in healthy runs).
        ratio: minimum loss / median ratio for positive losses (default 1.5).
        abs_min: minimum absolute jump for non-positive losses (default 1e-6).
        min_scale: floor of the spread (log space; default 0.02).
        cooldown: steps between two events (default 10).
        critical: loss / median ratio (positive losses) that makes a jump a warning (default 1e4).
    """

    kind = "loss_spike"
    rescan = True  # a spike enters the baseline clipped: the later rows see the threshold

    def __init__(self, window: int = 100, warmup: int = 20, z: float = 12.0, ratio: float = 1.5,
                 abs_min: float = 1e-6, min_scale: float = 0.02, cooldown: int = 10,
                 critical: float = 1e4):
        super().__init__(cooldown)
        self._check_baseline(window, warmup, z, ratio, critical)
        self.abs_min = check_pos("abs_min", abs_min, allow_zero=True)
        self.min_scale = check_pos("min_scale", min_scale, allow_zero=True)
        self._hist: deque = deque(maxlen=self.window)  # raw finite losses
        self._layers = W.LayerRing(self.window)

    def _scan(self, steps, rows):
        loss = rows[:, COL["loss"]].astype(np.float64)
        idx = np.flatnonzero((rows[:, COL["loss_bad"]] <= 0) & np.isfinite(loss))
        new = loss[idx].tolist()  # numpy, no host sync
        k, h = len(new), len(self._hist)
        # judged: rows with `warmup` losses in their window before them (a suffix of the batch)
        j0 = max(self.warmup - h, 0) if self.window >= self.warmup else k
        fired, x, med, scale, thr, logspace = [], None, None, None, None, None
        if j0 < k:
            cat = np.fromiter(chain(self._hist, new), np.float64, h + k)
            x = cat[h + j0:]
            # log space while the loss and its whole window are positive
            positive = min(new) > 0 and min(self._hist, default=1.0) > 0
            if positive:  # the usual case
                logspace = np.ones(k - j0, bool)
            else:
                nonpos = np.concatenate([[0], np.cumsum(cat <= 0)])
                pos = np.arange(h + j0, h + k)
                logspace = (x > 0) & (nonpos[pos] == nonpos[np.maximum(pos - self.window, 0)])
            med = np.empty(k - j0)
            scale = np.empty(k - j0)
            if logspace.any():
                if positive:
                    logcat = np.log(cat)
                else:
                    with np.errstate(all="ignore"):  # non-positive losses lie outside these windows
                        logcat = np.log(cat)
                m, mad = W.rolling_robust(logcat, h + j0, self.window)
                med[logspace], scale[logspace] = m[logspace], np.maximum(mad[logspace], self.min_scale)
                x = x.copy()
                x[logspace] = W.logs(x[logspace].tolist())  # numpy, no host sync
            if not logspace.all():
                raw = ~logspace
                m, mad = W.rolling_robust(cat, h + j0, self.window)
                med[raw], scale[raw] = m[raw], np.maximum(mad[raw], 0.0)
            jump = np.where(logspace, math.log(self.ratio), self.abs_min)
            thr = med + np.maximum(self.z * scale, jump)
            fired = idx[j0:][x > thr].tolist()  # numpy, no host sync
        return Scan(fired, len(rows), idx, rows=rows, steps=steps, new=new, j0=j0, x=x, med=med, scale=scale,
                    thr=thr, logspace=logspace)

    def _absorb(self, s, a, b):
        if b > a:
            ja, jb = s.span(a, b)
            if jb > ja:
                self._hist.extend(s.new[ja:jb])
                at = s.idx[ja:jb]
                ok = at[s.rows[at, COL["bad"]] == 0]
                self._layers.push_many(W.log(self.layout.norms(s.rows[ok])))

    def _fire(self, s, k):
        j = s.at(k)
        t = j - s.j0
        loss, x, logspace = s.new[j], float(s.x[t]), bool(s.logspace[t])
        med, scale, thr = float(s.med[t]), float(s.scale[t]), float(s.thr[t])
        row = s.rows[k]
        ok = row[COL["bad"]] == 0
        layers, shares = [], []
        if ok:
            layers, shares = W.jump_culprits(self.names, self.layout.norms(row), self._layers.median())
        zs = (x - med) / scale if scale > 0 else math.inf
        med_loss = math.exp(med) if logspace else med
        rel = f"{loss / med_loss:.1f}x its median" if logspace else f"{loss - med:.3g} above its median"
        top = f"; largest grad-norm jump in {layers[0]}" if layers else ""
        severe = logspace and x - med >= math.log(self.critical)
        ev = self._emit(s.steps[k], "warning" if severe else "info", layers,
                        f"loss {loss:.4g} jumped to {rel} {med_loss:.4g} over the last "
                        f"{len(self._hist)} steps (robust z {zs:.0f}){top}.",
                        {"loss": loss, "median_loss": med_loss, "z": zs, "shares": shares})
        self._hist.append(math.exp(thr) if logspace else thr)
        if ok:
            self._layers.push_many(W.log(self.layout.norms(row))[None])
        return ev
