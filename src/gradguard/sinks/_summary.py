"""Shared per-row summary for the W&B and MLflow sinks (TensorBoard keeps its own), and the
argument checks all three sinks share.

One row (globals, per-layer norms, per-layer max |g|) becomes a handful of
scalars plus a top-k list, never one value per parameter.
"""
from __future__ import annotations

import re

import numpy as np

from .._validate import check_int

QUANTILES = {"min": 0.0, "p50": 0.5, "p90": 0.9, "max": 1.0}
_METRIC_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")


def check_common(top_k, every) -> tuple[int, int]:
    """The arguments every sink takes: ``top_k`` >= 0 layers listed, one row in ``every``."""
    return check_int("top_k", top_k, 0), check_int("every", every, 1)


def metric_name(name: str) -> str:
    """A layer name as a metric key (MLflow allows only ``[A-Za-z0-9_-. /:]``)."""
    return _METRIC_BAD.sub("_", str(name))[:200] or "_"


def summarise_row(row: np.ndarray, G: int, L: int, top_k: int):
    """Returns (finite norms float64, per-layer scalars dict, top-k index list).

    Scalars: ``layer_norm_{min,p50,p90,max}`` over layers with a finite norm
    (absent when none is finite) and ``nonfinite_layers`` (layers whose max
    |g| is NaN/Inf).  Top-k: indices of the largest finite norms, largest first.
    """
    norms = row[G:G + L].astype(np.float64)
    fin = np.isfinite(norms)
    out = {"nonfinite_layers": float((~np.isfinite(row[G + L:G + 2 * L])).sum())}
    if fin.any():
        q = np.quantile(norms[fin], list(QUANTILES.values()))
        out.update({f"layer_norm_{k}": float(v) for k, v in zip(QUANTILES, q)})
    top = []
    if top_k:
        top = [int(i) for i in np.where(fin, norms, -np.inf).argsort()[::-1][:top_k] if fin[i]]
    return norms[fin], out, top


def event_text(e) -> str:
    return f"{e.severity} {e.kind}: {e.message}"
