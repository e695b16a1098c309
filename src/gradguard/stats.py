"""Per-tensor gradient statistics in one pass, on the gradients' device.

``grad_stats`` is the first arrow of gradguard's flow (gradients -> statistics):
for every parameter with a gradient it yields the L2 norm, the largest |g| and
a non-finite flag, plus the global L2 norm, as device tensors.  Nothing here
reads a value back to the host.

How the pass is done:
- CPU tensors of float32/float64/float16/bfloat16: one read per tensor in a
  small C kernel (``_cstats.c``), sum of squares in float64 and max |g| as
  integer bits (NaN and Inf propagate).
- Everything else (CUDA, or no compiled kernel): grouped by (device, dtype),
  ``torch._foreach_norm`` for the L2 norms (float32 accumulation for
  fp16/bf16) and ``_foreach_norm(.., inf)`` / ``aminmax`` for max |g|.
NaN/Inf anywhere in a tensor makes its max |g| non-finite; that is the flag.
A finite gradient whose squared norm overflows is *not* flagged non-finite,
but its ``global_norm`` is Inf: ``GradStats.bad`` covers both.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from . import _kernel

__all__ = ["GradStats", "grad_stats", "named_parameters", "compute_stats"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True, eq=False)
class GradStats:
    """Statistics of one step's gradients (device tensors, read lazily).

    Attributes:
        names: parameter names with a gradient, in model order; index i of
            every tensor field belongs to ``names[i]``.
        norms: (P,) L2 norm of each gradient.
        max_abs: (P,) largest |g| of each gradient (NaN if it holds a NaN).
        nonfinite: (P,) bool, True where the gradient holds NaN or Inf.
        global_norm: () L2 norm of all gradients together.
        missing: names of parameters that have no gradient this step.
    Float fields are float32 (float64 when any gradient is float64).
    """

    names: list[str]
    norms: Tensor
    max_abs: Tensor
    nonfinite: Tensor
    global_norm: Tensor
    missing: list[str] = field(default_factory=list)
    sumsq: Tensor | None = field(default=None, repr=False)  # (P,) float64, exact sub-norms

    def __len__(self) -> int:
        return len(self.names)

    @property
    def device(self) -> torch.device:
        return self.norms.device

    @property
    def bad(self) -> Tensor:
        """() bool: a gradient holds NaN/Inf, or the global norm overflowed."""
        return self.nonfinite.any() | ~torch.isfinite(self.global_norm)

    def subset(self, index: list[int]) -> "GradStats":
        """The statistics of ``names[i] for i in index`` (global norm recomputed)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        sumsq = self._sumsq().index_select(0, idx)
        return GradStats(
            names=[self.names[i] for i in index],
            norms=self.norms.index_select(0, idx),
            max_abs=self.max_abs.index_select(0, idx),
            nonfinite=self.nonfinite.index_select(0, idx),
            global_norm=sumsq.sum().sqrt().to(self.norms.dtype),
            missing=[],
            sumsq=sumsq,
        )

    def _sumsq(self) -> Tensor:
        return self.sumsq if self.sumsq is not None else self.norms.double().square()


def named_parameters(model) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` pairs from an ``nn.Module`` or an iterable of pairs.

    Raises TypeError / ValueError naming the argument for anything else.
    """
    if isinstance(model, nn.Module):
        pairs = list(model.named_parameters())
    elif isinstance(model, Tensor):
        raise TypeError("model: expected an nn.Module or an iterable of (name, parameter) pairs, "
                        "got a single Tensor; pass [('weight', tensor)]")
    elif isinstance(model, Iterable):
        pairs = []
        for item in model:
            if (not isinstance(item, (tuple, list)) or len(item) != 2
                    or not isinstance(item[0], str) or not isinstance(item[1], Tensor)):
                raise TypeError(
                    "model: expected an nn.Module or an iterable of (name, parameter) pairs; "
                    f"got an item of type {type(item).__name__}")
            pairs.append((item[0], item[1]))
    else:
        raise TypeError("model: expected an nn.Module or an iterable of (name, parameter) pairs, "
                        f"got {type(model).__name__}")
    if not pairs:
        raise ValueError("model: no parameters to watch")
    seen: dict[str, Tensor] = {}
    for name, p in pairs:
        if name in seen:
            raise ValueError(f"model: parameter name {name!r} appears twice")
        if not (p.is_floating_point()):
            raise TypeError(f"model: parameter {name!r} has dtype {p.dtype}; gradguard watches "
                            "real floating-point parameters only")
        seen[name] = p
    return pairs


def grad_stats(named_params) -> GradStats:
    """Per-tensor L2 norm, max |g| and non-finite flag, and the global L2 norm.

    Args:
        named_params: an ``nn.Module`` or an iterable of ``(name, parameter)``.
            Parameters without a gradient are skipped and listed in
            ``GradStats.missing``.
    Returns:
        GradStats with device tensors; no host synchronisation happens.

    Example:
        >>> s = gg.grad_stats(model)
        >>> s.global_norm, dict(zip(s.names, s.norms.tolist()))
    """
    pairs = named_parameters(named_params)
    names, grads, missing = [], [], []
    for name, p in pairs:
        if p.grad is None:
            missing.append(name)
        else:
            names.append(name)
            grads.append(p.grad)
    return compute_stats(names, grads, missing)


def _check_grad(name: str, g: Tensor) -> None:
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError(f"parameter {name!r} has a sparse gradient ({g.layout}); "
                        "gradguard supports dense gradients only")


def _kernel_ok(g: Tensor) -> bool:
    return g.device.type == "cpu" and g.dtype in _kernel.KERNEL_DTYPES and g.is_contiguous()


def compute_stats(names: list[str], grads: list[Tensor], missing: list[str] | None = None) -> GradStats:
    """``grad_stats`` on gradients already gathered (the guard's hot path)."""
    missing = list(missing or [])
    if not grads:
        z = torch.zeros(0)
        return GradStats([], z, z.clone(), torch.zeros(0, dtype=torch.bool), torch.zeros(()),
                         missing, torch.zeros(0, dtype=torch.float64))
    for name, g in zip(names, grads):
        _check_grad(name, g)
    out_dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    main = grads[0].device
    n = len(grads)

    use_kernel = _kernel.available()
    kernel_idx = [i for i, g in enumerate(grads) if use_kernel and _kernel_ok(g)]
    if len(kernel_idx) == n:
        # Fast path, all on CPU: the whole step is a few numpy ops.
        sumsq, maxabs = _kernel.cpu_stats(grads)
        with np.errstate(over="ignore", invalid="ignore"):
            return GradStats(
                names=list(names),
                norms=torch.from_numpy(np.sqrt(sumsq)).to(out_dtype),
                max_abs=torch.from_numpy(maxabs).to(out_dtype),
                nonfinite=torch.from_numpy(~np.isfinite(maxabs)),
                global_norm=torch.tensor(np.sqrt(sumsq.sum()), dtype=out_dtype),
                missing=missing,
                sumsq=torch.from_numpy(sumsq),
            )

    sumsq_all = torch.empty(n, dtype=torch.float64, device=main)
    maxabs_all = torch.empty(n, dtype=torch.float64, device=main)
    if kernel_idx:
        s, m = _kernel.cpu_stats([grads[i] for i in kernel_idx])
        idx = torch.as_tensor(kernel_idx, device=main)
        sumsq_all.index_copy_(0, idx, torch.from_numpy(s).to(main, non_blocking=True))
        maxabs_all.index_copy_(0, idx, torch.from_numpy(m).to(main, non_blocking=True))
    in_kernel = set(kernel_idx)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, g in enumerate(grads):
        if i not in in_kernel:
            groups.setdefault((g.device, g.dtype), []).append(i)
    for (device, dtype), idxs in groups.items():
        gs = [grads[i] for i in idxs]
        acc = torch.float32 if dtype in _LOW_PRECISION else None
        norms = torch._foreach_norm(gs, 2.0, dtype=acc)
        if device.type == "cpu":
            # _foreach_norm(.., inf) is ~15x one read on CPU; aminmax is ~1x.
            mm = [torch.aminmax(g) if g.numel() else (g.new_zeros(()), g.new_zeros(()))
                  for g in gs]
            maxabs = [torch.maximum(-lo, hi) for lo, hi in mm]
        else:
            maxabs = torch._foreach_norm(gs, float("inf"))
        idx = torch.as_tensor(idxs, device=main)
        sumsq_all.index_copy_(0, idx, torch.stack(norms).to(main, torch.float64, non_blocking=True).square())
        maxabs_all.index_copy_(0, idx, torch.stack(maxabs).to(main, torch.float64, non_blocking=True))
    return GradStats(
        names=list(names),
        norms=sumsq_all.sqrt().to(out_dtype),
        max_abs=maxabs_all.to(out_dtype),
        nonfinite=~torch.isfinite(maxabs_all),
        global_norm=sumsq_all.sum().sqrt().to(out_dtype),
        missing=missing,
        sumsq=sumsq_all,
    )
