"""Detectors: turn recorded step rows into events.

This module reads host-side rows (one per step, drained from the device
buffer once per flush interval) and returns ``Event`` objects.  It never
touches the model or the optimizer; actions live in ``guard.py`` / ``act.py``.
"""
from __future__ import annotations

import math

import numpy as np

from .events import Event

__all__ = ["nonfinite_event", "NONFINITE_ADVICE"]

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


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    return f"{x:.3g}"


def nonfinite_event(step: int, names: list[str], max_abs: np.ndarray, loss: float, loss_bad: bool,
                    global_norm: float, skipped: bool, amp: bool = False) -> Event:
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
    if amp:
        return Event(step, "amp_overflow", "info", layers,
                     "GradScaler found Inf/NaN in the scaled gradients (normal while it calibrates "
                     "its scale); " + message[0].lower() + message[1:],
                     ["Nothing to do unless this happens on most steps; then check the loss for NaN."],
                     {"loss": _num(loss), "global_norm": _num(global_norm), "skipped": skipped})
    return Event(step, "nonfinite", "critical", layers, message, list(NONFINITE_ADVICE),
                 {"loss": _num(loss), "global_norm": _num(global_norm), "skipped": skipped})
