"""AGC: adaptive gradient clipping unit by unit, relative to the weights."""
from __future__ import annotations

import fnmatch

import torch
from torch import Tensor

from ..clip import ClipPolicy, check_threshold
from ._common import _ok

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

    def check_sharded(self):
        raise ValueError("clip: AGC is not supported with sharded (DTensor) parameters: its "
                         "whole-tensor units (biases, norm weights) would be clipped shard by "
                         "shard. Use GlobalNorm, AutoClip, ZClip or AdaGC under FSDP2.")

    def config(self):
        return {"policy": "AGC", "clipping": self.clipping, "eps": self.eps, "exclude": list(self.exclude)}
