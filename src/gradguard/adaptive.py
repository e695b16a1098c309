"""Adaptive clipping policies: thresholds learned from the run's own gradients.

- ``AutoClip``: global norm clipped to a percentile of the norms seen so far
  (Seetharaman et al. 2020).
- ``AGC``: unit-wise clipping relative to the weight norm (Brock et al. 2021).
- ``ZClip``: z-score spike clipping against an EMA mean/variance of the
  global norm (Kumar et al. 2025).
- ``AdaGC``: per-tensor clipping to a ratio of each tensor's EMA norm
  (Wang et al. 2025; OLMo's optimizer does the same).

All are ``ClipPolicy`` objects: usable as ``clip=`` of ``gg.Guard`` and inside
``gg.PerLayer``.  Their statistics live in device tensors and are updated with
``torch.where``, never a Python ``if`` on a tensor, so a step costs no host
sync.  A step whose gradients hold NaN/Inf (or whose norm overflows) is left
untouched (coefficient 1, as ``GlobalNorm``) and never enters a statistic:
the published zclip package keeps a NaN mean forever after one bad step.
Statistics are kept in float64 (float32 on MPS): a finite 1e30 norm squared
still fits, so a huge-but-finite spike cannot overflow a variance.
"""
from __future__ import annotations

import fnmatch
import math

import torch
from torch import Tensor

from .clip import ClipPolicy, _norm_coef, _scale_, _scale_each_, check_threshold
from .stats import GradStats

__all__ = ["AutoClip", "AGC", "ZClip", "AdaGC"]


# ------------------------------------------------------------------ helpers


def _state_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _check_open_unit(name: str, value) -> float:
    """A number strictly inside (0, 1), or a ValueError/TypeError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1), got {type(value).__name__}")
    value = float(value)
    if not 0.0 < value < 1.0:  # NaN fails too
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    return value


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _ok(stats: GradStats) -> Tensor:
    """() bool on the stats device: this step may enter the statistics."""
    return ~stats.bad


def _load_tensor(sd: dict, key: str, like: Tensor | None = None) -> Tensor:
    if key not in sd:
        raise ValueError(f"state_dict: missing key {key!r}")
    t = sd[key]
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t)
    t = t.detach().clone()
    if like is not None and t.shape != like.shape:
        raise ValueError(f"state_dict: {key!r} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
    return t


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


# ---------------------------------------------------------------------- AGC


def _unit_norms(t: Tensor) -> Tensor:
    """L2 norm per output unit (dim 0) for ndim > 1, else of the whole tensor (shape (1,))."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if t.ndim > 1:
        return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1, dtype=acc)
    return torch.linalg.vector_norm(t.reshape(-1), dtype=acc).reshape(1)


class AGC(ClipPolicy):
    """Adaptive gradient clipping, unit-wise (NFNets).

    For each unit i (an output row of a Linear weight, an output channel of a
    conv kernel: dim 0 of any tensor with ndim > 1; the whole tensor for
    biases, scalars and norm weights)::

        max_i = clipping * max(||W_i||, eps)
        G_i  <- G_i * max_i / max(||G_i||, 1e-6)   if ||G_i|| >= max_i

    The coefficient reported per tensor is its smallest unit coefficient.
    Stateless.

    Args:
        clipping: lambda > 0 (default 0.01, the paper's choice for batch 4096;
            larger values clip less).
        eps: floor on the weight norm (default 1e-3), so zero-initialised
            weights can still move.
        exclude: glob pattern(s) of parameter names left unclipped; the paper
            does not clip the final classifier, e.g. ``exclude="fc.*"``.  A
            pattern that matches no parameter is a ValueError at ``bind``.

    Example:
        >>> guard = gg.Guard(model, opt, clip=gg.AGC(0.01, exclude="head.*"))

    References:
        Brock, De, Smith, Simonyan. "High-Performance Large-Scale Image
        Recognition Without Normalization", ICML 2021.
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, exclude=()):
        self.clipping = check_threshold("clipping", clipping, allow_inf=False)
        self.eps = check_threshold("eps", eps, allow_inf=False)
        if isinstance(exclude, str):
            exclude = (exclude,)
        try:
            exclude = tuple(exclude)
        except TypeError:
            raise TypeError(f"exclude must be a glob pattern or a list of them, got {type(exclude).__name__}") from None
        for p in exclude:
            if not isinstance(p, str) or not p:
                raise TypeError(f"exclude: pattern {p!r} must be a non-empty string")
        self.exclude = exclude

    def _excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def bind(self, names):
        for p in self.exclude:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                sample = ", ".join(repr(n) for n in list(names)[:4])
                raise ValueError(f"exclude: pattern {p!r} matches no parameter (names look like {sample})")

    def clip_(self, params, grads, stats):
        if len(params) != len(grads):
            raise ValueError(f"AGC needs the parameters of the gradients: got {len(params)} parameters "
                             f"for {len(grads)} gradients")
        dev = stats.device
        ok = _ok(stats)
        one = torch.ones((), device=dev)
        coefs = []
        for name, p, g in zip(stats.names, params, grads):
            if self._excluded(name) or g.numel() == 0:
                coefs.append(one)
                continue
            w_norm = _unit_norms(p.detach())
            g_norm = _unit_norms(g)
            max_norm = w_norm.clamp(min=self.eps) * self.clipping
            c = torch.where(g_norm < max_norm, torch.ones_like(g_norm), max_norm / g_norm.clamp(min=1e-6))
            c = torch.where(ok.to(c.device), c, torch.ones_like(c))
            if g.ndim > 1:
                g.mul_(c.to(g.dtype).reshape((-1,) + (1,) * (g.ndim - 1)))
            else:
                g.mul_(c.to(g.dtype).reshape(()))
            coefs.append(c.min().to(dev, non_blocking=True))
        if not coefs:
            return stats.norms.new_ones(0)
        return torch.stack(coefs).to(stats.norms.dtype)

    def config(self):
        return {"policy": "AGC", "clipping": self.clipping, "eps": self.eps, "exclude": list(self.exclude)}


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
