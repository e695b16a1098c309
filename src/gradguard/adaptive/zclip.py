"""ZClip: z-score spike clipping of the global norm against its EMA."""
from __future__ import annotations


import torch
from torch import Tensor

from ..clip import ClipPolicy, _norm_coef, check_threshold
from ._common import _check_int, _check_open_unit, _load_tensor, _ok, _state_dtype

# -------------------------------------------------------------------- ZClip


class ZClip(ClipPolicy):
    """Z-score spike clipping of the global norm against its EMA mean/variance.

    Warm-up: the first ``warmup`` finite norms are collected without clipping;
    then ``mu`` = their mean and ``var`` = their (population) variance.  After::

        z = (g - mu) / (sqrt(var) + 1e-6)
        if z > z_thresh:  g_c = mu + z_thresh * sqrt(var) / (z / z_thresh)   # clip to g_c
        else:             g_c = g
        mu  <- alpha * mu  + (1 - alpha) * g_c
        var <- alpha * var + (1 - alpha) * (g_c - mu)**2     (the new mu)

    i.e. the reference package's ``zscore`` mode with ``adaptive_scaling``,
    updating the EMA with the clipped norm.  A NaN/Inf step is neither clipped
    nor counted (the reference lets it in and its mean is NaN forever).

    Args:
        alpha: EMA factor in (0, 1), default 0.97.
        z_thresh: z-score threshold > 0, default 2.5.
        warmup: finite norms collected before clipping starts (int >= 1), default 25.
        eps: added to the standard deviation (> 0), default 1e-6.

    Example:
        >>> guard = gg.Guard(model, opt, clip=gg.ZClip())

    References:
        Kumar, Owen, Chowdhury, Güra. "ZClip: Adaptive Spike Mitigation for
        LLM Pre-Training", arXiv:2504.02507, 2025.
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25, eps: float = 1e-6):
        self.alpha = _check_open_unit("alpha", alpha)
        self.z_thresh = check_threshold("z_thresh", z_thresh, allow_inf=False)
        self.warmup = _check_int("warmup", warmup, 1)
        self.eps = check_threshold("eps", eps, allow_inf=False)
        self._buf: Tensor | None = None
        self._mean = self._var = self._count = None

    def _init(self, device):
        if self._buf is None:
            dt = _state_dtype(device)
            self._buf = torch.zeros(self.warmup, dtype=dt, device=device)
            self._mean = torch.zeros((), dtype=dt, device=device)
            self._var = torch.zeros((), dtype=dt, device=device)
            self._count = torch.zeros((), dtype=torch.int64, device=device)
        elif self._buf.device != device:
            self._buf, self._mean, self._var, self._count = (
                t.to(device) for t in (self._buf, self._mean, self._var, self._count))

    @property
    def mean(self) -> Tensor | None:
        """() device tensor: EMA mean of the (clipped) global norm."""
        return self._mean

    @property
    def var(self) -> Tensor | None:
        """() device tensor: EMA variance of the (clipped) global norm."""
        return self._var

    def coefficient(self, grads, stats):
        if len(grads) == 0:
            return stats.xp.asarray(torch.ones((), dtype=stats.global_norm.dtype))
        self._init(stats.device)
        g = stats.global_norm.to(self._mean.dtype)
        ok = _ok(stats)
        warm = self._count < self.warmup
        live = ok & ~warm
        std = self._var.sqrt()
        z = (g - self._mean) / (std + self.eps)
        spike = live & (z > self.z_thresh)
        clip_val = self._mean + self.z_thresh * std / (z / self.z_thresh)
        coef = torch.where(spike, _norm_coef(clip_val, g), torch.ones_like(g))
        x = torch.where(spike, clip_val, g)
        mean = self.alpha * self._mean + (1 - self.alpha) * x
        var = self.alpha * self._var + (1 - self.alpha) * (x - mean) ** 2
        self._mean = torch.where(live, mean, self._mean)
        self._var = torch.where(live, var, self._var)
        # Warm-up: collect; initialise mean/var when the warmup-th finite norm arrives.
        absorb = ok & warm
        slot = self._count.clamp(max=self.warmup - 1).reshape(1)
        self._buf.index_copy_(0, slot, torch.where(absorb, g, self._buf.index_select(0, slot)[0]).reshape(1))
        self._count = self._count + absorb.to(torch.int64)
        ready = absorb & (self._count == self.warmup)
        self._mean = torch.where(ready, self._buf.mean(), self._mean)
        self._var = torch.where(ready, self._buf.var(unbiased=False), self._var)
        return stats.xp.asarray(coef.to(stats.global_norm.dtype))

    def state_dict(self):
        if self._buf is None:
            return {"warmup": self.warmup, "initialized": False}
        return {"warmup": self.warmup, "initialized": True, "buffer": self._buf.clone(),
                "mean": self._mean.clone(), "var": self._var.clone(), "count": self._count.clone()}

    def load_state_dict(self, state_dict):
        if state_dict.get("warmup") != self.warmup:
            raise ValueError(f"state_dict: ZClip warmup {state_dict.get('warmup')!r} != {self.warmup}")
        if not state_dict.get("initialized", False):
            self._buf = self._mean = self._var = self._count = None
            return
        buf = _load_tensor(state_dict, "buffer")
        if buf.shape != (self.warmup,):
            raise ValueError(f"state_dict: ZClip buffer has shape {tuple(buf.shape)}, expected ({self.warmup},)")
        self._buf = buf
        self._mean = _load_tensor(state_dict, "mean").reshape(())
        self._var = _load_tensor(state_dict, "var").reshape(())
        self._count = _load_tensor(state_dict, "count").to(torch.int64).reshape(())

    def config(self):
        return {"policy": "ZClip", "alpha": self.alpha, "z_thresh": self.z_thresh,
                "warmup": self.warmup, "eps": self.eps}
