"""Numbers the detectors share: rolling robust baselines, per-layer rings, culprit shares.

Every function here works on a whole batch at once; a detector evaluates its
rule through them once per batch (see ``base.Detector.update``).
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from .._json import array_to_list, list_to_array

MAD = 1.4826  # MAD -> standard deviation for normal data


def log(x) -> np.ndarray:
    # maximum() maps 0 and negatives to 1e-300 and keeps NaN/Inf: log() never warns here
    return np.log(np.maximum(np.asarray(x, np.float64), 1e-300))


def logs(values) -> list[float]:
    """math.log of each value (Python floats, so that baselines hold the same bits as before)."""
    return [math.log(v) for v in values]


def median_rows(w: np.ndarray) -> np.ndarray:
    """np.median(w, axis=1), bit for bit, without np.median's generic machinery."""
    h = w.shape[1] // 2
    if w.shape[1] % 2:
        return np.partition(w, h, axis=1)[:, h]
    p = np.partition(w, (h - 1, h), axis=1)
    return (p[:, h - 1] + p[:, h]) / 2


def rolling_robust(cat: np.ndarray, first: int, size: int, mad: bool = True):
    """(median, MAD scaled to a standard deviation) of the window before each of ``cat[first:]``.

    The window of position ``p`` is ``cat[max(0, p - size):p]`` (``first >= 1``): the
    baseline a value at ``cat[p]`` is judged against.  Full windows are read as one
    strided block; the shorter ones (warm-up) one by one.  Without ``mad`` the second
    array is None.
    """
    n = len(cat)
    split = min(max(first, size), n)  # positions from here on have full windows
    if split == first:  # the common case: warm, one block
        w = np.lib.stride_tricks.as_strided(cat[first - size:], (n - first, size), (cat.strides[0],) * 2,
                                            writeable=False)
        med = median_rows(w)
        return med, (MAD * median_rows(np.abs(w - med[:, None])) if mad else None)
    med = np.empty(n - first)
    sd = np.empty(n - first) if mad else None
    for p in range(first, split):
        w = cat[None, :p]
        m = median_rows(w)
        med[p - first] = m[0]
        if mad:
            sd[p - first] = MAD * median_rows(np.abs(w - m[:, None]))[0]
    if split < n:
        m, d = rolling_robust(cat, split, size, mad)
        med[split - first:] = m
        if mad:
            sd[split - first:] = d
    return med, sd


def runs(flags: np.ndarray, start) -> np.ndarray:
    """Length of the run of True ending at each row of ``flags`` (k,) or (k, L), continuing ``start``.

    ``runs(f, s)[j] = runs(f, s)[j - 1] + 1 if f[j] else 0``, with ``s`` before row 0.
    """
    k = len(flags)
    idx = np.arange(k).reshape((k,) + (1,) * (flags.ndim - 1))
    last_reset = np.maximum.accumulate(np.where(flags, -1, idx), axis=0)
    return np.where(last_reset >= 0, idx - last_reset, np.asarray(start) + idx + 1)


class LayerRing:
    """The last ``size`` finite log per-layer norms, for per-layer baselines."""

    def __init__(self, size: int):
        self.size = size
        self.buf: np.ndarray | None = None
        self.n = 0

    def push_many(self, log_norms: np.ndarray) -> None:
        """Append each row of ``log_norms`` (k, L), oldest first."""
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
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: a layer never seen
            return np.nanmedian(self.buf[: min(self.n, self.size)], axis=0)

    def state_dict(self) -> dict:
        return {"n": self.n, "buf": None if self.buf is None else array_to_list(self.buf)}

    def load_state_dict(self, sd: dict) -> None:
        self.n = int(sd["n"])
        self.buf = None if sd["buf"] is None else list_to_array(sd["buf"])


def jump_culprits(names, norms: np.ndarray, base_log: np.ndarray | None,
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


def names_list(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def fmt(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    return f"{x:.3g}"
