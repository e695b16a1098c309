"""AutoClip: clip to a percentile of the norms seen so far."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..clip import ClipPolicy, _norm_coef
from ._common import _check_int, _load_tensor, _ok, _state_dtype

# ----------------------------------------------------------------- AutoClip


class AutoClip(ClipPolicy):
    """Clip the global norm to the p-th percentile of the norms seen so far.

    Each step the current global L2 norm joins the history, then
    ``threshold = percentile(history, p)`` (linear interpolation, as
    ``numpy.percentile``) and the gradients are scaled by
    ``min(1, threshold / (norm + 1e-6))``, the rule of the paper's reference
    code (``clip_grad_norm_`` to the percentile, global norm).

    Memory is bounded: the history is a device window of the last ``history``
    finite norms, kept sorted incrementally (one O(history) update per step,
    no sort).  For the first ``history`` finite steps the threshold equals the
    paper's full-history percentile exactly; afterwards it is the exact
    percentile of the most recent ``history`` norms (a sliding window), which
    follows a drifting norm scale faster than the full history would.

    Args:
        percentile: p in [0, 100]; the paper recommends 10.
        history: window length (int >= 1), default 10_000 steps (2 x 80 kB of
            float64 on the device).

    Example:
        >>> guard = gg.Guard(model, opt, clip=gg.AutoClip(percentile=10))

    References:
        Seetharaman, Wichern, Pardo, Le Roux. "AutoClip: Adaptive Gradient
        Clipping for Source Separation Networks", MLSP 2020.
    """

    def __init__(self, percentile: float = 10.0, history: int = 10_000):
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
            raise TypeError(f"percentile must be a number in [0, 100], got {type(percentile).__name__}")
        if not 0.0 <= float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
        self.percentile = float(percentile)
        self.history = _check_int("history", history, 1)
        self._sorted: Tensor | None = None  # (N,) ascending, +inf where empty
        self._ring: Tensor | None = None    # (N,) in arrival order
        self._count: Tensor | None = None   # () int64: finite norms absorbed
        self._arange: Tensor | None = None

    def _init(self, device):
        if self._sorted is None or self._sorted.device != device:
            n, dt = self.history, _state_dtype(device)
            if self._sorted is None:
                self._sorted = torch.full((n,), math.inf, dtype=dt, device=device)
                self._ring = torch.zeros(n, dtype=dt, device=device)
                self._count = torch.zeros((), dtype=torch.int64, device=device)
            else:
                self._arange = None
                self._sorted, self._ring, self._count = (
                    t.to(device) for t in (self._sorted, self._ring, self._count))
        if self._arange is None or self._arange.device != self._sorted.device:
            self._arange = torch.arange(self.history, device=self._sorted.device)

    def _absorb(self, x: Tensor, ok: Tensor) -> None:
        """Push x into the window unless ``ok`` is False (all on device)."""
        n = self.history
        s, ring, count = self._sorted, self._ring, self._count
        slot = (count % n).reshape(1)
        full = count >= n
        # The value leaving the window: the oldest one, or a +inf pad while filling.
        old = torch.where(full, ring.index_select(0, slot)[0], torch.full_like(x, math.inf))
        i = torch.searchsorted(s, old.reshape(1), right=False)[0].clamp(max=n - 1)
        j = torch.searchsorted(s, x.reshape(1), right=False)[0]
        k = self._arange
        # x <= old: s[j:i] moves right by one and x lands at j; x > old: s[i+1:j]
        # moves left by one and x lands at j - 1 (one of the two ranges is empty).
        src = k - ((k > j) & (k <= i)).to(k.dtype) + ((k >= i) & (k < j - 1)).to(k.dtype)
        new = s.gather(0, src.clamp(0, n - 1))
        new = torch.where(k == torch.where(j <= i, j, j - 1), x, new)
        self._sorted = torch.where(ok, new, s)
        ring.index_copy_(0, slot, torch.where(ok, x, ring.index_select(0, slot)[0]).reshape(1))
        self._count = count + ok.to(torch.int64)

    def threshold(self) -> Tensor:
        """() device tensor: the current percentile (inf before any finite norm)."""
        if self._sorted is None:
            return torch.tensor(math.inf)
        valid = self._count.clamp(max=self.history)
        pos = (valid - 1).clamp(min=0).to(self._sorted.dtype) * (self.percentile / 100.0)
        lo = pos.floor().to(torch.int64)
        hi = (lo + 1).clamp(max=(valid - 1).clamp(min=0))
        frac = pos - lo.to(pos.dtype)
        a = self._sorted.index_select(0, lo.reshape(1))[0]  # index_select: t[0-dim tensor] would sync
        b = self._sorted.index_select(0, hi.reshape(1))[0]
        # numpy's linear rule; written so a == b == inf stays inf, not NaN
        return torch.where(a == b, a, a + (b - a) * frac)

    def coefficient(self, grads, stats):
        dtype = stats.global_norm.dtype
        if len(grads) == 0:
            return stats.xp.asarray(torch.ones((), dtype=dtype))
        self._init(stats.device)
        total = stats.global_norm.to(self._sorted.dtype)
        ok = _ok(stats)
        self._absorb(total, ok)
        coef = _norm_coef(self.threshold(), total)
        return stats.xp.asarray(torch.where(ok, coef, torch.ones_like(coef)).to(dtype))

    def state_dict(self):
        if self._sorted is None:
            return {"history": self.history, "initialized": False}
        return {"history": self.history, "initialized": True, "sorted": self._sorted.clone(),
                "ring": self._ring.clone(), "count": self._count.clone()}

    def load_state_dict(self, state_dict):
        if state_dict.get("history") != self.history:
            raise ValueError(f"state_dict: AutoClip history {state_dict.get('history')!r} != {self.history}")
        if not state_dict.get("initialized", False):
            self._sorted = self._ring = self._count = None
            return
        self._sorted = _load_tensor(state_dict, "sorted")
        self._ring = _load_tensor(state_dict, "ring", self._sorted)
        self._count = _load_tensor(state_dict, "count").to(torch.int64).reshape(())
        if self._sorted.shape != (self.history,):
            raise ValueError(f"state_dict: AutoClip window has shape {tuple(self._sorted.shape)}")

    def config(self):
        return {"policy": "AutoClip", "percentile": self.percentile, "history": self.history}
