"""ExplodingDetector: gradient norms growing without bound, over time, through depth, or at once."""
from __future__ import annotations

import math
from collections import deque
from itertools import chain

import numpy as np

from .._json import array_to_list, list_to_array
from ..layout import COL
from . import _window as W
from .base import Detector, Scan, check_int, check_pos, check_unit, valid_global


class ExplodingDetector(Detector):
    """Gradient norms growing without bound: over time, through depth, or absurd at once.

    Four rules, all on PRE-clip numbers:

    - absurd: global norm >= ``absurd`` (critical; no history needed).
    - trend: over the last ``trend_window`` finite steps the norm rose by at
      least ``trend_growth``x, at a fitted rate of at least ``min_rate``x per
      step, rising on >= 75% of the steps, and (after ``warmup``) it is
      ``trend_growth``x above its median too.
    - level: the norm has been >= ``level_ratio`` x its own median (over
      ``history`` steps, after ``warmup``) for ``level_steps`` consecutive steps.
    - depth: weight-matrix norms (parameters with >= 2 dims, model order)
      grow from the output back to the input: first / last >= ``depth_ratio``
      with at least ``depth_monotone`` of the neighbouring pairs growing, over
      at least ``depth_min_layers`` layers.  Checked on the first step and
      then every ``depth_every`` steps; visible at step 0.

    Culprits: the layers holding most of the rise (trend, level) or of the
    norm (absurd, depth), most responsible first.

    Severity of trend and level: a warning while the loss still matters -- the median of
    the finite losses over the trend window (this step and the ``trend_window - 1`` before
    it) is at least ``respond`` x its value at the start (the median of the first
    ``ref_steps`` finite losses), or no loss is recorded -- and ``info`` below it: near zero
    loss one misclassified example moves a tiny gradient norm 30x (and, in a small batch,
    that one batch's loss with it), and nothing is at stake.

    Example:
        >>> gg.Guard(model, opt, detectors=[gg.ExplodingDetector(absurd=1e5)])
    """

    kind = "exploding"
    rescan = False  # every finite row enters the history as it is, firing or not

    def __init__(self, absurd: float = 1e6, trend_window: int = 6, trend_growth: float = 20.0,
                 min_rate: float = 1.5, level_ratio: float = 100.0, level_steps: int = 2,
                 history: int = 100, warmup: int = 20, depth_ratio: float = 1e3,
                 depth_monotone: float = 0.75, depth_min_layers: int = 4, depth_every: int = 10,
                 cooldown: int = 20, respond: float = 0.25, ref_steps: int = 3):
        super().__init__(cooldown)
        self.respond = check_pos("respond", respond, allow_zero=True)
        self.ref_steps = check_int("ref_steps", ref_steps, 1)
        self._ref_loss: list = []  # the first ref_steps finite losses: the start reference
        self.absurd = check_pos("absurd", absurd)
        self.trend_window = check_int("trend_window", trend_window, 2)
        self.trend_growth = check_pos("trend_growth", trend_growth)
        self.min_rate = check_pos("min_rate", min_rate)
        self.level_ratio = check_pos("level_ratio", level_ratio)
        self.level_steps = check_int("level_steps", level_steps, 1)
        self.history = check_int("history", history, 2)
        self.warmup = check_int("warmup", warmup, 1)
        self.depth_ratio = check_pos("depth_ratio", depth_ratio)
        self.depth_monotone = check_unit("depth_monotone", depth_monotone)
        self.depth_min_layers = check_int("depth_min_layers", depth_min_layers, 2)
        self.depth_every = check_int("depth_every", depth_every, 1)
        self._recent: deque = deque(maxlen=self.trend_window - 1)  # (log norm, log per-layer norms)
        self._losses: deque = deque(maxlen=self.trend_window - 1)  # their finite losses
        self._hist: deque = deque(maxlen=self.history)
        self._above = 0
        self._seen = 0

    def _scan(self, steps, rows):
        idx = valid_global(rows)
        g = rows[idx, COL["global_norm"]].astype(np.float64)
        lgs = W.logs(g.tolist())  # numpy, no host sync
        k, h, r = len(lgs), len(self._hist), len(self._recent)
        # 0 none, 1 absurd, 2 trend, 3 level, 4 depth: the first rule that holds on each row
        rule = (g >= self.absurd).astype(np.int8)
        log_tg = math.log(self.trend_growth)

        # the history median before each row, for the rows past the warm-up (a suffix, from j0)
        j0 = max(self.warmup - h, 0) if self.history >= self.warmup else k
        med = None
        if j0 < k:
            cat = np.fromiter(chain(self._hist, lgs), np.float64, h + k)
            med = W.rolling_robust(cat, h + j0, self.history, mad=False)[0]

        # trend: the window of the last trend_window finite log norms ending at each row (from t0)
        n = self.trend_window
        t0 = max(n - 1 - r, 0)
        slope = {}
        if t0 < k:
            cat_r = [x[0] for x in self._recent] + lgs
            rise = np.subtract(lgs[t0:], cat_r[r + t0 - n + 1:r + k - n + 1])
            for j in (np.flatnonzero(rise >= log_tg) + t0).tolist():  # numpy, no host sync
                if rule[j]:
                    continue
                win = cat_r[r + j - n + 1:r + j + 1]
                # least-squares slope of log-norm over the window (closed form of a degree-1 polyfit)
                xm, ym = (n - 1) / 2, sum(win) / n
                slope[j] = (sum((i - xm) * (y - ym) for i, y in enumerate(win))
                            / sum((i - xm) ** 2 for i in range(n)))
                rising = sum(b > a for a, b in zip(win, win[1:])) / (n - 1)
                above = j < j0 or lgs[j] - med[j - j0] >= log_tg  # a dip and a recovery is no trend
                if slope[j] >= math.log(self.min_rate) and rising >= 0.75 and above:
                    rule[j] = 2

        # level: consecutive rows far above the history median (the count waits out the warm-up)
        above = None
        if j0 < k:
            above = W.runs(np.subtract(lgs[j0:], med) >= math.log(self.level_ratio), self._above)
            lvl = j0 + np.flatnonzero(above >= self.level_steps)
            rule[lvl[rule[lvl] == 0]] = 3

        # depth: on the detector's first finite row and every depth_every steps
        if k and len(self.weight_idx) >= self.depth_min_layers:
            at = np.flatnonzero(steps[idx] % self.depth_every == 0)
            if self._seen == 0 and (not len(at) or at[0] != 0):
                at = np.concatenate([[0], at])
            at = at[rule[at] == 0]
            if len(at):
                w = self.layout.norms(rows[idx[at]])[:, self.weight_idx].astype(np.float64)
                with np.errstate(all="ignore"):
                    ok = np.isfinite(w).all(1) & (w > 0).all(1)
                    ratio = w[:, 0] / w[:, -1]
                    mono = (w[:, :-1] > w[:, 1:]).mean(1)
                rule[at[ok & (ratio >= self.depth_ratio) & (mono >= self.depth_monotone)]] = 4
        fired = idx[rule > 0].tolist()  # numpy, no host sync
        loss = rows[idx, COL["loss"]].astype(np.float64)
        return Scan(fired, len(rows), idx, rows=rows, steps=steps, lgs=lgs, rule=rule, j0=j0, med=med,
                    slope=slope, above=above, loss=loss)

    def _matters(self, s, j: int) -> bool:
        """Does the loss at batch position ``j`` still matter (see the class doc)?"""
        ref = self._ref_loss  # the rows before j are absorbed when _fire runs
        loss = float(s.loss[j])
        window = list(self._losses) + ([loss] if math.isfinite(loss) else [])
        if len(ref) < self.ref_steps or not window:
            return True
        l0 = float(np.median(ref))
        return not (l0 > 0 and float(np.median(window)) < self.respond * l0)

    def _above_at(self, s, j: int) -> int:
        return self._above if j < s.j0 else int(s.above[j - s.j0])

    def _absorb(self, s, a, b):
        if b > a:
            ja, jb = s.span(a, b)
            if jb > ja:
                lnorms = W.log(self.layout.norms(s.rows[s.idx[ja:jb]]))
                self._recent.extend(zip(s.lgs[ja:jb], lnorms))
                self._losses.extend(v for v in s.loss[ja:jb].tolist() if math.isfinite(v))  # numpy, no host sync
                self._hist.extend(s.lgs[ja:jb])
                self._above = self._above_at(s, jb - 1)
                self._seen += jb - ja
                if len(self._ref_loss) < self.ref_steps:
                    new = [v for v in s.loss[ja:jb].tolist() if math.isfinite(v)]  # numpy, no host sync
                    self._ref_loss += new[:self.ref_steps - len(self._ref_loss)]

    def _fire(self, s, k):
        j = s.at(k)
        step, lg, rule = int(s.steps[k]), s.lgs[j], int(s.rule[j])
        norms = self.layout.norms(s.rows[k])
        g = float(s.rows[k, COL["global_norm"]])
        if rule == 1:
            layers, shares = W.jump_culprits(self.names, norms, None)
            found = ("critical", layers,
                     f"global grad norm {g:.3g} is above the absurd limit {self.absurd:.3g}; "
                     f"{shares[0]:.0%} of it from {layers[0]}." if layers else
                     f"global grad norm {g:.3g} is above the absurd limit {self.absurd:.3g}.",
                     {"rule": "absurd", "global_norm": g, "shares": shares})
        elif rule == 2:
            rise, slope = lg - self._recent[0][0], s.slope[j]
            layers, shares = W.jump_culprits(self.names, norms, self._recent[0][1])
            top = f"; {shares[0]:.0%} of the growth from {layers[0]}" if layers else ""
            found = ("warning" if self._matters(s, j) else "info", layers,
                     f"global grad norm grew {math.exp(rise):.0f}x in {self.trend_window - 1} steps "
                     f"(x{math.exp(slope):.2f} per step) to {g:.3g}{top}.",
                     {"rule": "trend", "global_norm": g, "growth": math.exp(rise),
                      "rate": math.exp(slope), "shares": shares})
        elif rule == 3:
            med, above = float(s.med[j - s.j0]), self._above_at(s, j)
            base = np.median(np.array([r[1] for r in self._recent]), axis=0) if self._recent else None
            layers, shares = W.jump_culprits(self.names, norms, base)
            top = f"; {shares[0]:.0%} of the rise from {layers[0]}" if layers else ""
            found = ("warning" if self._matters(s, j) else "info", layers,
                     f"global grad norm {g:.3g} has been {math.exp(lg - med):.0f}x its median "
                     f"{math.exp(med):.3g} for {above} steps{top}.",
                     {"rule": "level", "global_norm": g, "median_norm": math.exp(med),
                      "ratio": math.exp(lg - med), "shares": shares})
        else:
            w = norms[self.weight_idx].astype(np.float64)
            r = w[0] / w[-1]
            per = r ** (1.0 / (len(w) - 1))
            order = np.argsort(-w, kind="stable")[:5]
            layers = [self.names[self.weight_idx[i]] for i in order]
            a, b = self.names[self.weight_idx[0]], self.names[self.weight_idx[-1]]
            found = ("warning", layers,
                     f"grad norms grow {per:.2f}x per layer from the output back to the input "
                     f"({w[0]:.3g} at {a} vs {w[-1]:.3g} at {b}, {r:.3g}x): exploding through "
                     f"depth.", {"rule": "depth", "global_norm": g, "per_layer": per, "ratio": r})
        self._absorb(s, k, k + 1)
        return self._emit(step, *found)

    def state_dict(self):
        return {**self._base_state(), "recent": [[a, array_to_list(b)] for a, b in self._recent],
                "hist": list(self._hist), "above": self._above, "seen": self._seen,
                "ref_loss": list(self._ref_loss), "losses": list(self._losses)}

    def load_state_dict(self, sd):
        self._load_base(sd)
        self._recent = deque([(float(a), list_to_array(b)) for a, b in sd["recent"]],
                             maxlen=self.trend_window - 1)
        self._hist = deque((float(v) for v in sd["hist"]), maxlen=self.history)
        self._above = int(sd["above"])
        self._seen = int(sd["seen"])
        # states saved before the start reference: the next losses become the reference
        self._ref_loss = [float(v) for v in sd.get("ref_loss", [])]
        # states saved before the loss window: it refills from the next rows
        self._losses = deque((float(v) for v in sd.get("losses", [])), maxlen=self.trend_window - 1)
