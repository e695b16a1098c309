"""The event for a step whose gradients, loss or global norm held NaN/Inf (built from its row)."""
from __future__ import annotations

import numpy as np

from ..advice import AMP_OVERFLOW_ADVICE, advice_for
from .._json import json_number
from ..events import Event
from ..layout import COL, RowLayout
from ._window import fmt, names_list


def nonfinite_event(step: int, run, row: np.ndarray, *, amp: bool = False, origin: dict | None = None) -> Event:
    """The ``nonfinite`` (or, under a GradScaler, ``amp_overflow``) event of one row.

    Args:
        step: the guard step of the row.
        run: the ``RunInfo`` (names, and owning module types for the advice).
        row: the step's row (layout ``gradguard.layout``).
        amp: a GradScaler is active: an overflow with a finite loss is its own
            calibration (``amp_overflow``, info), not a failure -- unless ``origin`` is set.
        origin: what ``gradguard.nan_origin.NanOrigin.locate`` found for this step (the
            producer): its parameter is named first and the message says where it was born.
            The re-run backpropagates the loss unscaled, so under a GradScaler a finding means
            the step is non-finite without the scale too: not the scaler's overflow.

    Culprits are the tensors whose max |g| is NaN/Inf (a tensor without a gradient
    carries 0 there, so it is never named), listed from the output side back: NaN
    flows backward from the op that made it, so the last tensor (in model order)
    that holds it is the closest to its origin.
    """
    names = list(run.names)
    max_abs = RowLayout(len(names)).max_abs(np.asarray(row)).astype(np.float64)
    loss, global_norm = float(row[COL["loss"]]), float(row[COL["global_norm"]])
    loss_bad, skipped = bool(row[COL["loss_bad"]] > 0), bool(row[COL["skipped"]] > 0)
    bad = ~np.isfinite(max_abs)
    layers = [names[i] for i in np.flatnonzero(bad)][::-1]
    what = "skipped" if skipped else "applied anyway"
    if layers:
        n_nan = int(np.isnan(max_abs).sum())
        kinds = (["NaN"] if n_nan else []) + (["Inf"] if int(bad.sum()) - n_nan else [])
        message = (f"{'/'.join(kinds)} in the gradients of {len(layers)} of {len(names)} tensors "
                   f"({names_list(layers)}); step {what}.")
    elif loss_bad:
        message = f"loss is {fmt(loss)}; step {what}."
    else:
        message = (f"global grad norm overflowed to {fmt(global_norm)} although every gradient is "
                   f"finite; step {what}.")
    data = {"loss": json_number(loss), "global_norm": json_number(global_norm), "skipped": skipped}
    if origin:
        data["origin"] = dict(origin)
        if origin.get("param"):
            layers = [origin["param"]] + [n for n in layers if n != origin["param"]]
        message = ("the input batch already held NaN/Inf (check the data): " if origin.get("where") == "input"
                   else f"made in {origin.get('module') or 'the model'} ({origin.get('type')}, "
                        f"{origin.get('where')}): ") + message
    if amp and origin:
        message += " Re-run without the scaler's scale, the step is non-finite still: not an overflow of the scale."
    if amp and not loss_bad and not origin:  # the scaler's own overflow; a NaN loss is a real problem
        return Event(step, "amp_overflow", "info", layers,
                     "GradScaler found Inf/NaN in the scaled gradients (normal while it calibrates "
                     "its scale); " + message[0].lower() + message[1:], list(AMP_OVERFLOW_ADVICE), data)
    return Event(step, "nonfinite", "critical", layers, message,
                 advice_for("nonfinite", layers, run.owner, run.module_types), data)


class NonfiniteRepeats:
    """The ``nonfinite`` events of a flush, with repeats folded into one count.

    ``nonfinite_event`` describes one poisoned row.  A run whose weights went NaN is
    poisoned identically on every step after; one event per step buries the first one.
    ``update`` gives the event of the first row of each streak of identical poisoned rows
    (same kind, culprits, and skip decision, on consecutive steps) at once -- remedies and
    ``on_nonfinite="warn"`` still see it on its own step -- and, when the streak ends, one
    ``info`` event with its ``count``, ``first_step`` and ``last_step``.  A dead run's
    streak never ends: ``PoisonedRunDetector`` escalates it.  Any chunking of the rows
    gives the same events.

    The guard-side use: ``new_events += repeats.update(steps, rows, run, amp=scaler_on)``
    in place of one ``nonfinite_event`` per poisoned row.
    """

    def __init__(self):
        self._sig = None       # the open streak's signature, or None
        self._first = self._last = -1
        self._count = 0

    def _close(self, out: list) -> None:
        if self._sig is not None and self._count > 1:
            kind, layers, skipped = self._sig[:3]
            out.append(Event(self._last, kind, "info", list(layers),
                             f"the same {kind} step repeated {self._count} times, steps {self._first}-"
                             f"{self._last} ({'all skipped' if skipped else 'all applied anyway'}).",
                             [], {"count": self._count, "first_step": self._first, "last_step": self._last}))
        self._sig, self._count = None, 0

    def update(self, steps, rows: np.ndarray, run, *, amp: bool = False,
               origins: dict | None = None) -> list[Event]:
        """``origins``: step -> what ``NanOrigin`` found (the producer), for the steps re-run."""
        steps = np.asarray(steps, np.int64)
        rows = np.asarray(rows)
        bad = rows[:, COL["bad"]] > 0
        out: list[Event] = []
        if self._sig is not None and len(rows) and not bad[0]:
            self._close(out)
        for i in np.flatnonzero(bad).tolist():  # numpy, no host sync (poisoned rows only)
            step = int(steps[i])
            ev = nonfinite_event(step, run, rows[i], amp=amp, origin=(origins or {}).get(step))
            # identical: same kind, culprits, decision and finding (NaN is not -Inf)
            sig = (ev.kind, tuple(ev.layers), bool(ev.data["skipped"]), ev.message)
            if sig == self._sig and step == self._last + 1:
                self._count += 1
                self._last = step
            else:
                self._close(out)
                out.append(ev)
                self._sig, self._first, self._last, self._count = sig, step, step, 1
            if i + 1 < len(rows) and not bad[i + 1]:
                self._close(out)  # a clean step ends the streak
        return out

    def state_dict(self) -> dict:
        return {"sig": None if self._sig is None else [self._sig[0], list(self._sig[1]), self._sig[2],
                                                        self._sig[3]],
                "first": self._first, "last": self._last, "count": self._count}

    def load_state_dict(self, sd: dict) -> None:
        s = sd["sig"]
        self._sig = None if s is None else (s[0], tuple(s[1]), bool(s[2]), s[3] if len(s) > 3 else "")
        self._first, self._last, self._count = int(sd["first"]), int(sd["last"]), int(sd["count"])
