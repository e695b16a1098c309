"""Per-tensor gradient statistics in one read, on the gradients' device.

``grad_stats`` is the first arrow of gradguard's flow (gradients -> statistics):
for every parameter with a gradient it yields the L2 norm, the largest |g| and a
non-finite flag, plus the global L2 norm.  Nothing here reads a value back.

How the read is done (``compute_stats``; a guard picks its path once, ``Statistics``):
- CPU, float32/64/16/bf16: the C kernel (``_cstats.c``), float64 sums, host numbers.
- CUDA with Triton: one multi-tensor kernel (``_triton_stats``), no host sync.
- Otherwise: ``torch._foreach_norm`` (L2 and inf), a constant number of launches.
NaN/Inf in a tensor make its max |g| non-finite.  A finite gradient whose squared
norm overflows is not flagged non-finite, but the global norm is Inf: ``bad``
covers both.
"""
from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from . import _kernel, _triton_stats
from .backend import DEVICE, HOST
from .gather import all_dense, dense, gather  # noqa: F401 (dense: public here since 0.1)
from .shards import dtensor_type as _dtensor_type, local_grads, reduce_shards

__all__ = ["GradStats", "grad_stats", "named_parameters", "compute_stats", "local_grads", "param_norm", "param_stats", "Statistics"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_layout, _dtype, _is_cpu = (operator.attrgetter(a) for a in ("layout", "dtype", "is_cpu"))
_numel = Tensor.numel


class GradStats:
    """Statistics of one step's gradients, read lazily.

    Attributes (tensors, made on first access):
        names: parameter names with a gradient, in model order; index i of
            every tensor field belongs to ``names[i]``.
        norms: (P,) L2 norm of each gradient.
        max_abs: (P,) largest |g| of each gradient (NaN if it holds a NaN).
        nonfinite: (P,) bool, True where the gradient holds NaN or Inf.
        global_norm: () L2 norm of all gradients together.
        missing: names of parameters that have no gradient this step.
    Float fields are float32 (float64 when any gradient is float64).

    The numbers are held in one array backend (``backend.py``): numpy arrays for
    the CPU kernel's host numbers, device tensors otherwise.  ``total`` and
    ``flag`` give the global norm and the "bad" flag in that backend, which is
    what the step decision reads; the tensor fields above are made from them only
    when someone asks (a 0-dim tensor costs 5-20 us per step on CPU).
    """

    __slots__ = ("names", "missing", "xp", "_a", "veto", "_cache")

    def __init__(self, names, norms=None, max_abs=None, nonfinite=None, global_norm=None,
                 missing=None, sumsq=None, veto=None, *, bad=None, xp=None):
        self.names = list(names)
        self.missing = list(missing or [])
        self.xp = xp if xp is not None else DEVICE
        # backend arrays: sumsq and/or norms (either derives the other), max_abs, total, bad
        self._a = {"sumsq": sumsq, "norms": norms, "max_abs": max_abs, "total": global_norm,
                   "bad": bad, "nonfinite": nonfinite}
        self.veto = veto  # backend bool set by the guard (a NaN loss, another rank's NaN, a held step)
        self._cache = {}

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"GradStats({len(self.names)} tensors, missing={len(self.missing)})"

    # ---- backend values (what the decision reads)
    @property
    def total(self):
        """The global L2 norm in this object's backend (a 0-dim array or tensor)."""
        return self._a["total"]

    @property
    def total_bad(self):
        """() bool in this object's backend: a gradient holds NaN/Inf or the global norm
        overflowed (the guard's veto not included)."""
        a = self._a
        if a["bad"] is None:
            a["bad"] = self.xp.nonfinite(a["total"])
        return a["bad"]

    @property
    def flag(self):
        """() bool in this object's backend: ``bad`` without making a tensor."""
        bad = self.total_bad
        return bad if self.veto is None else bad | self.veto

    def host(self, field: str):
        """A field as host numpy, on the host backend only (None elsewhere)."""
        if not self.xp.on_host:
            return None
        if field == "norms" and self._a["norms"] is None:
            with np.errstate(over="ignore", invalid="ignore"):
                self._a["norms"] = np.sqrt(self._a["sumsq"]).astype(self._a["total"].dtype)
        return self._a[field]

    @property
    def device_sumsq(self):
        """The sums of squares as held (device backend, before any norm was derived), or None."""
        a = self._a
        return a["sumsq"] if not self.xp.on_host and a["norms"] is None else None

    @property
    def max_abs_raw(self):
        """max |g| as held by the backend (any float dtype)."""
        return self._a["max_abs"]

    # ---- tensor fields
    def _tensor(self, key, make):
        c = self._cache
        if key not in c:
            with np.errstate(over="ignore", invalid="ignore"):
                c[key] = self.xp.tensor(make())
        return c[key]

    @property
    def device(self) -> torch.device:
        return self.global_norm.device

    @property
    def norms(self) -> Tensor:
        a = self._a
        if a["norms"] is not None:
            return self._tensor("norms", lambda: a["norms"])
        dt = a["total"].dtype
        return self._tensor("norms", lambda: (np.sqrt(a["sumsq"]).astype(dt) if self.xp.on_host
                                              else a["sumsq"].sqrt().to(dt)))

    @property
    def sumsq(self) -> Tensor:
        """(P,) float64 sums of squares (exact on the CPU kernel path)."""
        a = self._a
        if a["sumsq"] is not None:
            return self._tensor("sumsq", lambda: a["sumsq"])
        return self._tensor("sumsq", lambda: self.norms.double().square())

    @property
    def max_abs(self) -> Tensor:
        a = self._a
        dt = a["total"].dtype
        return self._tensor("max_abs", lambda: a["max_abs"].astype(dt) if self.xp.on_host
                            else a["max_abs"].to(dt))

    @property
    def nonfinite(self) -> Tensor:
        a = self._a
        if a["nonfinite"] is not None:
            return self._tensor("nonfinite", lambda: a["nonfinite"])
        if self.xp.on_host:
            return self._tensor("nonfinite", lambda: ~np.isfinite(a["max_abs"]))
        # a CUDA inf-norm may drop NaN (max ignores it): the L2 norm never does
        return self._tensor("nonfinite", lambda: ~torch.isfinite(a["max_abs"]) | (
            torch.isnan(a["norms"]) if a["norms"] is not None else torch.isnan(a["sumsq"])))

    @property
    def global_norm(self) -> Tensor:
        return self._tensor("global_norm", lambda: self._a["total"])

    @property
    def bad(self) -> Tensor:
        """() bool: a gradient holds NaN/Inf, the global norm overflowed, or the guard vetoed the step."""
        return self.xp.tensor(self.flag)

    def with_veto(self, veto) -> "GradStats":
        """A copy whose ``bad`` also holds when ``veto`` does (set by the guard)."""
        new = copy.copy(self)
        new.veto = veto
        return new

    def __copy__(self):
        new = GradStats.__new__(GradStats)
        new.names, new.missing, new.xp, new._a, new.veto = self.names, self.missing, self.xp, self._a, self.veto
        new._cache = {k: v for k, v in self._cache.items() if k != "bad"}
        return new

    def subset(self, index: list[int]) -> "GradStats":
        """The statistics of ``names[i] for i in index`` (global norm recomputed; device tensors)."""
        idx = _index_tensor(tuple(index), self.device)
        sumsq = self.sumsq.index_select(0, idx)
        return GradStats([self.names[i] for i in index], norms=self.norms.index_select(0, idx),
                         max_abs=self.max_abs.index_select(0, idx),
                         nonfinite=self.nonfinite.index_select(0, idx),
                         global_norm=sumsq.sum().sqrt().to(self.norms.dtype), sumsq=sumsq,
                         veto=None if self.veto is None else self.xp.tensor(self.veto))


_INDEX_CACHE: dict = {}


def _index_tensor(index: tuple, device) -> Tensor:
    """A long index tensor on ``device``, built once per (index, device) and cached.

    Building it from a Python list each step would be a host-to-device copy: on CUDA
    a host sync.
    """
    key = (index, device)
    t = _INDEX_CACHE.get(key)
    if t is None:
        if len(_INDEX_CACHE) > 256:
            _INDEX_CACHE.clear()
        t = _INDEX_CACHE[key] = torch.tensor(index, dtype=torch.long).to(device)  # host sync: once per index
    return t


def named_parameters(model) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` pairs from an ``nn.Module`` or an iterable of pairs.

    Raises TypeError / ValueError naming the argument for anything else.
    """
    if isinstance(model, nn.Module):
        # a torch.compile'd model: its own module's names (no "_orig_mod." prefix), so that
        # PerLayer patterns and guard checkpoints work on both
        pairs = list(getattr(model, "_orig_mod", model).named_parameters())
        # named_parameters() yields distinct names and tensors: only dtype and device remain
        # to check, in C-level passes (grad_stats may be called every step)
        tensors = [p for _, p in pairs]
        if pairs and all(map(Tensor.is_floating_point, tensors)) and not any(map(_is_meta, tensors)):
            return pairs
    elif isinstance(model, Tensor):
        raise TypeError("model: expected an nn.Module or an iterable of (name, parameter) pairs, "
                        "got a single Tensor; pass [('weight', tensor)]")
    elif isinstance(model, Iterable):
        pairs = list(model)
        if _plain_pairs(pairs):  # the common case, checked with C-level passes
            return pairs
        checked = []
        for item in pairs:
            if (not isinstance(item, (tuple, list)) or len(item) != 2
                    or not isinstance(item[0], str) or not isinstance(item[1], Tensor)):
                raise TypeError(
                    "model: expected an nn.Module or an iterable of (name, parameter) pairs; "
                    f"got an item of type {type(item).__name__}")
            checked.append((item[0], item[1]))
        pairs = checked
    else:
        raise TypeError("model: expected an nn.Module or an iterable of (name, parameter) pairs, "
                        f"got {type(model).__name__}")
    if not pairs:
        raise ValueError("model: no parameters to watch")
    seen: dict[str, Tensor] = {}
    by_id: dict[int, str] = {}
    for name, p in pairs:
        if name in seen:
            raise ValueError(f"model: parameter name {name!r} appears twice")
        if id(p) in by_id:  # tied weights listed twice would be counted and clipped twice
            raise ValueError(f"model: parameter {name!r} is the same tensor as {by_id[id(p)]!r}; "
                             "list each tensor once (as model.named_parameters() does)")
        by_id[id(p)] = name
        if p.is_meta:
            raise ValueError(f"model: parameter {name!r} is on the meta device: materialise the model "
                             "(model.to_empty(device=...)) before building the guard")
        if not (p.is_floating_point()):
            raise TypeError(f"model: parameter {name!r} has dtype {p.dtype}; gradguard watches "
                            "real floating-point parameters only")
        seen[name] = p
    return pairs


def _plain_pairs(pairs: list) -> bool:
    """Whether ``pairs`` are valid ``(str, floating Tensor)`` pairs with distinct names and
    tensors, none on the meta device: ``grad_stats`` may be called every step, and a
    Python loop over ~150 pairs costs more than the statistics.  False: let the loop
    below find the error and name it."""
    if not pairs or not set(map(type, pairs)) <= _PAIR_TYPES or set(map(len, pairs)) != {2}:
        return False
    names, tensors = zip(*pairs)
    return (set(map(type, names)) == {str} and set(map(type, tensors)) <= _TENSOR_TYPES
            and len(set(names)) == len(names) and len(set(map(id, tensors))) == len(tensors)
            and all(map(Tensor.is_floating_point, tensors)) and not any(map(_is_meta, tensors)))


_PAIR_TYPES = frozenset((tuple, list))
_TENSOR_TYPES = frozenset((Tensor, nn.Parameter))
_is_meta = operator.attrgetter("is_meta")


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
        >>> s.global_norm, s.names, s.norms   # device tensors; read them when you need them
    """
    pairs = named_parameters(named_params)
    names, params, grads, missing = gather([n for n, _ in pairs], [p for _, p in pairs], allow_none=True)
    return compute_stats(names, grads, missing)


def _check_grad(name: str, g: Tensor) -> None:
    if g.layout != torch.strided:
        raise TypeError(f"parameter {name!r} has a sparse gradient ({g.layout}); "
                        "gradguard supports dense gradients only")


def _kernel_ok(g: Tensor) -> bool:
    return g.device.type == "cpu" and g.dtype in _kernel.KERNEL_DTYPES and dense(g)


def compute_stats(names: list[str], grads: list[Tensor], missing: list[str] | None = None,
                  *, xp=DEVICE) -> GradStats:
    """``grad_stats`` on gradients already gathered (the guard's hot path).

    ``xp``: the backend of the result: ``backend.DEVICE`` (tensors, the default) or
    ``HOST`` (numpy; CPU gradients only).  DTensor gradients (FSDP2,
    tensor parallel) are reduced to full-tensor numbers with one collective for all
    tensors (``shards.reduce_shards``).
    """
    missing = list(missing or [])
    if not grads:
        z = torch.zeros(0)
        return GradStats([], norms=z, max_abs=z.clone(), global_norm=torch.zeros(()),
                         missing=missing, sumsq=torch.zeros(0, dtype=torch.float64))
    # This runs every step: whole-list checks through C-level map() rather
    # than a Python loop per tensor (~0.1 us per tensor and check).
    if set(map(_layout, grads)) != {torch.strided}:
        for name, g in zip(names, grads):
            _check_grad(name, g)
    dtypes = tuple(map(_dtype, grads))
    out_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    dt = _dtensor_type()
    if dt is not None and any(issubclass(t, dt) for t in set(map(type, grads))):
        sharded = [i for i, g in enumerate(grads) if isinstance(g, dt)]
        sumsq, maxabs = _local_sumsq_maxabs(local_grads(grads))
        sumsq, maxabs = reduce_shards(grads, sharded, sumsq, maxabs, names)
        return _from_sumsq(names, missing, out_dtype, sumsq, maxabs, xp)
    if (_kernel.available() and set(dtypes) <= _kernel.KERNEL_DTYPES.keys()
            and all(map(_is_cpu, grads)) and all_dense(grads)):
        return kernel_stats(names, grads, missing, dtypes, out_dtype, xp=xp)
    if _triton_stats.available(grads):
        sumsq, maxabs = _triton_stats.sumsq_maxabs(grads)
        return _from_sumsq(names, missing, out_dtype, sumsq, maxabs, xp)
    if (len(set(dtypes)) == 1 and len({g.device for g in grads}) == 1 and 0 not in map(_numel, grads)
            and not (grads[0].device.type == "cpu" and _kernel.available())):
        # (the inf-norm of an empty tensor is an error in torch: empties take the general path;
        # CPU tensors the kernel can partly read too)
        # One multi-tensor launch per statistic, whatever the number of tensors.
        acc = torch.float32 if dtypes[0] in _LOW_PRECISION else None
        norms = torch.stack(torch._foreach_norm(grads, 2.0, dtype=acc))
        maxabs = torch.stack(torch._foreach_norm(grads, float("inf"))).to(out_dtype)
        total = torch.linalg.vector_norm(norms)  # torch's clip_grad_norm_ total, same order
        return _result(names, missing, xp, norms=norms.to(out_dtype), max_abs=maxabs,
                       total=total.to(out_dtype))
    sumsq, maxabs = _local_sumsq_maxabs(grads)
    return _from_sumsq(names, missing, out_dtype, sumsq, maxabs, xp)


def _result(names, missing, xp, **arrays) -> GradStats:
    """A GradStats of torch arrays, converted to ``xp`` (HOST: free for CPU tensors)."""
    if xp is HOST:
        arrays = {k: HOST.asarray(v) for k, v in arrays.items()}
    return GradStats(names, missing=missing, xp=xp, norms=arrays.get("norms"),
                     max_abs=arrays["max_abs"], global_norm=arrays["total"], sumsq=arrays.get("sumsq"))


def kernel_stats(names: list[str], grads: list[Tensor], missing: list[str], dtypes,
                 out_dtype: torch.dtype, xp=None) -> GradStats:
    """The CPU fast path: one kernel call, a few numpy scalars (HOST backend).

    The caller guarantees what ``compute_stats`` checks: CPU, dense (``dense``), strided,
    ``dtypes`` (the gradients' dtypes) all in ``_kernel.KERNEL_DTYPES``,
    ``out_dtype`` float64 if any of them is float64 else float32.
    """
    n = len(grads)
    out = _kernel.cpu_stats_packed(grads, dtypes)
    sumsq = out[:n]
    total = sumsq.sum()
    if out_dtype is torch.float64:
        total = np.asarray(np.sqrt(total))
    else:  # float32, overflowing to Inf as torch's would (without numpy's overflow warning)
        total = math.sqrt(total)
        total = np.asarray(total if not total >= _F32_OVERFLOW else math.inf, np.float32)
    bad = np.bool_(bool(out[2 * n]) or not math.isfinite(total))
    if xp is DEVICE:  # the accelerator lane run on CPU: the same numbers as tensors
        return GradStats(names, missing=missing, xp=DEVICE, sumsq=torch.from_numpy(sumsq),
                         max_abs=torch.from_numpy(out[n:2 * n]), global_norm=torch.from_numpy(total),
                         bad=torch.from_numpy(np.asarray(bad)))
    return GradStats(names, missing=missing, xp=HOST, sumsq=sumsq, max_abs=out[n:2 * n],
                     global_norm=total, bad=bad)


_F32_OVERFLOW = 2.0 ** 128 - 2.0 ** 103  # float64 values from here on round to float32 Inf


def _from_sumsq(names, missing, out_dtype, sumsq: Tensor, maxabs: Tensor, xp) -> GradStats:
    # norms are derived from sumsq on first access (two launches fewer when nobody asks)
    return _result(names, missing, xp, sumsq=sumsq, max_abs=maxabs, total=sumsq.sum().sqrt().to(out_dtype))


def _local_sumsq_maxabs(grads: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(P,) float64 sums of squares and max |g| on the first gradient's device, for any
    mix of devices and dtypes (the general path; index tensors cached per layout)."""
    main = grads[0].device
    n = len(grads)
    use_kernel = _kernel.available()
    kernel_idx = [i for i, g in enumerate(grads) if use_kernel and _kernel_ok(g)]
    sumsq_all = torch.empty(n, dtype=torch.float64, device=main)
    maxabs_all = torch.empty(n, dtype=torch.float64, device=main)
    if kernel_idx:
        s, m = _kernel.cpu_stats([grads[i] for i in kernel_idx])
        idx = _index_tensor(tuple(kernel_idx), main)
        sumsq_all.index_copy_(0, idx, torch.from_numpy(s).to(main, non_blocking=True))
        maxabs_all.index_copy_(0, idx, torch.from_numpy(m).to(main, non_blocking=True))
    in_kernel = set(kernel_idx)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, g in enumerate(grads):
        if i not in in_kernel:
            groups.setdefault((g.device, g.dtype), []).append(i)
    for (device, dtype), idxs in groups.items():
        group = [grads[i] for i in idxs]
        acc = torch.float32 if dtype in _LOW_PRECISION else None
        norms = torch._foreach_norm(group, 2.0, dtype=acc)
        if device.type == "cpu":
            # _foreach_norm(.., inf) is ~15x one read on CPU; aminmax is ~1x.
            mm = [torch.aminmax(g) if g.numel() else (g.new_zeros(()), g.new_zeros(()))
                  for g in group]
            maxabs = [torch.maximum(-lo, hi) for lo, hi in mm]
        else:
            maxabs = torch._foreach_norm(group, float("inf"))
        idx = _index_tensor(tuple(idxs), main)
        sumsq_all.index_copy_(0, idx, torch.stack(norms).to(main, torch.float64, non_blocking=True).square())
        maxabs_all.index_copy_(0, idx, torch.stack(maxabs).to(main, torch.float64, non_blocking=True))
    return sumsq_all, maxabs_all


def param_stats(params: list[Tensor], xp) -> GradStats:
    """Per-tensor and total L2 norms of ``params`` (not their gradients) in backend ``xp``
    (full-tensor numbers for DTensor shards)."""
    names = [str(i) for i in range(len(params))]
    return compute_stats(names, [p.detach() for p in params], xp=xp)


def param_norm(params: list[Tensor], xp) -> object:
    """Total L2 norm of ``params`` in backend ``xp``."""
    return param_stats(params, xp).total


class Statistics:
    """How one guard computes its per-step statistics, chosen once for its parameters.

    CPU parameters of the kernel's dtypes on the host backend: the C kernel with the
    parameters' dtypes prepared once; everything else: ``compute_stats``.
    """

    def __init__(self, params: list[Tensor], xp):
        self.xp = xp
        self.dtypes, self.out, self.triton = None, torch.float32, False
        dts = tuple(p.dtype for p in params)
        plain = local_grads(params) is params
        if xp is HOST and plain and set(dts) <= _kernel.KERNEL_DTYPES.keys():
            self.dtypes = dts
        elif xp is DEVICE and plain and _triton_stats.available(params):
            self.dtypes, self.triton = dts, True
        self.out = torch.float64 if torch.float64 in dts else torch.float32

    def __call__(self, names: list[str], grads: list[Tensor], missing: list[str]) -> GradStats:
        dtypes = self.dtypes
        # compute_stats' checks, minus what torch already enforces for a parameter's
        # gradient (its device and size); dtype and layout are checked here.
        if dtypes is not None and not missing and tuple(map(_dtype, grads)) == dtypes and all_dense(grads):
            if self.triton:
                sumsq, maxabs = _triton_stats.sumsq_maxabs(grads)
                return _from_sumsq(names, missing, self.out, sumsq, maxabs, self.xp)
            if _kernel.available():
                return kernel_stats(names, grads, missing, dtypes, self.out)
        return compute_stats(names, grads, missing, xp=self.xp)
