"""DivergenceDetector: the loss leaving the range it started in, judged against the run's own start."""
from __future__ import annotations

import math
from collections import deque
from itertools import accumulate

import numpy as np

from .._json import array_to_list, list_to_array
from ..layout import COL
from . import _window as W
from .base import SEV, Detector, Scan, check_int, check_pos


class DivergenceDetector(Detector):
    """The run diverging: its loss leaving the range it started in.

    Every other detector compares a step with a recent baseline, so a run that blows up
    inside their warm-up, or grows by a steady 25% a step, is never "unusual" against
    itself.  This one keeps a reference from the run's own start: ``L0``, the median of the
    first ``ref_steps`` finite losses, or the first of them while they grow (each at least the
    one before, or one at least ``ratio`` x the first: a loss growing from step 0 must not
    raise its own reference; a lucky or unlucky first batch must not set it either), and
    ``G0``, the median of their log global gradient norms.  On each step ``m`` is the smallest of the last ``persist`` finite losses (the
    loss has stayed at least that high: heavy-tailed batches do not move it) and the rule
    holds when

    - level: ``m >= ratio * L0``; or
    - trend: the CUSUM of ``log(m / L0) - log(drift)`` reaches ``h`` (a loss that keeps
      sitting above its start, even by less than ``ratio``; reset when it fires); or
    - gradient growth with a consequence: the gradient norm is ``>= grad_ratio`` x ``G0``
      while ``m >= respond * L0`` (gradients growing alone is normal: a norm 40x its start
      is seen in healthy LSTMs; growing while the loss gives back its progress is not);
    - shock: one step's own loss is ``>= critical`` x ``L0`` with its gradient norm
      ``>= grad_ratio`` x ``G0``, and the next step's loss is still ``>= respond`` x ``L0``
      (a wrecking update, a corrupted batch: no need to wait for the median).  The next step
      is the consequence: a batch from a heavy-tailed distribution gives one such loss and
      gradient, and the run's next loss is back in its range.

    Since when: an event is dated at the first of the ``persist`` losses that stayed high
    (level, growth), or at the shock's own step, and ``data["seen_at"]`` is the step that raised
    it; the CUSUM's slow rise has no one step and is dated when it fires.

    Severity: critical when ``m >= critical * L0`` or on a shock, else warning.  Culprits: the layers
    holding most of the rise of the squared gradient norm over their start.  Needs
    positive losses (the rule is off when ``L0 <= 0``).  One event per ``cooldown`` steps
    unless it is more severe.

    Args:
        ref_steps: finite losses that make the start reference (default 5).
        persist: consecutive losses that must all be high (default 3).
        ratio: level rule, multiple of ``L0`` (default 2).
        drift: losses below ``drift * L0`` feed the CUSUM nothing (default 1.25).
        h: CUSUM threshold, in log units (default 1.0).
        grad_ratio: gradient growth over ``G0`` (default 10).
        respond: the loss level (multiple of ``L0``) at which gradient growth counts (default 1.2).
        critical: multiple of ``L0`` that makes the event critical (default 10).
        cooldown: steps between two events (default 200).
    """

    kind = "diverging"
    rescan = True  # firing resets the CUSUM and the cooldown: later rows are judged again

    def __init__(self, ref_steps: int = 5, persist: int = 3, ratio: float = 2.0, drift: float = 1.25,
                 h: float = 1.0, grad_ratio: float = 10.0, respond: float = 1.2, critical: float = 10.0,
                 cooldown: int = 200):
        super().__init__(cooldown)
        self.ref_steps = check_int("ref_steps", ref_steps, 1)
        self.persist = check_int("persist", persist, 1)
        self.ratio = check_pos("ratio", ratio)
        self.drift = check_pos("drift", drift)
        self.h = check_pos("h", h)
        self.grad_ratio = check_pos("grad_ratio", grad_ratio)
        self.respond = check_pos("respond", respond)
        self.critical = check_pos("critical", critical)
        for name in ("ratio", "drift", "critical"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        self._ref: list = []          # (loss, log global norm) of the first ref_steps valid steps
        self._ref_layers = None       # log per-layer norms of the first valid step
        # the last finite losses and their steps (-1: unknown, a state saved without them)
        self._recent: deque = deque(maxlen=max(self.persist - 1, 1))
        self._cusum = 0.0
        self._shock = False           # the last valid step was a shock, not yet confirmed or not

    def _scan(self, steps, rows):
        loss = rows[:, COL["loss"]].astype(np.float64)
        g = rows[:, COL["global_norm"]].astype(np.float64)
        # steps the rule reads: nothing poisoned (the core reports those), a finite loss and norm
        idx = np.flatnonzero((rows[:, COL["bad"]] == 0) & np.isfinite(loss) & np.isfinite(g) & (g > 0))
        x, lg = loss[idx], W.log(g[idx])
        need = max(self.ref_steps - len(self._ref), 0)
        ref = self._ref + list(zip(x[:need].tolist(), lg[:need].tolist()))  # numpy, no host sync
        k = len(idx)
        j0 = 0 if self._ref else 1  # a run's first valid step is its reference, never judged
        fired, keep = [], {}
        if j0 < k:
            # the reference each row sees: the start so far (complete after ref_steps steps)
            table_l = [0.0] + [self._start_loss([r[0] for r in ref[:c]])
                               for c in range(1, min(len(ref), self.ref_steps) + 1)]
            table_g = [0.0] + [float(np.median([r[1] for r in ref[:c]]))
                               for c in range(1, min(len(ref), self.ref_steps) + 1)]
            cnt = np.minimum(len(self._ref) + np.arange(j0, k), self.ref_steps)
            l0, g0 = np.asarray(table_l)[cnt], np.asarray(table_g)[cnt]
            # the smallest of the last `persist` finite losses; the first steps of a run
            # have fewer before them (NaN padding, ignored by nanmin)
            prev = np.array(list(self._recent) if self.persist > 1 else [], np.float64).reshape(-1, 2)
            pad = self.persist - 1 - len(prev)  # at most persist - 1 before (maxlen)
            cat = np.concatenate([np.full(pad, np.nan), prev[:, 0], x])
            w = np.lib.stride_tricks.sliding_window_view(cat, self.persist)[j0:]
            med = w[:, -1] if self.persist == 1 else np.nanmin(w, axis=1)
            # the steps of those losses (-1: before the run, or unknown)
            st_all = steps[idx]
            cat_st = np.concatenate([np.full(pad, -1, np.int64), prev[:, 1].astype(np.int64), st_all])
            ws = np.lib.stride_tricks.sliding_window_view(cat_st, self.persist)[j0:]
            first_st = np.where(ws >= 0, ws, np.iinfo(np.int64).max).min(1)
            last = int(self._recent[-1][1]) if self._recent else -1
            before_st = np.concatenate([[last], st_all])[j0:k]  # each row's previous finite loss
            on = l0 > 0  # the rule needs positive losses
            rel = np.where(on, W.log(med) - W.log(l0), -np.inf)
            # the CUSUM recursion in step order, one float operation at a time, so that any
            # chunking of the rows gives the same bits (a cumsum would round differently)
            cusum = np.fromiter(accumulate(np.maximum(rel - math.log(self.drift), -1e3).tolist(),  # numpy, no host sync
                                           lambda a, b: max(0.0, a + b), initial=self._cusum),
                                np.float64, len(rel) + 1)[1:]
            big_g = lg[j0:] - g0 >= math.log(self.grad_ratio)
            grows = big_g & (rel >= math.log(self.respond))
            lx = W.log(x[j0:]) - W.log(l0)
            struck = big_g & on & (lx >= math.log(self.critical))  # this step: a shock, if it lasts
            after = np.concatenate([[self._shock], struck[:-1]])  # the step before was one
            shock = after & on & (lx >= math.log(self.respond))
            level = rel >= math.log(self.ratio)
            hit = level | (cusum >= self.h) | grows | shock
            # since when: the first of the losses that stayed high (level, growth), the shock's
            # own step; the CUSUM's slow rise has no one step, it is dated when it fires
            st = steps[idx[j0:]]
            date = np.where(level | grows, np.minimum(first_st, st), st)
            date = np.where(shock & (before_st >= 0), np.minimum(date, before_st), date)
            sev = np.where((rel >= math.log(self.critical)) | shock, SEV["critical"], SEV["warning"])
            # the cooldown, judged here (on the step an event would be dated, as ``_emit`` does)
            # so that a run that stays diverged is scanned once per flush
            hit &= (date - self._last_step >= self.cooldown) | (sev > self._last_sev)
            fired = idx[j0:][hit].tolist()  # numpy, no host sync
            keep = dict(l0=l0, g0=g0, med=med, rel=rel, cusum=cusum, sev=sev, struck=struck, date=date)
        return Scan(fired, len(rows), idx, rows=rows, steps=steps, x=x, lg=lg, j0=j0, **keep)

    def _start_loss(self, first: list) -> float:
        """``L0`` from the first finite losses: the first one while they grow (each at least the
        one before, or one of them ``ratio`` x the first: a run blowing up from step 0 must not
        raise its own reference), else their median (a lucky or unlucky first batch must not
        set it either)."""
        if all(b >= a for a, b in zip(first, first[1:])) or max(first) >= self.ratio * first[0]:
            return first[0]
        return float(np.median(first))

    def _absorb(self, s, a, b):
        if b <= a:
            return
        ja, jb = s.span(a, b)
        if jb <= ja:
            return
        need = self.ref_steps - len(self._ref)
        if need > 0:
            take = min(need, jb - ja)
            if self._ref_layers is None:
                self._ref_layers = W.log(self.layout.norms(s.rows[s.idx[ja]])).astype(np.float64)
            self._ref += list(zip(s.x[ja:ja + take].tolist(), s.lg[ja:ja + take].tolist()))  # numpy, no host sync
        lo = max(ja, jb - self._recent.maxlen)
        self._recent.extend(zip(s.x[lo:jb].tolist(), s.steps[s.idx[lo:jb]].tolist()))  # numpy, no host sync
        if jb > s.j0 and hasattr(s, "cusum"):
            self._cusum = float(s.cusum[jb - 1 - s.j0])
            self._shock = bool(s.struck[jb - 1 - s.j0])

    def _fire(self, s, k):
        j = s.at(k)
        t = j - s.j0
        med, rel, sev = float(s.med[t]), float(s.rel[t]), int(s.sev[t])
        l0 = float(s.l0[t])
        gratio = math.exp(float(s.lg[j]) - float(s.g0[t]))
        before = self._recent[-1][0] if self._recent else math.nan  # the shock's own loss (absorbed)
        self._absorb(s, k, k + 1)
        self._cusum = 0.0
        norms = self.layout.norms(s.rows[k])
        layers, shares = W.jump_culprits(self.names, norms, self._ref_layers)
        top = f"; {shares[0]:.0%} of the gradient growth from {layers[0]}" if layers else ""
        step, date = int(s.steps[k]), int(s.date[t])
        if rel >= math.log(self.respond):
            since = f"steps {date}-{step}" if date < step else f"the last {self.persist}"
            what = f"loss {med:.4g} (lowest of {since}) is {math.exp(rel):.1f}x"
            msg = (f"{what} its value at the start ({l0:.4g}) and the gradient norm is {gratio:.3g}x its "
                   f"start: the run is diverging{top}.")
        else:  # the shock rule: the step before, and this step still high
            at = f"at step {date}" if date < step else "on the step before"
            msg = (f"loss {before:.4g} {at} was {before / l0:.1f}x its value at the start "
                   f"({l0:.4g}), and {float(s.x[j]):.4g} at step {step} ({float(s.x[j]) / l0:.1f}x) is still high, "
                   f"with the gradient norm {gratio:.3g}x its start: the update wrecked the run{top}.")
        data = {"loss": med, "start_loss": l0, "loss_ratio": math.exp(rel), "grad_ratio": gratio,
                "cusum": float(s.cusum[t]), "shares": shares}
        if date < step:  # dated where the loss left its range; raised (known) at this step
            data["seen_at"] = step
        return self._emit(date, "critical" if sev == SEV["critical"] else "warning", layers, msg, data)

    def state_dict(self):
        return {**self._base_state(), "ref": [list(r) for r in self._ref],
                "ref_layers": None if self._ref_layers is None else array_to_list(self._ref_layers),
                "recent": [v for v, _ in self._recent], "recent_steps": [t for _, t in self._recent],
                "cusum": self._cusum, "shock": self._shock}

    def load_state_dict(self, sd):
        self._load_base(sd)
        self._ref = [tuple(float(v) for v in r) for r in sd["ref"]]
        self._ref_layers = None if sd["ref_layers"] is None else list_to_array(sd["ref_layers"])
        # states saved before events were dated hold no steps: unknown (-1), the next ones date
        steps = sd.get("recent_steps") or [-1] * len(sd["recent"])
        self._recent = deque(((float(v), int(t)) for v, t in zip(sd["recent"], steps)),
                             maxlen=max(self.persist - 1, 1))
        self._cusum = float(sd["cusum"])
        self._shock = bool(sd.get("shock", False))  # states saved before the confirmation: no shock pending
