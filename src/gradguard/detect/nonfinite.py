"""The event for a step whose gradients, loss or global norm held NaN/Inf (built from its row)."""
from __future__ import annotations

import numpy as np

from ..advice import AMP_OVERFLOW_ADVICE, advice_for
from .._json import json_number
from ..events import Event
from ..layout import COL, RowLayout
from ._window import fmt, names_list


def nonfinite_event(step: int, run, row: np.ndarray, *, amp: bool = False) -> Event:
    """The ``nonfinite`` (or, under a GradScaler, ``amp_overflow``) event of one row.

    Args:
        step: the guard step of the row.
        run: the ``RunInfo`` (names, and owning module types for the advice).
        row: the step's row (layout ``gradguard.layout``).
        amp: a GradScaler is active: an overflow with a finite loss is its own
            calibration (``amp_overflow``, info), not a failure.

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
    if amp and not loss_bad:  # the scaler's own overflow; a NaN loss is a real problem
        return Event(step, "amp_overflow", "info", layers,
                     "GradScaler found Inf/NaN in the scaled gradients (normal while it calibrates "
                     "its scale); " + message[0].lower() + message[1:], list(AMP_OVERFLOW_ADVICE), data)
    return Event(step, "nonfinite", "critical", layers, message,
                 advice_for("nonfinite", layers, run.owner, run.module_types), data)
