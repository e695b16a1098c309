"""The two array backends the step decision is written against.

The decision (``decide.py``) and the clip coefficients are written once, with
operators and the handful of functions below.  Which arrays they run on is
chosen once per guard, from the parameters' device:

- ``HOST`` (CPU parameters): numpy scalars.  The CPU statistics kernel's
  numbers are host memory already, and a numpy scalar op costs ~1 us where a
  0-dim torch op costs 10-20 us once the optimizer has swept the caches.
- ``DEVICE`` (accelerators): 0-dim torch tensors on the device, so that nothing
  is read back to the host until the flush.

Both give the same IEEE results: the same float32 operations in the same order.
"""
from __future__ import annotations

import math



import numpy as np
import torch
from torch import Tensor

__all__ = ["HOST", "DEVICE", "Backend"]


class Backend:
    """Array functions of one backend (abstract)."""

    on_host: bool

    def asarray(self, x, like=None):
        raise NotImplementedError

    def scalar(self, value: float, like):
        """``value`` as a 0-dim array of ``like``'s dtype (and device)."""
        raise NotImplementedError

    def flag(self, value: bool, like=None):
        raise NotImplementedError

    def nonfinite(self, x):
        """NaN or +-Inf, elementwise."""
        raise NotImplementedError

    def minimum(self, x, cap: float):
        raise NotImplementedError

    def reciprocal(self, x):
        raise NotImplementedError

    def mul(self, x, k):
        """``x * k`` (``k`` a float or an array), without numpy's overflow/NaN warnings."""
        raise NotImplementedError

    def where(self, cond, x, other):
        raise NotImplementedError

    def tensor(self, x) -> Tensor:
        """``x`` as a tensor (a view where possible)."""
        raise NotImplementedError

    def to_host(self, x):
        """``x`` as a host value; on the device backend a host sync, so callers mark it."""
        raise NotImplementedError


class _Host(Backend):
    on_host = True

    def asarray(self, x, like=None):
        if isinstance(x, Tensor):
            return x.detach().numpy()  # host sync: none, CPU tensors share host memory
        return np.asarray(x) if like is None else np.asarray(x, like.dtype)

    def scalar(self, value, like):
        return np.asarray(value, like.dtype)

    def flag(self, value, like=None):
        return np.bool_(value)

    def nonfinite(self, x):
        return ~np.isfinite(x)

    def minimum(self, x, cap):
        return np.minimum(x, x.dtype.type(cap))

    def reciprocal(self, x):
        # finite and not tiny: nothing to warn (1/x overflows float32 below ~2.9e-39, e.g.
        # the reciprocal of a subnormal clip coefficient a fused optimizer gets as grad_scale)
        if np.ndim(x) == 0 and 1e-38 < abs(x) < math.inf:
            return np.reciprocal(x)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            return np.reciprocal(x)

    def mul(self, x, k):
        # 0 * inf (an infinite total's reciprocal times an infinite max_norm: "measure, never
        # clip") is NaN, and a finite product can overflow; the decision's `where` masks both,
        # so numpy's warning would only be noise on every poisoned step
        with np.errstate(over="ignore", invalid="ignore"):
            return x * k

    def where(self, cond, x, other):
        # a Python number takes the array argument's dtype (torch's rule for scalars)
        like = x if isinstance(x, (np.ndarray, np.generic)) else other
        if np.ndim(cond) == 0 and np.ndim(like) == 0:  # the decision's scalars: a plain branch
            return np.asarray(x if cond else other, like.dtype)
        dt = np.result_type(*[a for a in (x, other) if isinstance(a, (np.ndarray, np.generic))])
        return np.asarray(np.where(cond, np.asarray(x, dt), np.asarray(other, dt)))

    def tensor(self, x):
        return torch.from_numpy(np.asarray(x))

    def to_host(self, x):
        return x


class _Device(Backend):
    on_host = False

    def asarray(self, x, like=None):
        if isinstance(x, Tensor):
            return x if like is None else x.to(like.device, like.dtype, non_blocking=True)
        t = torch.from_numpy(np.asarray(x))
        return t if like is None else t.to(like.device, like.dtype, non_blocking=True)

    def scalar(self, value, like):
        return torch.full((), value, dtype=like.dtype, device=like.device)

    def flag(self, value, like=None):
        return torch.full((), bool(value), dtype=torch.bool, device=None if like is None else like.device)

    def nonfinite(self, x):
        # x - x is 0 for every finite x and NaN for NaN/Inf: two kernels where
        # ~isfinite() launches five (abs, ne, eq, mul, not)
        return (x - x) != 0

    def minimum(self, x, cap):
        return x.clamp(max=cap)

    def reciprocal(self, x):
        return x.reciprocal()

    def mul(self, x, k):
        return x * k

    def where(self, cond, x, other):
        return torch.where(cond, x, other)

    def tensor(self, x):
        return x

    def to_host(self, x):
        return x.cpu().numpy()  # host sync: the caller's, marked there


HOST, DEVICE = _Host(), _Device()


def norm_coefficient(max_norm, total, xp: Backend, bad=None):
    """``min(1, max_norm / (total + 1e-6))``, 1 where ``total`` is NaN/Inf.

    torch's ``clip_grad_norm_`` formula; ``reciprocal() * max_norm`` is what
    ``max_norm / t`` runs in torch, spelled out so that both backends perform the
    very same IEEE operations.  ``max_norm`` may be a float or an array (AutoClip's
    threshold).  ``bad``: ``total``'s non-finite flag when the caller has it already.
    """
    coef = xp.minimum(xp.mul(xp.reciprocal(total + EPS), max_norm), 1.0)
    return xp.where(xp.nonfinite(total) if bad is None else bad, 1.0, coef)


EPS = 1e-6  # torch's clip_grad_norm_ adds this to the total norm

