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
    and the rows' per-tensor parameter norms (measured on the same steps), and
    works on RMS weights (``norm / sqrt(numel)``):

    - growth: the total RMS >= ``growth`` x its minimum over the last ``window`` steps;
    - large: the total RMS >= ``max_rms`` (critical);
    - non-finite parameters (critical);
    - a jump: one weight tensor's RMS >= ``layer_jump`` x its previous measurement
      (``param_norm_every`` steps earlier).  An optimizer moves a weight by a small
      fraction between two measurements; a tensor multiplied by 30 in one step (a bad
      write, a corrupted checkpoint shard, a broken custom update) is invisible in the
      total norm of a large model and in the loss behind a LayerNorm.  Tensors whose
      previous RMS is below ``layer_floor`` x the total RMS are not judged: a tensor
      that starts at or near zero (LoRA's B, zero-initialised projections) grows by
      large factors in a healthy run.

    When a jump happened: the weights are measured every ``param_norm_every`` steps, the
    gradients and the loss every step.  A weight multiplied by 30 shows on the first step that
    uses it in the tensor's gradient norm per unit of loss: the gradient falls by about that
    factor behind a normalisation or a saturating activation, or the loss jumps with the
    gradient unchanged (logits x30 into a softmax).  The ratio, not the gradient norm alone: an
    easy batch lowers both (a gradient norm 3x under its range at a loss 3x under is no jump).
    Later steps of such a run swing further (a saturated softmax gives a gradient of ~0 on one
    batch and a full one on the next), so the largest change is often not the first.  A jump's
    event is dated at the first step in the interval whose ratio for that tensor left
    ``onset_range`` x the range it held over the ``onset_context`` steps before the interval;
    when none did (or no positive loss was recorded), at the step where its gradient norm
    changed most from the step before, if it changed at least ``onset_break``x; otherwise at
    the measuring step that saw it.  ``data["seen_at"]`` is the measuring step.

    The detector never reads the parameters.  Culprits: with per-tensor parameter
    norms, the weight tensors that grew most (since the previous measurement for a
    jump, since the guard was built otherwise: ``RunInfo.init_layer_norms``); without
    them (rows recorded before they existed), the tensors whose gradient norm is
    largest relative to their parameter norm when the guard was built, or to their
    gradient norm on the first measured step.

    Args:
        growth: growth factor over the window (default 10).
        window: steps (default 200).
        max_rms: RMS weight limit (default 100).
        cooldown: steps between two events (default 200).
        layer_jump: growth of one weight tensor between two measurements (default 10).
        layer_floor: smallest previous RMS judged, relative to the total RMS (default 0.01).
        onset_range: how far outside the range of the steps before an interval a loss or a
            gradient norm must be to date a jump there, as a factor (default 2).
        onset_context: steps before an interval whose range that is (default 20).
        onset_break: one-step change of a jumped tensor's gradient norm that dates the jump
            when nothing left that range (default 5).
    """

    kind = "weight_growth"
    rescan = False  # every measured row enters the window as it is, firing or not
    # The rule reads one row in param_norm_every (the measuring steps): a short Python loop over
    # those rows is cheaper than array set-up for a handful of values.

    def __init__(self, growth: float = 10.0, window: int = 200, max_rms: float = 100.0,
                 cooldown: int = 200, layer_jump: float = 10.0, layer_floor: float = 0.01,
                 onset_break: float = 5.0, onset_range: float = 2.0, onset_context: int = 20):
        super().__init__(cooldown)
        self.growth = check_pos("growth", growth)
        self.window = check_int("window", window, 1)
        self.max_rms = check_pos("max_rms", max_rms)
        self.layer_jump = check_pos("layer_jump", layer_jump)
        self.layer_floor = check_pos("layer_floor", layer_floor, allow_zero=True)
        self.onset_break = check_pos("onset_break", onset_break)
        if self.onset_break < 1:
            raise ValueError(f"onset_break must be >= 1 (a factor of change), got {onset_break!r}")
        self.onset_range = check_pos("onset_range", onset_range)
        if self.onset_range < 1:
            raise ValueError(f"onset_range must be >= 1 (a factor), got {onset_range!r}")
        self.onset_context = check_int("onset_context", onset_context, 1)
        self._hist: deque = deque()  # (step, rms)
        self._prev: np.ndarray | None = None  # each weight tensor's RMS at the last measurement
        self._init: np.ndarray | None = None  # per-tensor reference norms (see the class doc)
        self._ref = "weights"  # what _init holds: "weights" (parameter norms) or "gradients"
        # per weight tensor, since the last measuring row: the log gradient norm of the last row
        # that had one, the largest one-step change of it (-1: none measured), and its step
        self._glast: np.ndarray | None = None
        self._gbest: np.ndarray | None = None
        self._gat: np.ndarray | None = None
        # log(gradient norm / loss) of each weight tensor over the latest ``onset_context`` rows;
        # the range it held when the interval began (lo, hi: NaN until there are that many
        # rows); per tensor, the first step of the interval outside it (-1: none)
        self._ctx: deque = deque(maxlen=self.onset_context)
        self._lo = self._hi = self._gfirst = None
        self._dated = None  # (gbest, gat, gfirst) of the interval that ended with the last row folded

    def bind(self, run):
        super().bind(run)
        self._numel = max(run.numel, 1)
        self._every = int(run.param_norm_every or 0)
        self._w = run.weight_idx  # the tensors judged for a jump: weight matrices and kernels
        self._sqrt_w = np.sqrt([max(math.prod(run.shapes[i]), 1) for i in self._w]).astype(np.float64)
        if self._glast is None:  # not loaded from a state
            self._glast = np.full(len(self._w), np.nan)
            self._gbest = np.full(len(self._w), -1.0)
            self._gat = np.full(len(self._w), -1, np.int64)
        if self._gfirst is None:  # not loaded from a state
            self._lo = self._hi = np.full(len(self._w), np.nan)
            self._gfirst = np.full(len(self._w), -1, np.int64)
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
            return Scan([], len(rows), idx, steps=steps, rows=rows)
        p = pn[idx].astype(np.float64).tolist()  # numpy, no host sync
        st = steps[idx].tolist()  # numpy, no host sync
        rms = [v / math.sqrt(self._numel) for v in p]
        with np.errstate(all="ignore"):  # per-tensor RMS of the weight tensors (NaN: not measured)
            lrms = self.layout.param_norms(rows[idx])[:, self._w].astype(np.float64) / self._sqrt_w
        # the minimum RMS over the `window` steps before each row: the history, then the earlier rows
        hist = list(self._hist)
        prev = self._prev
        lo, fired, jump = [], [], []
        for j, (s, v, r) in enumerate(zip(st, p, rms)):
            if not math.isfinite(v):
                lo.append(math.nan)
                jump.append(None)
                fired.append(int(idx[j]))
                continue
            total_prev = hist[-1][1] if hist else r
            hist = [e for e in hist if e[0] >= s - self.window]
            m = min((e[1] for e in hist), default=r)
            lo.append(m)
            hist.append((s, r))
            cur = lrms[j]
            ratio = None
            if prev is not None and np.isfinite(cur).all():
                ratio = self._judged_ratio(cur, prev, total_prev)
            jump.append(ratio)
            if np.isfinite(cur).all():
                prev = cur
            if (r >= self.max_rms or (m > 0 and r / m >= self.growth)
                    or (ratio is not None and ratio.max(initial=0.0) >= self.layer_jump)):
                fired.append(int(idx[j]))
        return Scan(fired, len(rows), idx, steps=steps, rows=rows, pn=p, rms=rms, lo=lo, lrms=lrms,
                    jump=jump)

    def _absorb(self, s, a, b):
        self._fold(s, a, b)
        ja, jb = s.span(a, b) if b > a else (0, 0)
        for j in range(jb - 1, ja - 1, -1):  # the last complete per-tensor measurement
            if math.isfinite(s.pn[j]) and np.isfinite(s.lrms[j]).all():
                self._prev = s.lrms[j].copy()
                break
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
            held = np.flatnonzero(~np.isfinite(self.layout.param_norms(s.rows[k])))  # NaN: not measured
            bad = held if len(held) < self.n else np.flatnonzero(~np.isfinite(self.layout.max_abs(s.rows[k])))
            layers = [self.names[i] for i in bad]
            where = "hold NaN/Inf" if len(held) < self.n else "have non-finite gradients"
            grads = f"; {len(layers)} tensors {where} ({W.names_list(layers)})" if layers else ""
            return self._emit(step, "critical", layers,
                              f"parameter norm is {W.fmt(pn)}: the weights hold NaN/Inf{grads}.",
                              {"param_norm": pn})
        rms, lo, ratio = s.rms[j], s.lo[j], s.jump[j]
        self._absorb(s, k, k + 1)
        gbest, gat, gfirst = self._dated  # the interval this measuring row ended, to date a jump
        data = {"rms": rms, "param_norm": pn, "growth": rms / lo if lo > 0 else math.inf}
        if rms >= self.max_rms:
            sev, msg = "critical", (f"RMS weight {rms:.3g} (parameter norm {pn:.3g}) is above the limit "
                                    f"{self.max_rms:g}")
        elif lo > 0 and rms / lo >= self.growth:
            sev, msg = "warning", (f"RMS weight grew {rms / lo:.1f}x in the last {self.window} steps "
                                   f"to {rms:.3g} (parameter norm {pn:.3g})")
        else:
            i = int(np.argmax(ratio))
            sev, msg = "warning", (f"the weights of {self.names[self._w[i]]} grew {ratio[i]:.3g}x since "
                                   f"the last measurement ({self._every or 1} steps): RMS {s.lrms[j][i]:.3g}, "
                                   f"no optimizer step moves a weight that far")
        layers: list[str] = []
        if ratio is not None and ratio.max(initial=0.0) >= self.layer_jump:
            layers, scores = self._ranked(ratio)
            i = int(np.argmax(ratio))
            data["seen_at"] = step
            if gfirst[i] >= 0:
                msg += (f"; at step {int(gfirst[i])} its gradient norm per unit of loss left "
                        f"{self.onset_range:g}x the range of the {self.onset_context} steps before, "
                        f"when the jump most likely happened")
                step = int(gfirst[i])
            elif gbest[i] >= math.log(self.onset_break):
                msg += (f"; its gradient norm changed {math.exp(gbest[i]):.3g}x at step {int(gat[i])}, "
                        f"when the jump most likely happened")
                step = int(gat[i])
            msg += "" if msg.startswith("the weights of") else \
                f"; {layers[0]} grew {scores[0]:.3g}x since the last measurement"
        elif np.isfinite(s.lrms[j]).all() and self._init is not None and self._ref == "weights":
            layers, scores = self._ranked(self._growth_since_init(s.lrms[j]))
            if layers:
                msg += f"; grew most since the guard was built: {layers[0]} ({scores[0]:.3g}x its initial norm)"
        if not layers:  # no per-tensor parameter norms (rows recorded before them): the gradients
            layers, scores = self._culprits(self.layout.norms(s.rows[k]))
            if layers:
                what = "its initial weight norm" if self._ref == "weights" else "the first measured step"
                msg += f"; largest gradient relative to {what}: {layers[0]} ({scores[0]:.3g}x)"
        return self._emit(step, sev, layers, msg + ".", {**data, "culprit_scores": scores})

    def _fold(self, s, a: int, b: int) -> None:
        """Take rows ``a:b``'s gradient norms into the per-tensor largest one-step change since
        the last measuring row and the first step outside the range before it (both reset after
        each measuring row, which also takes the range anew)."""
        if b <= a:
            return
        rows = s.rows[a:b]
        with np.errstate(all="ignore"):
            lg = np.log(self.layout.norms(rows)[:, self._w], dtype=np.float64)
            loss = rows[:, COL["loss"]].astype(np.float64)
            # no ratio for a negative loss (a log-likelihood); a gradient at a loss of exactly 0
            # is +inf: out of any range (a softmax saturated by a jump), never part of one
            vals = lg - np.log(np.where(loss >= 0, loss, np.nan))[:, None]
        # a poisoned row is no evidence, nor a gradient of 0 (none reached the tensor on that
        # step): such values stay out of the range and out of the comparison
        vals[np.isnan(vals) | (vals == -np.inf) | (rows[:, COL["bad"]] > 0)[:, None]] = np.nan
        steps, m = s.steps[a:b], b - a
        bad = rows[:, COL["bad"]] > 0
        if not bad.any() and np.isfinite(lg).all():  # the usual rows: a plain difference
            d = np.abs(np.diff(lg, axis=0, prepend=self._glast[None]))
            d[0][np.isnan(d[0])] = -1.0  # no earlier gradient for that tensor
            self._glast = lg[-1].copy()
        else:
            lg[~np.isfinite(lg) | bad[:, None]] = np.nan  # no gradient to compare
            # each row's change from the last earlier row with a gradient for that tensor
            prev = np.vstack([self._glast[None], lg])
            at = np.where(np.isnan(prev), 0, np.arange(m + 1)[:, None])
            np.maximum.accumulate(at, axis=0, out=at)
            filled = np.take_along_axis(prev, at, 0)
            d = np.abs(lg - filled[:-1])
            d[np.isnan(d)] = -1.0
            self._glast = filled[-1].copy()
        # the largest change per interval; an interval ends with a measuring row
        ends = (s.idx[(s.idx >= a) & (s.idx < b)] - a + 1).tolist()  # numpy, no host sync
        start = 0
        for end in ends + ([m] if not ends or ends[-1] < m else []):
            if end > start:
                r = d[start:end].argmax(0)
                best = d[start:end][r, np.arange(d.shape[1])]
                better = best > self._gbest
                self._gbest[better] = best[better]
                self._gat[better] = steps[start + r[better]]
                v = vals[start:end]
                with np.errstate(invalid="ignore"):
                    out = (v < self._lo) | (v > self._hi)
                hit = out.any(0) & (self._gfirst < 0)
                self._gfirst[hit] = steps[start + out[:, hit].argmax(0)]
                self._ctx.extend(v)
            if end in ends:
                self._dated = (self._gbest.copy(), self._gat.copy(), self._gfirst.copy())
                self._gbest[:] = -1.0
                self._gat[:] = -1
                self._gfirst[:] = -1
                self._take_range()
            start = end

    def _take_range(self) -> None:
        """The range the next interval is judged against: the last ``onset_context`` rows'
        min and max per column, ``onset_range`` x wider (NaN: a column without a value, or
        fewer rows than that so far: a run's first steps say little of its range)."""
        ctx = np.array(self._ctx, np.float64).reshape(len(self._ctx), len(self._w))
        seen = np.isfinite(ctx)
        w = math.log(self.onset_range)
        none = ~seen.any(0) | (len(ctx) < self.onset_context)
        self._lo = np.where(none, np.nan, np.min(ctx, 0, initial=np.inf, where=seen) - w)
        self._hi = np.where(none, np.nan, np.max(ctx, 0, initial=-np.inf, where=seen) + w)

    def _judged_ratio(self, cur: np.ndarray, ref: np.ndarray, total: float) -> np.ndarray:
        """``cur / ref`` per weight tensor; 0 (not judged) where ``ref`` is 0 or below
        ``layer_floor`` x the total RMS ``total`` (tensors that start at or near zero)."""
        with np.errstate(all="ignore"):
            return np.where((ref > 0) & (ref >= self.layer_floor * total), cur / ref, 0.0)

    def _growth_since_init(self, lrms: np.ndarray) -> np.ndarray:
        """Each weight tensor's RMS over its RMS when the guard was built (0: not judged)."""
        total0 = math.sqrt(float(np.sum(self._init ** 2)) / self._numel)
        return self._judged_ratio(lrms, self._init[self._w] / self._sqrt_w, total0)

    def _ranked(self, score: np.ndarray) -> tuple[list[str], list[float]]:
        """Weight tensors by ``score`` (one per ``self._w``)."""
        return _top(score, [self.names[i] for i in self._w])

    def _culprits(self, norms: np.ndarray) -> tuple[list[str], list[float]]:
        """Tensors by gradient norm / reference norm (no gradient: not a culprit)."""
        with np.errstate(all="ignore"):
            score = norms.astype(np.float64) / np.maximum(self._init, 1e-12)
        return _top(np.where(np.isnan(score), -np.inf, score), self.names)

    def state_dict(self):
        return {**self._base_state(), "hist": [list(h) for h in self._hist],
                "init": None if self._init is None else array_to_list(self._init), "ref": self._ref,
                "prev": None if self._prev is None else array_to_list(self._prev),
                "glast": None if self._glast is None else array_to_list(self._glast),
                "gbest": None if self._gbest is None else array_to_list(self._gbest),
                "gat": None if self._gat is None else self._gat.tolist(),  # numpy, no host sync
                "ctx": [array_to_list(v) for v in self._ctx],
                "lo": None if self._lo is None else array_to_list(self._lo),
                "hi": None if self._hi is None else array_to_list(self._hi),
                "gfirst": None if self._gfirst is None else self._gfirst.tolist()}  # numpy, no host sync

    def load_state_dict(self, sd):
        self._load_base(sd)
        self._hist = deque((int(s), float(r)) for s, r in sd["hist"])
        if sd.get("init") is not None:
            self._init = list_to_array(sd["init"])
            self._ref = sd.get("ref", "weights")  # states saved before "ref" held parameter norms
        self._prev = None if sd.get("prev") is None else list_to_array(sd["prev"])  # absent before 0.3
        if sd.get("glast") is not None:  # absent from older states: the next interval starts fresh
            self._glast, self._gbest = list_to_array(sd["glast"]), list_to_array(sd["gbest"])
            self._gat = np.asarray(sd["gat"], np.int64)
        if sd.get("gfirst") is not None:  # absent from older states: no range until the next interval
            self._ctx = deque((list_to_array(v) for v in sd["ctx"]), maxlen=self.onset_context)
            self._lo, self._hi = list_to_array(sd["lo"]), list_to_array(sd["hi"])
            self._gfirst = np.asarray(sd["gfirst"], np.int64)


def _top(score: np.ndarray, names: list[str], k: int = 5) -> tuple[list[str], list[float]]:
    """The ``k`` largest positive scores within 10x of the largest, largest first (ties in order)."""
    order = np.argsort(-score, kind="stable")[:k]
    if not len(order) or not score[order[0]] > 0:
        return [], []
    picked = [int(i) for i in order if score[i] >= 0.1 * score[order[0]]]
    return [names[i] for i in picked], [float(score[i]) for i in picked]
