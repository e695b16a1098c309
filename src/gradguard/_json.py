"""Non-finite numbers in JSON, one convention for the whole package.

- Numbers a person reads (event data, store metadata, API answers): ``json_safe``
  turns NaN/Inf into the strings ``"NaN"``, ``"Inf"``, ``"-Inf"`` (valid JSON, and
  the sign and kind survive); ``from_json_number`` reads them back.
- Arrays inside state dicts: ``array_to_list`` / ``list_to_array`` write NaN as
  ``None`` (so that saved states compare with ``==``); +-Inf stay floats.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["json_number", "json_safe", "from_json_number", "array_to_list", "list_to_array"]

_NONFINITE = {"NaN": math.nan, "Inf": math.inf, "-Inf": -math.inf}


def json_number(x: float):
    """A float, or ``"NaN"`` / ``"Inf"`` / ``"-Inf"``."""
    x = float(x)
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Inf" if x > 0 else "-Inf")


def from_json_number(x) -> float:
    """Inverse of ``json_number`` (numbers pass through)."""
    if isinstance(x, str):
        try:
            return _NONFINITE[x]
        except KeyError:
            raise ValueError(f"not a JSON number: {x!r}") from None
    return float(x)


def json_safe(x):
    """``x`` with every float made JSON-safe (``json_number``) and numpy scalars made Python."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return json_number(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def array_to_list(a) -> list:
    """Array -> nested list with NaN as None (NaN != NaN would break state comparisons)."""
    a = np.asarray(a, np.float64)
    return np.where(np.isnan(a), None, a).tolist()  # numpy, no host sync


def list_to_array(x) -> np.ndarray:
    """Inverse of ``array_to_list`` (None -> NaN)."""
    return np.array(x, dtype=np.float64)
