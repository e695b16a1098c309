"""AdaGC: per-tensor adaptive clipping against each tensor's EMA norm."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..clip import ClipPolicy, _norm_coef, _scale_each_, check_threshold
from ._common import _check_int, _check_open_unit, _load_tensor, _ok, _state_dtype

# -------------------------------------------------------------------- AdaGC


class AdaGC(ClipPolicy):
    """Per-tensor clipping to a ratio of each tensor's EMA of clipped norms.

    After warm-up, for every tensor i::

        h_i     = min(1, ratio * gamma_i / ||g_i||)      # g_i <- h_i * g_i
        gamma_i <- beta * gamma_i + (1 - beta) * ||h_i * g_i||

    The first finite norm of a tensor initialises ``gamma_i`` and is not
    clipped.  With ``warmup > 0`` the paper's warm-up runs first: for that many
    finite steps every gradient is clipped together to the global norm
    ``warmup_max_norm`` and ``gamma_i`` tracks the minimum clipped norm.
    State is keyed by parameter name, so a tensor missing a gradient on some
    steps keeps its own history.  A NaN/Inf step changes nothing.

    Args:
        ratio: lambda_rel > 0, default 1.05 (the paper's value).
        beta: EMA factor in (0, 1), default 0.98 (the paper's value).
        warmup: steps of global clipping before per-tensor clipping (int >= 0,
            default 0; the paper uses 100 with AdamW warm-up).
        warmup_max_norm: lambda_abs of the warm-up's global clipping (default 1.0).

    Example:
        >>> guard = gg.Guard(model, opt, clip=gg.AdaGC(ratio=1.05, beta=0.98))

    References:
        Wang et al. "AdaGC: Improving Training Stability for Large Language
        Model Pretraining", arXiv:2502.11034, 2025.
    """

    def __init__(self, ratio: float = 1.05, beta: float = 0.98, warmup: int = 0,
                 warmup_max_norm: float = 1.0):
        self.ratio = check_threshold("ratio", ratio, allow_inf=False)
        self.beta = _check_open_unit("beta", beta)
        self.warmup = _check_int("warmup", warmup, 0)
        self.warmup_max_norm = check_threshold("warmup_max_norm", warmup_max_norm, allow_inf=False)
        self._names: list[str] = []
        self._slot: dict[str, int] = {}
        self._gamma: Tensor | None = None  # (P,) +inf until a tensor's first finite norm
        self._count: Tensor | None = None  # () int64 finite steps seen
        self._index_cache: dict[tuple, Tensor] = {}

    def bind(self, names):
        self._register(list(names))

    def _register(self, names: list[str]) -> None:
        new = [n for n in names if n not in self._slot]
        for n in new:
            self._slot[n] = len(self._names)
            self._names.append(n)
        if new and self._gamma is not None:
            pad = torch.full((len(new),), math.inf, dtype=self._gamma.dtype, device=self._gamma.device)
            self._gamma = torch.cat([self._gamma, pad])
            self._index_cache.clear()

    def _init(self, device):
        if self._gamma is None:
            self._gamma = torch.full((len(self._names),), math.inf, dtype=_state_dtype(device), device=device)
            self._count = torch.zeros((), dtype=torch.int64, device=device)
        elif self._gamma.device != device:
            self._gamma, self._count = self._gamma.to(device), self._count.to(device)
            self._index_cache.clear()

    def _index(self, names: list[str]) -> Tensor:
        key = tuple(names)
        if key not in self._index_cache:
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            self._index_cache[key] = torch.as_tensor([self._slot[n] for n in names], device=self._gamma.device)
        return self._index_cache[key]

    @property
    def gamma(self) -> dict[str, Tensor]:
        """Each tensor's EMA norm (device 0-dim tensors; inf = not seen yet)."""
        return {n: self._gamma[i] for i, n in enumerate(self._names)} if self._gamma is not None else {}

    def clip_(self, params, grads, stats):
        if len(grads) == 0:
            return stats.norms.new_ones(0)
        self._register(stats.names)
        self._init(stats.device)
        idx = self._index(stats.names)
        dt = self._gamma.dtype
        norms = stats.norms.to(dt)
        ok = _ok(stats)
        gamma = self._gamma.index_select(0, idx)
        # A zero norm (LoRA's A while B is still zero, a zero-initialised head) is "not seen
        # yet": a gamma of 0 would clip that tensor to nothing forever.
        seen = torch.isfinite(gamma) & (gamma > 0)
        # per-tensor rule (unseen tensors: h = 1, gamma initialised below)
        h = torch.where(seen, (self.ratio * gamma / norms).clamp(max=1.0), torch.ones_like(norms))
        h = torch.where(torch.isnan(h), torch.ones_like(h), h)  # 0/0 on a zero gradient
        ema = torch.where(seen, self.beta * gamma + (1 - self.beta) * h * norms, norms)
        if self.warmup > 0:
            warm = self._count < self.warmup
            hg = _norm_coef(self.warmup_max_norm, stats.global_norm.to(dt))
            h = torch.where(warm, hg.expand_as(h), h)
            ema = torch.where(warm, torch.where(seen, torch.minimum(gamma, hg * norms), hg * norms), ema)
        h = torch.where(ok, h, torch.ones_like(h))
        self._gamma = self._gamma.index_copy(0, idx, torch.where(ok, ema, gamma))
        self._count = self._count + ok.to(torch.int64)
        coefs = h.to(stats.norms.dtype)
        _scale_each_(grads, coefs)
        return coefs

    def state_dict(self):
        if self._gamma is None:
            return {"names": list(self._names), "initialized": False}
        return {"names": list(self._names), "initialized": True,
                "gamma": self._gamma.clone(), "count": self._count.clone()}

    def load_state_dict(self, state_dict):
        names = list(state_dict.get("names", []))
        if not state_dict.get("initialized", False):
            self._gamma = self._count = None
            self._register(names)
            return
        gamma = _load_tensor(state_dict, "gamma")
        if gamma.shape != (len(names),):
            raise ValueError(f"state_dict: AdaGC gamma has shape {tuple(gamma.shape)} for {len(names)} names")
        self._register(names)
        full = torch.full((len(self._names),), math.inf, dtype=gamma.dtype)
        full[torch.as_tensor([self._slot[n] for n in names], dtype=torch.long)] = gamma.cpu()  # host sync: load_state_dict only
        self._gamma = full.to(gamma.device)
        self._count = _load_tensor(state_dict, "count").to(torch.int64).reshape(())
        self._index_cache.clear()

    def config(self):
        return {"policy": "AdaGC", "ratio": self.ratio, "beta": self.beta, "warmup": self.warmup,
                "warmup_max_norm": self.warmup_max_norm}
