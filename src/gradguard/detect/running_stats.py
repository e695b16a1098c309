"""RunningStatsDetector: a normalisation layer's running statistics jumping or turning non-finite."""
from __future__ import annotations

import math

import numpy as np

from .._json import array_to_list, list_to_array
from ..layout import COL
from .base import Detector, Scan, check_int, check_pos


class RunningStatsDetector(Detector):
    """BatchNorm running variances (``RunInfo.buffers``) that jump or hold NaN/Inf.

    In training mode a BatchNorm layer normalises each batch by that batch's own statistics:
    a batch scaled by 1000 (an unnormalised image, a unit mix-up, a corrupted shard) gives the
    same loss and the same gradients as a good one.  Its one trace is the layer's running
    variance, an exponential average of the batches' variances that evaluation divides by: one
    such batch at momentum 0.1 makes it ~10^5 times too large, and the model's eval outputs are
    wrong until it decays.  A NaN/Inf activation poisons it for good (``0.9 * NaN`` stays NaN),
    even when the guard skips the step: skipping withholds the update, not the forward pass.

    The guard measures the buffers' L2 norms on every step (a few small tensors: one kernel).
    Rules, per buffer:

    - a jump: the norm >= ``jump`` x its previous measurement (default 100: one batch's
      activations at least 10x their scale), judged once the previous measurement is at least
      ``warmup`` steps into the run (a running variance starts at 1 and moves to the
      activations' variance during the first tens of steps);
    - non-finite (critical), once until the buffer is finite again.

    The event names the weight of the layer feeding the normalisation (``RunInfo.buffer_inputs``,
    e.g. the convolution before a BatchNorm2d) first, then the buffer.  It is dated at the step
    that measured it; ``data["since"]`` is the measurement before (the step before, unless rows
    were not measured).

    Args:
        jump: growth of a running variance between two measurements (default 100).
        warmup: steps before the first judged measurement (default 50).
        cooldown: steps between two warnings (default 200).
    """

    kind = "running_stats"
    rescan = False  # firing changes only the cooldown and the non-finite flags

    def __init__(self, jump: float = 100.0, warmup: int = 50, cooldown: int = 200):
        super().__init__(cooldown)
        self.jump = check_pos("jump", jump)
        if self.jump <= 1:
            raise ValueError(f"jump must be > 1 (a factor of growth), got {jump!r}")
        self.warmup = check_int("warmup", warmup, 0)
        self._prev: np.ndarray | None = None  # each buffer's norm at the last measurement
        self._prev_step = -1
        self._bad: np.ndarray | None = None  # buffers reported non-finite, until finite again

    def bind(self, run):
        super().bind(run)
        self.buffers = list(run.buffers)
        self.inputs = list(run.buffer_inputs) or [None] * len(self.buffers)
        if self._prev is None or len(self._prev) != len(self.buffers):
            self._prev = np.full(len(self.buffers), np.nan)
            self._bad = np.zeros(len(self.buffers), bool)

    def _scan(self, steps, rows):
        if not self.buffers:
            return Scan([], len(rows), np.empty(0, np.intp))
        # every row measures the buffers; an all-NaN block on a clean step was not measured (rows
        # restored from an older guard's state), while a forward that poisons the statistics
        # poisons its own step (the normalised output is NaN too)
        bn = self.layout.buffer_norms(rows)
        idx = np.flatnonzero(~np.isnan(bn).all(1) | (rows[:, COL["bad"]] > 0))
        if not len(idx):
            return Scan([], len(rows), idx)
        b = bn[idx].astype(np.float64)
        # each measurement against the one before it (the state's for the first)
        prev = np.vstack([self._prev[None], b[:-1]])
        prev_step = np.r_[self._prev_step, steps[idx][:-1]]
        finite = np.isfinite(b)
        with np.errstate(all="ignore"):
            ratio = np.where((prev > 0) & finite & (prev_step >= self.warmup)[:, None], b / prev, 0.0)
        # non-finite: report a buffer the first time, not again while it stays so
        new_bad = ~finite & ~np.vstack([self._bad[None], ~finite[:-1]])
        fired = np.flatnonzero((ratio >= self.jump).any(1) | new_bad.any(1))
        return Scan(idx[fired].tolist(), len(rows), idx, steps=steps, b=b, ratio=ratio,  # numpy, no host sync
                    new_bad=new_bad, prev_step=prev_step)

    def _absorb(self, s, a, b):
        ja, jb = s.span(a, b) if b > a else (0, 0)
        if jb > ja:
            last = s.b[jb - 1]
            self._prev = last.copy()
            self._prev_step = int(s.steps[s.idx[jb - 1]])
            self._bad = ~np.isfinite(last)

    def _fire(self, s, k):
        j = s.at(k)
        step, since = int(s.steps[k]), int(s.prev_step[j])
        self._absorb(s, k, k + 1)
        bad = np.flatnonzero(s.new_bad[j])
        if len(bad):
            names = [self.buffers[i] for i in bad]
            layers = self._layers(bad)
            return self._emit(step, "critical", layers,
                              f"the running statistics of {', '.join(names)} hold NaN/Inf: "
                              f"{self._when(since, step)} put a non-finite activation into them.  Skipping the "
                              f"step does not undo that; in eval mode the layer outputs NaN until they are "
                              f"reset.", {"buffers": names, "since": since})
        i = int(np.argmax(s.ratio[j]))
        r = float(s.ratio[j][i])
        order = np.argsort(-s.ratio[j], kind="stable")
        grown = [int(x) for x in order if s.ratio[j][x] >= self.jump]
        src = self.inputs[i]
        feed = f" (the output of {src.rpartition('.')[0] or src})" if src else ""
        when = f"at step {step}" if since == step - 1 else f"between steps {since} and {step}"
        msg = (f"the running variance of {self.buffers[i].rpartition('.')[0]} grew {r:.3g}x {when}: the "
               f"activations entering it{feed} were at least {math.sqrt(r):.3g}x their usual scale on "
               f"that batch.  Training-mode normalisation hides such a batch "
               f"from the gradients and the loss; evaluation divides by these statistics until they decay.")
        return self._emit(step, "warning", self._layers(grown), msg,
                          {"buffers": [self.buffers[x] for x in grown], "growth": r, "since": since})

    @staticmethod
    def _when(since: int, step: int) -> str:
        return f"the forward pass of step {step}" if since == step - 1 else \
            f"a forward pass of steps {since + 1}-{step}"

    def _layers(self, which) -> list[str]:
        """The feeding layers' weights (where known), then the buffers themselves."""
        feeds = [self.inputs[i] for i in which if self.inputs[i]]
        return list(dict.fromkeys(feeds + [self.buffers[i] for i in which]))

    def state_dict(self):
        return {**self._base_state(), "prev": array_to_list(self._prev), "prev_step": self._prev_step,
                "bad": self._bad.tolist()}  # numpy, no host sync

    def load_state_dict(self, sd):
        self._load_base(sd)
        self._prev = list_to_array(sd["prev"])
        self._prev_step = int(sd["prev_step"])
        self._bad = np.asarray(sd["bad"], bool)
