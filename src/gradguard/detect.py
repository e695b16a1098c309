"""Detectors: turn recorded step rows into events.

This module reads host-side rows (one per step, drained from the device
buffer once per flush interval) and returns ``Event`` objects.  It never
changes the model or the optimizer; actions live in ``guard.py`` / ``act.py``.

Each detector is a small object with ``bind(guard)``, ``update(steps, rows,
guard) -> list[Event]`` and ``state_dict()`` / ``load_state_dict()``.  Rows
are numpy float32: the global columns (``guard.GLOBAL_COLS``), then one L2
norm per watched tensor, then one max |g| per tensor.  All numbers are the
PRE-clip ones.  Running statistics only ever absorb finite values.

Event kinds: ``"spike"``, ``"exploding"``, ``"loss_spike"``, ``"vanishing"``,
``"weight_growth"``, ``"over_clipping"`` (plus ``"nonfinite"`` from the core).
Every threshold is a constructor argument; defaults are in docs/detection.md.
"""
from __future__ import annotations

import math
from collections import deque
from itertools import chain

import numpy as np

from .events import Event

__all__ = [
    "nonfinite_event", "NONFINITE_ADVICE", "Detector", "SpikeDetector", "ExplodingDetector",
    "LossSpikeDetector", "VanishingDetector", "WeightGrowthDetector", "OverClippingDetector",
    "default_detectors", "advice_for",
]

NONFINITE_ADVICE = [
    "Lower the learning rate (divide by 10) and keep gradient clipping on, e.g. gg.GlobalNorm(1.0).",
    "Look for log(0), division by ~0 or sqrt of a negative in the loss and in the layers named; "
    "add an epsilon there.",
    "Under fp16 autocast, use torch.amp.GradScaler, or bf16 instead.",
    "Check the batch for NaN/Inf inputs or labels (pass batch=... to keep it in the flight record).",
]

def _num(x: float):
    """A JSON-safe number: non-finite values become the strings 'NaN', 'Inf', '-Inf'."""
    return float(x) if math.isfinite(x) else _fmt(x)


_MAD = 1.4826  # MAD -> standard deviation for normal data
_SEV = {"info": 0, "warning": 1, "critical": 2}


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    return f"{x:.3g}"


def nonfinite_event(step: int, names: list[str], max_abs: np.ndarray, loss: float, loss_bad: bool,
                    global_norm: float, skipped: bool, amp: bool = False, advice: list | None = None,
                    module_types: tuple | None = None) -> Event:
    """The event for a step with NaN/Inf in gradients, loss or global norm.

    ``max_abs`` is per watched layer (NaN where the layer had no gradient is
    impossible to tell from a NaN gradient, so missing layers carry +0 here).
    Culprits are listed from the output side back: NaN flows backward from the
    op that made it, so the last layer (in model order) that holds it is the
    closest to its origin.
    """
    bad = ~np.isfinite(max_abs)
    layers = [names[i] for i in np.flatnonzero(bad)][::-1]
    what = "skipped" if skipped else "applied anyway"
    if layers:
        n_nan = int(np.isnan(max_abs).sum())
        kinds = []
        if n_nan:
            kinds.append("NaN")
        if int(bad.sum()) - n_nan:
            kinds.append("Inf")
        shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
        message = (f"{'/'.join(kinds)} in the gradients of {len(layers)} of {len(names)} tensors "
                   f"({shown}); step {what}.")
    elif loss_bad:
        message = f"loss is {_fmt(loss)}; step {what}."
    else:
        message = (f"global grad norm overflowed to {_fmt(global_norm)} although every gradient is "
                   f"finite; step {what}.")
    if amp and not loss_bad:  # the scaler's own overflow; a NaN loss is a real problem
        return Event(step, "amp_overflow", "info", layers,
                     "GradScaler found Inf/NaN in the scaled gradients (normal while it calibrates "
                     "its scale); " + message[0].lower() + message[1:],
                     ["Nothing to do unless this happens on most steps; then check the loss for NaN."],
                     {"loss": _num(loss), "global_norm": _num(global_norm), "skipped": skipped})
    if advice is None and module_types is not None:
        advice = advice_for("nonfinite", layers, *module_types)
    return Event(step, "nonfinite", "critical", layers, message,
                 list(advice) if advice else list(NONFINITE_ADVICE),
                 {"loss": _num(loss), "global_norm": _num(global_norm), "skipped": skipped})


# --------------------------------------------------------------------- advice
_RNN_TYPES = ("RNN", "RNNCell")
_GATED_TYPES = ("LSTM", "GRU", "LSTMCell", "GRUCell")
_CONV_PREFIX = "Conv"
_SATURATING = ("Sigmoid", "Tanh", "Hardtanh", "Softsign", "Hardsigmoid")

CLIP_ADVICE = ("Clip the gradients: Guard(..., clip=gg.GlobalNorm(1.0)) (norm), gg.Value(0.5) (value) "
               "or gg.PerLayer({...}) (per-layer thresholds).")
LR_ADVICE = ("Lower the learning rate (divide by 10) or the batch size, or let gradguard back off: "
             "Guard(..., remedies={'exploding': 'lr_backoff'}).")
L2_ADVICE = "Add an L2 weight penalty: loss = loss + gg.penalty(model, l2=1e-4) (or AdamW weight_decay)."
NORM_ADVICE = "Add LayerNorm/BatchNorm between layers, or residual connections; or use fewer layers."
INIT_ADVICE = ("Re-initialise the weights: He (nn.init.kaiming_normal_) for ReLU layers, Xavier "
               "(nn.init.xavier_uniform_) for tanh/sigmoid layers.")
ACT_ADVICE = "Use ReLU, LeakyReLU or ELU instead of sigmoid/tanh activations."
RNN_ADVICE = "Replace nn.RNN with nn.LSTM or nn.GRU: gated units keep long-range gradients bounded."
TBPTT_ADVICE = ("Use truncated BPTT: for chunk, h in gg.tbptt(x, k=..., hidden=h): ... "
                "(the hidden state is detached between chunks).")
RECUR_INIT_ADVICE = ("Initialise the recurrent weight orthogonally (nn.init.orthogonal_) and keep "
                     "its spectral radius at or below 1.")
ROLLBACK_ADVICE = ("Restore the last good state and skip the next batches (PaLM's recipe): "
                   "Guard(..., remedies={'spike': 'rollback'}).")
BATCH_ADVICE = ("Inspect this step's batch (pass guard.step(loss, batch=batch) and a flight recorder "
                "to keep it) for corrupt inputs or labels.")


def _module_types(guard) -> tuple[dict[str, str], set[str]]:
    """Parameter name -> type name of the module that owns it; all module type names."""
    model = getattr(guard, "model", None)
    if model is None:
        return {}, set()
    mods = dict(model.named_modules())
    owner = {}
    for name in guard.names:
        prefix = name.rpartition(".")[0]
        m = mods.get(prefix)
        if m is not None:
            owner[name] = type(m).__name__
    return owner, {type(m).__name__ for m in mods.values()}


def advice_for(kind: str, layers: list[str], owner: dict[str, str], all_types: set[str],
               data: dict | None = None) -> list[str]:
    """Concrete remedies for an event of ``kind`` whose culprits are ``layers``.

    Args:
        kind: an event kind.
        layers: culprit parameter names, most responsible first.
        owner: parameter name -> owning module's type name (may be empty).
        all_types: every module type name in the model (may be empty).
        data: the event's numbers (e.g. ``median_norm`` for over_clipping).
    Returns:
        a list of advice strings, the most specific first.
    """
    types = [owner.get(n, "") for n in layers[:3]]
    rnn = any(t in _RNN_TYPES for t in types)
    gated = any(t in _GATED_TYPES for t in types)
    conv = any(t.startswith(_CONV_PREFIX) for t in types)
    saturating = bool(all_types & set(_SATURATING)) or not all_types
    has_norm = any("Norm" in t for t in all_types)
    out: list[str] = []
    if kind in ("exploding", "spike"):
        if rnn:
            out += [RNN_ADVICE, TBPTT_ADVICE, RECUR_INIT_ADVICE]
        elif gated:
            out += [TBPTT_ADVICE]
        out += [CLIP_ADVICE, LR_ADVICE]
        if kind == "spike":
            out += [ROLLBACK_ADVICE, BATCH_ADVICE]
        else:
            out += [INIT_ADVICE]
            if not has_norm and not (rnn or gated):
                out.append(("Add BatchNorm2d after each convolution. " if conv else "") + NORM_ADVICE)
            out.append(L2_ADVICE)
    elif kind == "loss_spike":
        out += [BATCH_ADVICE, ROLLBACK_ADVICE, CLIP_ADVICE, LR_ADVICE]
    elif kind == "nonfinite":
        if rnn:
            out += [RNN_ADVICE, TBPTT_ADVICE]
        out += list(NONFINITE_ADVICE)
    elif kind == "vanishing":
        if rnn:
            out += [RNN_ADVICE, TBPTT_ADVICE]
        if saturating:
            out.append(ACT_ADVICE)
        out += [INIT_ADVICE, ("Add BatchNorm2d after each convolution; " if conv else "") + NORM_ADVICE]
        out.append("If only these layers lag, give them a higher learning rate (a separate param group).")
    elif kind == "weight_growth":
        out += [L2_ADVICE, LR_ADVICE, CLIP_ADVICE]
        if not has_norm:
            out.append(NORM_ADVICE)
    elif kind == "over_clipping":
        med = (data or {}).get("median_norm")
        thr = f" (about the median pre-clip norm, {med:.3g})" if med and math.isfinite(med) else ""
        out += [f"Raise the clip threshold{thr}, or use adaptive clipping (gg.AutoClip / gg.ZClip).",
                "If the norm is huge because training is diverging, fix the cause (lower the learning "
                "rate, better init) rather than clipping harder."]
    return out


# ------------------------------------------------------------------ helpers
def _median_sorted(a: list) -> float:
    h = len(a) // 2
    return a[h] if len(a) % 2 else (a[h - 1] + a[h]) / 2


def _robust(values) -> tuple[float, float]:
    """(median, MAD scaled to a standard deviation) of finite values.

    Plain sorted() on the (short) history: the same numbers as np.median, at a
    third of the cost on ~100 values, which matters as it runs on every row.
    """
    a = sorted(float(v) for v in values)
    med = _median_sorted(a)
    return med, _MAD * _median_sorted(sorted(abs(v - med) for v in a))


def _log(x: np.ndarray) -> np.ndarray:
    # maximum() maps 0 and negatives to 1e-300 and keeps NaN/Inf: log() never warns here
    return np.log(np.maximum(np.asarray(x, np.float64), 1e-300))


def _to_list(a) -> list:
    """Array -> nested list with NaN as None (NaN != NaN would break state comparisons)."""
    a = np.asarray(a, np.float64)
    return np.where(np.isnan(a), None, a).tolist()  # numpy, no host sync


def _from_list(x) -> np.ndarray:
    return np.array(x, dtype=np.float64)  # None -> nan


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return _num(float(x))
    if isinstance(x, np.integer):
        return int(x)
    return x


def _names_list(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _check_pos(name: str, v, *, allow_zero=False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
            or (v == 0 and not allow_zero):
        rng = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {rng}, got {v!r}")
    return float(v)


def _check_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _median_rows(w: np.ndarray) -> np.ndarray:
    """np.median(w, axis=1), bit for bit, without np.median's generic machinery."""
    h = w.shape[1] // 2
    if w.shape[1] % 2:
        return np.partition(w, h, axis=1)[:, h]
    p = np.partition(w, (h - 1, h), axis=1)
    return (p[:, h - 1] + p[:, h]) / 2


def _windows_robust(cat: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``_robust`` of each run of ``size`` values in ``cat`` but the last: the baseline of
    each of the ``len(cat) - size`` newest values."""
    count = len(cat) - size
    w = np.lib.stride_tricks.as_strided(cat, (count, size), (cat.strides[0],) * 2, writeable=False)
    med = _median_rows(w)
    return med, _MAD * _median_rows(np.abs(w - med[:, None]))


def _window_robust(hist: deque, new: list, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``_robust`` of the ``size`` values before each of ``new`` in ``hist + new``
    (``hist`` holds exactly ``size`` values), for all of them at once."""
    cat = np.fromiter(chain(hist, new), np.float64, len(hist) + len(new))
    return _windows_robust(cat, size)


def _valid_global(rows: np.ndarray, col: dict) -> tuple[np.ndarray, list]:
    """Indices of rows with finite, positive global norm and no NaN/Inf; their log norms."""
    g = rows[:, col["global_norm"]].astype(np.float64)
    idx = np.flatnonzero((rows[:, col["bad"]] == 0) & np.isfinite(g) & (g > 0))  # NaN compares False, silently
    return idx, [math.log(v) for v in g[idx].tolist()]  # numpy, no host sync


class _LayerRing:
    """The last ``size`` finite log per-layer norms, for per-layer baselines."""

    def __init__(self, size: int):
        self.size = size
        self.buf: np.ndarray | None = None
        self.n = 0

    def push(self, log_norms: np.ndarray) -> None:
        if self.buf is None:
            self.buf = np.full((self.size, len(log_norms)), np.nan)
        row = np.where(np.isfinite(log_norms), log_norms, np.nan)
        self.buf[self.n % self.size] = row
        self.n += 1

    def push_many(self, log_norms: np.ndarray) -> None:
        """``push`` each row of ``log_norms`` (k, L), oldest first."""
        k = len(log_norms)
        if not k:
            return
        if self.buf is None:
            self.buf = np.full((self.size, log_norms.shape[1]), np.nan)
        pos = (self.n + np.arange(k)) % self.size
        block = np.where(np.isfinite(log_norms), log_norms, np.nan)
        if k > self.size:
            pos, block = pos[-self.size:], block[-self.size:]
        self.buf[pos] = block
        self.n += k

    def median(self) -> np.ndarray | None:
        if self.buf is None or self.n == 0:
            return None
        with np.errstate(all="ignore"), _quiet():
            return np.nanmedian(self.buf[: min(self.n, self.size)], axis=0)

    def state_dict(self) -> dict:
        return {"n": self.n, "buf": None if self.buf is None else _to_list(self.buf)}

    def load_state_dict(self, sd: dict) -> None:
        self.n = int(sd["n"])
        self.buf = None if sd["buf"] is None else _from_list(sd["buf"])


class _quiet:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def _jump_culprits(names: list[str], norms: np.ndarray, base_log: np.ndarray | None,
                   k: int = 5, min_share: float = 0.05) -> tuple[list[str], list[float]]:
    """Layers ranked by their share of the rise in squared norm over a baseline."""
    n2 = np.where(np.isfinite(norms), norms.astype(np.float64) ** 2, 0.0)
    if base_log is None:
        b2 = np.zeros_like(n2)
    else:
        b2 = np.where(np.isfinite(base_log), np.exp(2 * np.minimum(base_log, 700)), 0.0)
    excess = np.maximum(n2 - b2, 0.0)
    if excess.sum() <= 0:
        excess = n2
    tot = excess.sum()
    if tot <= 0 or not np.isfinite(tot):
        return [], []
    share = excess / tot
    order = np.argsort(-share, kind="stable")
    picked = [i for i in order[:k] if share[i] >= min_share] or [int(order[0])]
    return [names[i] for i in picked], [float(share[i]) for i in picked]


class Detector:
    """Base class: column lookup, cooldown and advice.  Subclasses implement ``_row``.

    A detector emits at most one event of its kind per ``cooldown`` steps,
    unless the new event is more severe than the last one.
    """

    kind = ""

    def __init__(self, cooldown: int):
        self.cooldown = _check_int("cooldown", cooldown, 0)
        self._last_step = -(10 ** 12)
        self._last_sev = -1

    # -- wiring
    def bind(self, guard) -> None:
        from .guard import GLOBAL_COLS  # guard imports this module; resolved at bind time

        self.names = list(guard.names)
        self.n = len(self.names)
        self.col = {c: i for i, c in enumerate(GLOBAL_COLS)}
        self.g = len(GLOBAL_COLS)
        self.weight_idx = np.array([i for i, p in enumerate(guard.params) if p.dim() >= 2], dtype=int)
        self._owner, self._types = _module_types(guard)

    def update(self, steps: list[int], rows: np.ndarray, guard) -> list[Event]:
        # A batch in which no row can fire is absorbed with whole-batch numpy
        # (``_quiet_batch``); any other batch goes row by row.  Both give the
        # same state, bit for bit (tests/test_detect.py::test_batches_equal_rows).
        if len(steps) > 1 and self._quiet_batch(steps, rows):
            return []
        out = []
        for step, row in zip(steps, rows):
            ev = self._row(int(step), row)
            if ev is not None:
                out.append(ev)
        return out

    def _row(self, step: int, row: np.ndarray) -> Event | None:
        raise NotImplementedError

    def _quiet_batch(self, steps, rows: np.ndarray) -> bool:
        """Absorb ``rows`` at once and return True if none of them can fire; else change
        nothing and return False.  Default: no fast path."""
        return False

    # -- helpers
    def _norms(self, row):
        return row[self.g:self.g + self.n]

    def _ok(self, row) -> bool:
        return row[self.col["bad"]] == 0

    def _emit(self, step, severity, layers, message, data) -> Event | None:
        sev = _SEV[severity]
        if step - self._last_step < self.cooldown and sev <= self._last_sev:
            return None
        self._last_step, self._last_sev = step, sev
        adv = advice_for(self.kind, layers, self._owner, self._types, data)
        return Event(step, self.kind, severity, list(layers), message, adv, _json_safe(data))

    def _base_state(self) -> dict:
        return {"last_step": self._last_step, "last_sev": self._last_sev}

    def _load_base(self, sd: dict) -> None:
        self._last_step = int(sd["last_step"])
        self._last_sev = int(sd["last_sev"])

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, sd: dict) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---------------------------------------------------------------- detectors
class _BaselineDetector(Detector):
    """State shared by the spike detectors: a window of finite log values and per-layer baselines."""

    def state_dict(self):
        return {**self._base_state(), "hist": list(self._hist), "layers": self._layers.state_dict()}

    def load_state_dict(self, sd):
        self._load_base(sd)
        self._hist = deque(sd["hist"], maxlen=self.window)
        self._layers.load_state_dict(sd["layers"])


class SpikeDetector(_BaselineDetector):
    """One-step outlier of the global gradient norm against a robust baseline.

    The baseline is the median / MAD of the log global norm over the last
    ``window`` finite steps.  After ``warmup`` steps, a step fires when its log
    norm is ``z`` robust standard deviations above the median AND the norm is
    at least ``ratio`` times the median.  A spike enters the baseline clipped to
    the threshold, so one outlier cannot drag the baseline up.

    Args:
        window: steps in the baseline (default 100).
        warmup: finite steps before any verdict (default 20).
        z: robust z-score threshold on the log norm (default 6).
        ratio: minimum norm / median ratio (default 5).
        min_scale: floor of the log-space spread, so a flat history does not
            make tiny jumps significant (default 0.1, i.e. ~10%).
        cooldown: steps between two spike events (default 10).

    Example:
        >>> gg.Guard(model, opt, detectors=[gg.SpikeDetector(ratio=10)])
    """

    kind = "spike"

    def __init__(self, window: int = 100, warmup: int = 20, z: float = 6.0, ratio: float = 5.0,
                 min_scale: float = 0.1, cooldown: int = 10):
        super().__init__(cooldown)
        self.window = _check_int("window", window, 2)
        self.warmup = _check_int("warmup", warmup, 1)
        self.z = _check_pos("z", z)
        self.ratio = _check_pos("ratio", ratio)
        if self.ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {ratio!r}")
        self.min_scale = _check_pos("min_scale", min_scale)
        self._hist: deque = deque(maxlen=self.window)
        self._layers = _LayerRing(self.window)

    def _row(self, step, row):
        g = float(row[self.col["global_norm"]])
        if not self._ok(row) or not math.isfinite(g) or g <= 0:
            return None
        lg = math.log(g)
        lnorms = _log(self._norms(row))
        ev = None
        if len(self._hist) >= self.warmup:
            med, mad = _robust(self._hist)
            scale = max(mad, self.min_scale)
            thr = med + max(self.z * scale, math.log(self.ratio))
            if lg > thr:
                ratio = math.exp(lg - med)
                layers, shares = _jump_culprits(self.names, self._norms(row), self._layers.median())
                top = f"; {shares[0]:.0%} of the jump from {layers[0]}" if layers else ""
                msg = (f"global grad norm {g:.3g} is {ratio:.0f}x its median {math.exp(med):.3g} over "
                       f"the last {len(self._hist)} steps (robust z {(lg - med) / scale:.0f}){top}.")
                sev = "critical" if ratio >= 1e4 else "warning"
                ev = self._emit(step, sev, layers, msg, {
                    "global_norm": g, "median_norm": math.exp(med), "ratio": ratio,
                    "z": (lg - med) / scale, "shares": shares})
                lg = thr
            self._hist.append(lg)
        else:
            self._hist.append(lg)
        self._layers.push(lnorms)
        return ev

    def _quiet_batch(self, steps, rows):
        if len(self._hist) < self.window or self.window < self.warmup:
            return False  # warming up: row by row
        idx, lgs = _valid_global(rows, self.col)
        if len(lgs):
            med, mad = _window_robust(self._hist, lgs, self.window)
            thr = med + np.maximum(self.z * np.maximum(mad, self.min_scale), math.log(self.ratio))
            if (np.asarray(lgs) > thr).any():
                return False
        self._hist.extend(lgs)
        self._layers.push_many(_log(rows[idx, self.g:self.g + self.n]))
        return True


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

    Example:
        >>> gg.Guard(model, opt, detectors=[gg.ExplodingDetector(absurd=1e5)])
    """

    kind = "exploding"

    def __init__(self, absurd: float = 1e6, trend_window: int = 6, trend_growth: float = 20.0,
                 min_rate: float = 1.5, level_ratio: float = 100.0, level_steps: int = 2,
                 history: int = 100, warmup: int = 20, depth_ratio: float = 1e3,
                 depth_monotone: float = 0.75, depth_min_layers: int = 4, depth_every: int = 10,
                 cooldown: int = 20):
        super().__init__(cooldown)
        self.absurd = _check_pos("absurd", absurd)
        self.trend_window = _check_int("trend_window", trend_window, 2)
        self.trend_growth = _check_pos("trend_growth", trend_growth)
        self.min_rate = _check_pos("min_rate", min_rate)
        self.level_ratio = _check_pos("level_ratio", level_ratio)
        self.level_steps = _check_int("level_steps", level_steps, 1)
        self.history = _check_int("history", history, 2)
        self.warmup = _check_int("warmup", warmup, 1)
        self.depth_ratio = _check_pos("depth_ratio", depth_ratio)
        if not 0 < depth_monotone <= 1:
            raise ValueError(f"depth_monotone must be in (0, 1], got {depth_monotone!r}")
        self.depth_monotone = float(depth_monotone)
        self.depth_min_layers = _check_int("depth_min_layers", depth_min_layers, 2)
        self.depth_every = _check_int("depth_every", depth_every, 1)
        self._recent: deque = deque(maxlen=self.trend_window - 1)  # (log norm, log per-layer norms)
        self._hist: deque = deque(maxlen=self.history)
        self._above = 0
        self._seen = 0

    def _row(self, step, row):
        g = float(row[self.col["global_norm"]])
        if not self._ok(row) or not math.isfinite(g) or g <= 0:
            return None
        norms = self._norms(row)
        lg, lnorms = math.log(g), _log(norms)
        first = self._seen == 0
        self._seen += 1
        found = None  # (severity, layers, message, data)

        if g >= self.absurd:
            layers, shares = _jump_culprits(self.names, norms, None)
            found = ("critical", layers,
                     f"global grad norm {g:.3g} is above the absurd limit {self.absurd:.3g}; "
                     f"{shares[0]:.0%} of it from {layers[0]}." if layers else
                     f"global grad norm {g:.3g} is above the absurd limit {self.absurd:.3g}.",
                     {"rule": "absurd", "global_norm": g, "shares": shares})

        if found is None and len(self._recent) == self._recent.maxlen:
            logs = [r[0] for r in self._recent] + [lg]
            rise = lg - logs[0]
            if rise >= math.log(self.trend_growth):  # cheap test first: this runs on every row
                # least-squares slope of log-norm over the window (closed form of a degree-1 polyfit)
                n = len(logs)
                xm, ym = (n - 1) / 2, sum(logs) / n
                slope = (sum((i - xm) * (y - ym) for i, y in enumerate(logs))
                         / sum((i - xm) ** 2 for i in range(n)))
                rising = sum(b > a for a, b in zip(logs, logs[1:])) / (n - 1)
                # far above the usual level too, so a dip and a recovery is not a trend
                above = (len(self._hist) < self.warmup
                         or lg - _robust(self._hist)[0] >= math.log(self.trend_growth))
            else:
                slope, rising, above = 0.0, 0.0, False
            if (rise >= math.log(self.trend_growth) and slope >= math.log(self.min_rate)
                    and rising >= 0.75 and above):
                layers, shares = _jump_culprits(self.names, norms, self._recent[0][1])
                top = f"; {shares[0]:.0%} of the growth from {layers[0]}" if layers else ""
                found = ("warning", layers,
                         f"global grad norm grew {math.exp(rise):.0f}x in {len(logs) - 1} steps "
                         f"(x{math.exp(slope):.2f} per step) to {g:.3g}{top}.",
                         {"rule": "trend", "global_norm": g, "growth": math.exp(rise),
                          "rate": math.exp(slope), "shares": shares})

        if len(self._hist) >= self.warmup:
            med, _ = _robust(self._hist)
            if lg - med >= math.log(self.level_ratio):
                self._above += 1
            else:
                self._above = 0
            if found is None and self._above >= self.level_steps:
                base = np.median(np.array([r[1] for r in self._recent]), axis=0) if self._recent else None
                layers, shares = _jump_culprits(self.names, norms, base)
                top = f"; {shares[0]:.0%} of the rise from {layers[0]}" if layers else ""
                found = ("warning", layers,
                         f"global grad norm {g:.3g} has been {math.exp(lg - med):.0f}x its median "
                         f"{math.exp(med):.3g} for {self._above} steps{top}.",
                         {"rule": "level", "global_norm": g, "median_norm": math.exp(med),
                          "ratio": math.exp(lg - med), "shares": shares})

        if found is None and (first or step % self.depth_every == 0) and \
                len(self.weight_idx) >= self.depth_min_layers:
            w = norms[self.weight_idx].astype(np.float64)
            if np.all(np.isfinite(w)) and np.all(w > 0):
                r = w[0] / w[-1]
                mono = float(np.mean(w[:-1] > w[1:]))
                if r >= self.depth_ratio and mono >= self.depth_monotone:
                    per = r ** (1.0 / (len(w) - 1))
                    order = np.argsort(-w, kind="stable")[:5]
                    layers = [self.names[self.weight_idx[i]] for i in order]
                    a, b = self.names[self.weight_idx[0]], self.names[self.weight_idx[-1]]
                    found = ("warning", layers,
                             f"grad norms grow {per:.2f}x per layer from the output back to the input "
                             f"({w[0]:.3g} at {a} vs {w[-1]:.3g} at {b}, {r:.3g}x): exploding through "
                             f"depth.", {"rule": "depth", "global_norm": g, "per_layer": per, "ratio": r})

        self._recent.append((lg, lnorms))
        self._hist.append(lg)
        return None if found is None else self._emit(step, *found)

    def _quiet_batch(self, steps, rows):
        if (self._seen == 0 or len(self._hist) < self.history or self.history < self.warmup
                or len(self._recent) < self._recent.maxlen):
            return False
        idx, lgs = _valid_global(rows, self.col)
        if not len(lgs):
            return True
        lg = np.asarray(lgs)
        if (rows[idx, self.col["global_norm"]].astype(np.float64) >= self.absurd).any():
            return False
        # trend: the oldest entry of the recent window at each row
        recent = np.concatenate([[r[0] for r in self._recent], lg])[:len(lg)]
        if (lg - recent >= math.log(self.trend_growth)).any():
            return False
        # level: consecutive rows far above the median of the history
        med, _ = _window_robust(self._hist, lgs, self.history)
        above = self._above
        for a in (lg - med >= math.log(self.level_ratio)).tolist():  # numpy, no host sync
            above = above + 1 if a else 0
            if above >= self.level_steps:
                return False
        # depth: the rows where it is checked
        if len(self.weight_idx) >= self.depth_min_layers:
            at = [i for i in idx if int(steps[i]) % self.depth_every == 0]
            if at:
                w = rows[np.asarray(at)][:, self.g + self.weight_idx].astype(np.float64)
                with np.errstate(all="ignore"):
                    ok = np.isfinite(w).all(1) & (w > 0).all(1)
                    r = w[:, 0] / w[:, -1]
                    mono = (w[:, :-1] > w[:, 1:]).mean(1)
                if (ok & (r >= self.depth_ratio) & (mono >= self.depth_monotone)).any():
                    return False
        lnorms = _log(rows[idx, self.g:self.g + self.n])
        self._recent.extend(zip(lgs, lnorms))
        self._hist.extend(lgs)
        self._above = above
        self._seen += len(lgs)
        return True

    def state_dict(self):
        return {**self._base_state(), "recent": [[a, _to_list(b)] for a, b in self._recent],
                "hist": list(self._hist), "above": self._above, "seen": self._seen}

    def load_state_dict(self, sd):
        self._load_base(sd)
        self._recent = deque([(float(a), _from_list(b)) for a, b in sd["recent"]],
                             maxlen=self.trend_window - 1)
        self._hist = deque(sd["hist"], maxlen=self.history)
        self._above = int(sd["above"])
        self._seen = int(sd["seen"])


class LossSpikeDetector(_BaselineDetector):
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

    Args:
        window: losses in the baseline (default 100).
        warmup: finite losses before any verdict (default 20).
        z: robust z-score threshold (default 12; heavy-tailed batch losses near
            convergence reach z 9 in healthy runs).
        ratio: minimum loss / median ratio for positive losses (default 1.5).
        abs_min: minimum absolute jump for non-positive losses (default 1e-6).
        min_scale: floor of the spread (log space; default 0.02).
        cooldown: steps between two events (default 10).
    """

    kind = "loss_spike"

    def __init__(self, window: int = 100, warmup: int = 20, z: float = 12.0, ratio: float = 1.5,
                 abs_min: float = 1e-6, min_scale: float = 0.02, cooldown: int = 10):
        super().__init__(cooldown)
        self.window = _check_int("window", window, 2)
        self.warmup = _check_int("warmup", warmup, 1)
        self.z = _check_pos("z", z)
        self.ratio = _check_pos("ratio", ratio)
        if self.ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {ratio!r}")
        self.abs_min = _check_pos("abs_min", abs_min, allow_zero=True)
        self.min_scale = _check_pos("min_scale", min_scale, allow_zero=True)
        self._hist: deque = deque(maxlen=self.window)  # raw finite losses
        self._layers = _LayerRing(self.window)

    def _row(self, step, row):
        loss = float(row[self.col["loss"]])
        if row[self.col["loss_bad"]] > 0 or not math.isfinite(loss):
            return None
        ev = None
        keep = loss
        if len(self._hist) >= self.warmup:
            hist = np.asarray(self._hist, np.float64)
            logspace = loss > 0 and bool(np.all(hist > 0))
            vals = np.log(hist) if logspace else hist
            x = math.log(loss) if logspace else loss
            med, mad = _robust(vals)
            scale = max(mad, self.min_scale if logspace else 0.0)
            thr = med + max(self.z * scale, math.log(self.ratio) if logspace else self.abs_min)
            if x > thr:
                layers, shares = [], []
                if self._ok(row):
                    layers, shares = _jump_culprits(self.names, self._norms(row), self._layers.median())
                zs = (x - med) / scale if scale > 0 else math.inf
                med_loss = math.exp(med) if logspace else med
                rel = f"{loss / med_loss:.1f}x its median" if logspace else f"{loss - med:.3g} above its median"
                top = f"; largest grad-norm jump in {layers[0]}" if layers else ""
                ev = self._emit(step, "warning", layers,
                                f"loss {loss:.4g} jumped to {rel} {med_loss:.4g} over the last "
                                f"{len(self._hist)} steps (robust z {zs:.0f}){top}.",
                                {"loss": loss, "median_loss": med_loss, "z": zs, "shares": shares})
                keep = math.exp(thr) if logspace else thr
        self._hist.append(keep)
        if self._ok(row):
            self._layers.push(_log(self._norms(row)))
        return ev

    def _quiet_batch(self, steps, rows):
        if len(self._hist) < self.window or self.window < self.warmup:
            return False
        loss = rows[:, self.col["loss"]].astype(np.float64)
        valid = (rows[:, self.col["loss_bad"]] <= 0) & np.isfinite(loss)
        idx = np.flatnonzero(valid)
        new = loss[idx].tolist()  # numpy, no host sync
        if new:
            if not (min(new) > 0 and min(self._hist) > 0):
                return False  # raw-value space somewhere in the batch: row by row
            cat = np.log(np.fromiter(chain(self._hist, new), np.float64, len(self._hist) + len(new)))
            med, mad = _windows_robust(cat, self.window)
            thr = med + np.maximum(self.z * np.maximum(mad, self.min_scale), math.log(self.ratio))
            if (np.asarray([math.log(v) for v in new]) > thr).any():
                return False
        self._hist.extend(new)
        ok = idx[rows[idx, self.col["bad"]] == 0]
        self._layers.push_many(_log(rows[ok, self.g:self.g + self.n]))
        return True


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

    def __init__(self, rel: float = 1e-3, floor: float = 1e-9, patience: int = 20,
                 depth_ratio: float = 1e3, depth_monotone: float = 0.75, depth_min_layers: int = 4,
                 cooldown: int = 200):
        super().__init__(cooldown)
        self.rel = _check_pos("rel", rel)
        self.floor = _check_pos("floor", floor, allow_zero=True)
        self.patience = _check_int("patience", patience, 1)
        self.depth_ratio = _check_pos("depth_ratio", depth_ratio)
        if not 0 < depth_monotone <= 1:
            raise ValueError(f"depth_monotone must be in (0, 1], got {depth_monotone!r}")
        self.depth_monotone = float(depth_monotone)
        self.depth_min_layers = _check_int("depth_min_layers", depth_min_layers, 2)
        self._count: np.ndarray | None = None
        self._depth = 0

    def _row(self, step, row):
        if not self._ok(row) or len(self.weight_idx) < 2:
            return None
        w = self._norms(row)[self.weight_idx].astype(np.float64)
        if not np.all(np.isfinite(w)):  # a layer without gradient this step: no verdict
            return None
        if self._count is None:
            self._count = np.zeros(len(w), dtype=np.int64)
        top = float(w.max())
        tiny = (w < self.rel * top) | (w < self.floor)
        self._count = np.where(tiny, self._count + 1, 0)
        depth_ok = False
        if len(w) >= self.depth_min_layers and w[0] > 0:
            r = w[-1] / w[0]
            depth_ok = r >= self.depth_ratio and float(np.mean(w[:-1] < w[1:])) >= self.depth_monotone
        self._depth = self._depth + 1 if depth_ok else 0

        stuck = np.flatnonzero(self._count >= self.patience)
        if len(stuck):
            idx = stuck
            lo = int(idx[np.argmin(w[idx])])
            if top <= self.floor:
                msg = (f"all {len(w)} weight layers have had grad norms below {self.floor:g} for "
                       f"{self.patience}+ steps (largest {top:.3g}): no layer is learning (dead units?).")
            else:
                msg = (f"{len(idx)} of {len(w)} weight layers have had grad norms below {self.rel:g}x "
                       f"the largest ({top:.3g}) for {self.patience}+ steps; smallest {w[lo]:.3g} at "
                       f"{self.names[self.weight_idx[lo]]}.")
            data = {"rule": "tiny", "largest": top, "smallest": float(w[lo])}
        elif self._depth >= self.patience:
            r = w[-1] / max(w[0], 1e-300)
            per = r ** (1.0 / (len(w) - 1))
            idx = np.flatnonzero(w < top / math.sqrt(self.depth_ratio))
            if not len(idx):
                idx = np.array([0])
            msg = (f"grad norms shrink {per:.2f}x per layer from the output back to the input "
                   f"({w[-1]:.3g} at {self.names[self.weight_idx[-1]]} vs {w[0]:.3g} at "
                   f"{self.names[self.weight_idx[0]]}) for {self._depth} steps.")
            data = {"rule": "depth", "ratio": float(r), "per_layer": float(per)}
        else:
            return None
        layers = [self.names[self.weight_idx[i]] for i in sorted(idx)]  # earliest first
        data["norms"] = {self.names[self.weight_idx[i]]: float(w[i]) for i in sorted(idx)[:10]}
        return self._emit(step, "warning", layers, msg, data)

    def _quiet_batch(self, steps, rows):
        if len(self.weight_idx) < 2:
            return True  # _row returns at once for every row
        w = rows[:, self.g + self.weight_idx].astype(np.float64)
        use = (rows[:, self.col["bad"]] == 0) & np.isfinite(w).all(1)
        w = w[use]
        if not len(w):
            return True
        top = w.max(1)
        tiny = (w < self.rel * top[:, None]) | (w < self.floor)
        count = np.zeros(w.shape[1], np.int64) if self._count is None else self._count
        depth = self._depth
        check_depth = w.shape[1] >= self.depth_min_layers
        with np.errstate(all="ignore"):
            ratio = w[:, -1] / w[:, 0]
            mono = (w[:, :-1] < w[:, 1:]).mean(1)
        for j in range(len(w)):
            count = np.where(tiny[j], count + 1, 0)
            d_ok = check_depth and w[j, 0] > 0 and ratio[j] >= self.depth_ratio and mono[j] >= self.depth_monotone
            depth = depth + 1 if d_ok else 0
            if depth >= self.patience or (count >= self.patience).any():
                return False
        self._count, self._depth = count, depth
        return True

    def state_dict(self):
        count = None if self._count is None else self._count.tolist()  # numpy, no host sync
        return {**self._base_state(), "count": count, "depth": self._depth}

    def load_state_dict(self, sd):
        self._load_base(sd)
        self._count = None if sd["count"] is None else np.asarray(sd["count"], np.int64)
        self._depth = int(sd["depth"])


class WeightGrowthDetector(Detector):
    """Parameter norms growing fast, becoming very large, or non-finite.

    Reads the ``param_norm`` column (total parameter L2 norm, recorded by the
    guard every ``param_norm_every`` steps; NaN rows in between are ignored)
    and works on the RMS weight, ``param_norm / sqrt(numel)``:

    - growth: RMS >= ``growth`` x its minimum over the last ``window`` steps;
    - large: RMS >= ``max_rms`` (critical);
    - non-finite parameters (critical).

    Culprits (computed only when an event fires: one extra read of the
    per-tensor parameter norms): tensors whose norm grew most since the guard
    was built.

    Args:
        growth: growth factor over the window (default 10).
        window: steps (default 200).
        max_rms: RMS weight limit (default 100).
        cooldown: steps between two events (default 200).
    """

    kind = "weight_growth"

    def __init__(self, growth: float = 10.0, window: int = 200, max_rms: float = 100.0,
                 cooldown: int = 200):
        super().__init__(cooldown)
        self.growth = _check_pos("growth", growth)
        self.window = _check_int("window", window, 1)
        self.max_rms = _check_pos("max_rms", max_rms)
        self._hist: deque = deque()  # (step, rms)
        self._init: np.ndarray | None = None

    def bind(self, guard):
        super().bind(guard)
        self._params = guard.params
        self._numel = max(sum(p.numel() for p in guard.params), 1)
        self._every = int(getattr(guard, "param_norm_every", 0) or 0)
        if "param_norm" not in self.col:
            raise ValueError("WeightGrowthDetector needs the guard's 'param_norm' column")
        if self._init is None:
            self._init = self._layer_norms()  # host sync: once, at construction

    def _layer_norms(self) -> np.ndarray:
        from .stats import compute_stats  # full-tensor norms, DTensor shards included

        names = [str(i) for i in range(len(self._params))]
        norms = compute_stats(names, [p.detach() for p in self._params]).norms
        return norms.double().cpu().numpy()  # host sync: bind / event only

    def _row(self, step, row):
        pn = float(row[self.col["param_norm"]])
        if math.isnan(pn):  # NaN: not measured this step, unless it was a measuring step
            return None if not self._measured(step) else self._nonfinite(step, pn)
        if math.isinf(pn):
            return self._nonfinite(step, pn)
        rms = pn / math.sqrt(self._numel)
        while self._hist and self._hist[0][0] < step - self.window:
            self._hist.popleft()
        lo = min((r for _, r in self._hist), default=rms)
        self._hist.append((step, rms))
        if rms >= self.max_rms:
            sev, msg = "critical", (f"RMS weight {rms:.3g} (parameter norm {pn:.3g}) is above the limit "
                                    f"{self.max_rms:g}")
        elif lo > 0 and rms / lo >= self.growth:
            sev, msg = "warning", (f"RMS weight grew {rms / lo:.1f}x in the last {self.window} steps "
                                   f"to {rms:.3g} (parameter norm {pn:.3g})")
        else:
            return None
        if step - self._last_step < self.cooldown and _SEV[sev] <= self._last_sev:
            return None
        layers, ratios = self._culprits()
        top = f"; {layers[0]} grew {ratios[0]:.3g}x since the start" if layers else ""
        return self._emit(step, sev, layers, msg + top + ".",
                          {"rms": rms, "param_norm": pn, "growth": rms / lo if lo > 0 else math.inf})

    def _measured(self, step) -> bool:
        return self._every > 0 and step % self._every == 0

    def _nonfinite(self, step, pn):
        if step - self._last_step < self.cooldown and self._last_sev >= 2:
            return None
        now = self._layer_norms()
        layers = [self.names[i] for i in np.flatnonzero(~np.isfinite(now))]
        return self._emit(step, "critical", layers,
                          f"parameter norm is {_fmt(pn)}: the weights of {len(layers)} tensors "
                          f"({_names_list(layers)}) hold NaN/Inf.", {"param_norm": pn})

    def _culprits(self):
        now = self._layer_norms()
        with np.errstate(all="ignore"):
            ratio = now / np.maximum(self._init, 1e-12)
        ratio = np.where(np.isfinite(ratio), ratio, np.inf)
        order = np.argsort(-ratio, kind="stable")
        picked = [i for i in order[:5] if ratio[i] >= 2] or [int(order[0])]
        return [self.names[i] for i in picked], [float(ratio[i]) for i in picked]

    def state_dict(self):
        return {**self._base_state(), "hist": [list(h) for h in self._hist],
                "init": None if self._init is None else _to_list(self._init)}

    def load_state_dict(self, sd):
        self._load_base(sd)
        self._hist = deque((int(s), float(r)) for s, r in sd["hist"])
        if sd.get("init") is not None:
            self._init = _from_list(sd["init"])


class OverClippingDetector(Detector):
    """The clip threshold freezing training.

    - tiny: the clip coefficient < ``tiny`` for ``tiny_steps`` consecutive
      steps (critical: updates are scaled to almost nothing; methods.md §1).
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

    def __init__(self, tiny: float = 1e-3, tiny_steps: int = 10, window: int = 200,
                 frac: float = 0.95, cooldown: int = 500):
        super().__init__(cooldown)
        self.tiny = _check_pos("tiny", tiny)
        self.tiny_steps = _check_int("tiny_steps", tiny_steps, 1)
        self.window = _check_int("window", window, 1)
        if not 0 < frac <= 1:
            raise ValueError(f"frac must be in (0, 1], got {frac!r}")
        self.frac = float(frac)
        self._run = 0
        self._clipped: deque = deque(maxlen=self.window)
        self._coefs: deque = deque(maxlen=self.window)
        self._gnorms: deque = deque(maxlen=self.window)

    def _row(self, step, row):
        c = float(row[self.col["clip_coef"]])
        g = float(row[self.col["global_norm"]])
        if not self._ok(row) or not math.isfinite(c) or not math.isfinite(g):
            return None
        self._run = self._run + 1 if c < self.tiny else 0
        self._clipped.append(c < 1.0 - 1e-6)
        self._coefs.append(c)
        self._gnorms.append(g)
        if self._run < self.tiny_steps and (len(self._clipped) < self.window
                                            or sum(self._clipped) < self.frac * self.window):
            return None  # the common case, decided without the medians below
        med_g = float(np.median(self._gnorms))
        data = {"clip_coef": c, "global_norm": g, "median_norm": med_g}
        if self._run >= self.tiny_steps:
            return self._emit(step, "critical", [],
                              f"clip coefficient has been below {self.tiny:g} for {self._run} steps "
                              f"(now {c:.2g}, pre-clip norm {g:.3g}): updates are scaled to almost "
                              f"nothing.", data)
        if len(self._clipped) == self.window:
            rate = float(np.mean(self._clipped))
            if rate >= self.frac:
                data["rate"] = rate
                return self._emit(step, "warning", [],
                                  f"gradients were clipped on {rate:.0%} of the last {self.window} "
                                  f"steps (median coefficient {float(np.median(self._coefs)):.2g}, median "
                                  f"pre-clip norm {med_g:.3g}).", data)
        return None

    def state_dict(self):
        return {**self._base_state(), "run": self._run, "clipped": list(self._clipped),
                "coefs": list(self._coefs), "gnorms": list(self._gnorms)}

    def load_state_dict(self, sd):
        self._load_base(sd)
        self._run = int(sd["run"])
        self._clipped = deque([bool(x) for x in sd["clipped"]], maxlen=self.window)
        self._coefs = deque(sd["coefs"], maxlen=self.window)
        self._gnorms = deque(sd["gnorms"], maxlen=self.window)


class UnusedDetector(Detector):
    """Trainable parameters that never received a gradient (an unused layer, a detached branch).

    After ``patience`` steps, one warning event names every parameter with
    ``requires_grad=True`` that had no gradient on any step so far (in the rows,
    "no gradient" is a NaN norm).  Frozen parameters are not reported.
    """

    kind = "unused"

    def __init__(self, patience: int = 100):
        super().__init__(cooldown=0)
        self.patience = _check_int("patience", patience, 1)
        self._seen: np.ndarray | None = None
        self._count = 0
        self._done = False

    def bind(self, guard):
        super().bind(guard)
        self._trainable = np.array([p.requires_grad for p in guard.params], dtype=bool)
        if self._seen is None or len(self._seen) != self.n:
            self._seen = np.zeros(self.n, dtype=bool)

    def _row(self, step, row):
        if self._done:
            return None
        self._seen |= ~np.isnan(self._norms(row))
        self._count += 1
        if self._count < self.patience:
            return None
        self._done = True
        never = [self.names[i] for i in np.flatnonzero(self._trainable & ~self._seen)]
        if not never:
            return None
        return Event(step, self.kind, "warning", never,
                     f"{len(never)} trainable parameter(s) got no gradient in {self._count} steps "
                     f"({_names_list(never)}): they are not trained.",
                     ["Check that these layers are used in forward() and that no .detach() or "
                      "torch.no_grad() cuts them off the loss.",
                      "If they are meant to be frozen, set requires_grad_(False) (and leave them out "
                      "of the optimizer)."],
                     {"steps": self._count})

    def state_dict(self):
        return {"seen": self._seen.tolist() if self._seen is not None else None,  # numpy, no host sync
                "count": self._count, "done": self._done}

    def load_state_dict(self, sd):
        if sd.get("seen") is not None:
            self._seen = np.array(sd["seen"], dtype=bool)
        self._count = int(sd["count"])
        self._done = bool(sd["done"])


def default_detectors() -> list[Detector]:
    """The detectors a ``Guard`` uses when ``detectors=None`` (pass ``[]`` for none)."""
    return [SpikeDetector(), ExplodingDetector(), LossSpikeDetector(), VanishingDetector(),
            WeightGrowthDetector(), OverClippingDetector(), UnusedDetector()]
