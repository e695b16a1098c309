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

import copy
import functools
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from . import _kernel

__all__ = ["GradStats", "grad_stats", "named_parameters", "compute_stats", "local_grads"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_layout, _dtype, _is_cpu = (operator.attrgetter(a) for a in ("layout", "dtype", "is_cpu"))
_is_contiguous = torch.Tensor.is_contiguous


def dense(g: Tensor) -> bool:
    """Whether ``g``'s elements fill ``numel`` consecutive slots (any order): contiguous, or
    channels-last (conv weights and their gradients under ``memory_format=channels_last``).
    Norms and max |g| do not depend on the order, so the kernel reads such a tensor linearly.
    Sparse tensors are never dense here."""
    if g.is_contiguous():
        return True
    d = g.dim()
    return ((d == 4 and g.is_contiguous(memory_format=torch.channels_last))
            or (d == 5 and g.is_contiguous(memory_format=torch.channels_last_3d)))


def all_dense(grads: list[Tensor]) -> bool:
    """``dense`` for every tensor (the common all-contiguous case in one C-level pass)."""
    return all(map(_is_contiguous, grads)) or all(map(dense, grads))


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
    # () bool set by the guard when the step is poisoned for another reason (a
    # NaN loss, another rank's NaN, a step withheld by a remedy): policies must
    # not learn from a step that will not be applied.
    veto: Tensor | None = field(default=None, repr=False)
    # CPU kernel path: the host arrays the tensors above were made from (sum of
    # squares and max |g| in float64, the 0-dim global norm, the unvetoed
    # ``bad`` flag), and that flag as a tensor.
    host: tuple | None = field(default=None, repr=False, compare=False)
    bad_flag: Tensor | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def device(self) -> torch.device:
        return self.norms.device

    @property
    def bad(self) -> Tensor:
        """() bool: a gradient holds NaN/Inf, the global norm overflowed, or the guard vetoed the step."""
        bad = self.bad_flag if self.bad_flag is not None else (
            self.nonfinite.any() | ~torch.isfinite(self.global_norm))
        return bad if self.veto is None else bad | self.veto

    def with_veto(self, veto: Tensor | None) -> "GradStats":
        """A copy whose ``bad`` also holds when ``veto`` does (set by the guard)."""
        new = copy.copy(self)  # dataclasses.replace re-runs __init__: ~10x slower, per step
        object.__setattr__(new, "veto", veto)
        return new

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
            veto=self.veto,
        )

    def _sumsq(self) -> Tensor:
        return self.sumsq if self.sumsq is not None else self.norms.double().square()


class _HostGradStats(GradStats):
    """GradStats of the CPU kernel path, backed by the kernel's host arrays.

    The tensors are made on first access: the guard's CPU path reads ``host``
    only, and each tensor made per step costs ~5-20 us once the optimizer has
    swept the caches.  Same values and dtypes as the tensor path.
    """

    def __init__(self, names, missing, sumsq: np.ndarray, maxabs: np.ndarray, total: np.ndarray, bad: bool):
        # GradStats is frozen: its own __setattr__ refuses, so set the slots the way it does.
        set_ = object.__setattr__
        set_(self, "names", names)
        set_(self, "missing", missing)
        set_(self, "host", (sumsq, maxabs, total, np.asarray(bad)))
        set_(self, "_cache", {})
        set_(self, "_veto_host", None)

    def with_veto(self, veto: Tensor | None) -> "GradStats":
        new = copy.copy(self)
        object.__setattr__(new, "_cache", {**self._cache, "veto": veto})
        return new

    def set_host_veto(self, veto: bool) -> None:
        """The guard's CPU path, on the object it has just made: ``veto`` as a host bool."""
        object.__setattr__(self, "_veto_host", bool(veto))
        self._cache.pop("veto", None)

    @property
    def veto(self):
        if "veto" in self._cache or self._veto_host is None:
            return self._cache.get("veto")
        return self._make("veto", lambda: torch.from_numpy(np.asarray(self._veto_host)))

    def _make(self, key, fn):
        c = self._cache
        if key not in c:
            with np.errstate(over="ignore", invalid="ignore"):
                c[key] = fn()
        return c[key]

    norms = property(lambda self: self._make("norms", lambda: torch.from_numpy(
        np.sqrt(self.host[0]).astype(self.host[2].dtype))))
    max_abs = property(lambda self: self._make("max_abs", lambda: torch.from_numpy(
        self.host[1].astype(self.host[2].dtype))))
    nonfinite = property(lambda self: self._make("nonfinite", lambda: torch.from_numpy(~np.isfinite(self.host[1]))))
    global_norm = property(lambda self: self._make("global_norm", lambda: torch.from_numpy(self.host[2])))
    sumsq = property(lambda self: self._make("sumsq", lambda: torch.from_numpy(self.host[0])))
    bad_flag = property(lambda self: self._make("bad_flag", lambda: torch.from_numpy(self.host[3])))


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
    names, grads, missing = [], [], []
    for name, p in pairs:
        if p.grad is None:
            missing.append(name)
        else:
            names.append(name)
            grads.append(p.grad)
    return compute_stats(names, grads, missing)


def _check_grad(name: str, g: Tensor) -> None:
    if g.layout != torch.strided:
        raise TypeError(f"parameter {name!r} has a sparse gradient ({g.layout}); "
                        "gradguard supports dense gradients only")


def _kernel_ok(g: Tensor) -> bool:
    return g.device.type == "cpu" and g.dtype in _kernel.KERNEL_DTYPES and dense(g)


@functools.lru_cache(maxsize=None)
def _dtensor_type():
    """DTensor's class when torch.distributed is usable, else None (imported lazily, once)."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def local_grads(grads: list[Tensor]) -> list[Tensor]:
    """The local shard of every DTensor gradient (a view: in-place ops reach the DTensor)."""
    dt = _dtensor_type()
    if dt is None or not any(isinstance(g, dt) for g in grads):
        return grads
    return [g.to_local() if isinstance(g, dt) else g for g in grads]


def compute_stats(names: list[str], grads: list[Tensor], missing: list[str] | None = None) -> GradStats:
    """``grad_stats`` on gradients already gathered (the guard's hot path).

    DTensor gradients (FSDP2, tensor parallel) are reduced to full-tensor
    numbers with one collective for all tensors (see ``_reduce_shards``).
    """
    missing = list(missing or [])
    if not grads:
        z = torch.zeros(0)
        return GradStats([], z, z.clone(), torch.zeros(0, dtype=torch.bool), torch.zeros(()),
                         missing, torch.zeros(0, dtype=torch.float64))
    # This runs every step: whole-list checks through C-level map() rather
    # than a Python loop per tensor (~0.1 us per tensor and check).
    if set(map(_layout, grads)) != {torch.strided}:
        for name, g in zip(names, grads):
            _check_grad(name, g)
    dtypes = list(map(_dtype, grads))
    kinds = set(dtypes)
    out_dtype = torch.float64 if torch.float64 in kinds else torch.float32
    dt = _dtensor_type()
    if dt is not None and any(issubclass(t, dt) for t in set(map(type, grads))):
        sharded = [i for i, g in enumerate(grads) if isinstance(g, dt)]
        sumsq, maxabs = _local_sumsq_maxabs(local_grads(grads))
        sumsq, maxabs = _reduce_shards(grads, sharded, sumsq, maxabs, names)
        return _finish(names, missing, out_dtype, sumsq, maxabs)
    if (_kernel.available() and kinds <= _kernel.KERNEL_DTYPES.keys() and all(map(_is_cpu, grads))
            and all_dense(grads)):
        return kernel_stats(names, grads, missing, dtypes, out_dtype)
    sumsq, maxabs = _local_sumsq_maxabs(grads)
    return _finish(names, missing, out_dtype, sumsq, maxabs)


def kernel_stats(names: list[str], grads: list[Tensor], missing: list[str], dtypes: list,
                 out_dtype: torch.dtype) -> GradStats:
    """The CPU fast path: one kernel call, a few numpy scalars, tensors on demand.

    The caller guarantees what ``compute_stats`` checks: CPU, dense (``dense``), strided,
    ``dtypes`` (the gradients' dtypes) all in ``_kernel.KERNEL_DTYPES``,
    ``out_dtype`` float64 if any of them is float64 else float32.
    """
    n = len(grads)
    out = _kernel.cpu_stats_packed(grads, dtypes)
    sumsq = out[:n]
    total = out[:n].sum()
    if out_dtype is torch.float64:
        total = np.asarray(np.sqrt(total))
    else:  # float32, overflowing to Inf as torch's would (without numpy's overflow warning)
        total = math.sqrt(total)
        total = np.asarray(total if not total >= _F32_OVERFLOW else math.inf, np.float32)
    bad = bool(out[2 * n]) or not math.isfinite(total)
    return _HostGradStats(list(names), missing, sumsq, out[n:2 * n], total, bad)


_F32_OVERFLOW = 2.0 ** 128 - 2.0 ** 103  # float64 values from here on round to float32 Inf


def _finish(names, missing, out_dtype, sumsq: Tensor, maxabs: Tensor) -> GradStats:
    return GradStats(
        names=list(names),
        norms=sumsq.sqrt().to(out_dtype),
        max_abs=maxabs.to(out_dtype),
        nonfinite=~torch.isfinite(maxabs),
        global_norm=sumsq.sum().sqrt().to(out_dtype),
        missing=missing,
        sumsq=sumsq,
    )


def _local_sumsq_maxabs(grads: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(P,) float64 sums of squares and max |g| on the first gradient's device."""
    main = grads[0].device
    n = len(grads)
    use_kernel = _kernel.available()
    kernel_idx = [i for i, g in enumerate(grads) if use_kernel and _kernel_ok(g)]
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
    return sumsq_all, maxabs_all


def _reduce_shards(grads, sharded: list[int], sumsq: Tensor, maxabs: Tensor, names) -> tuple[Tensor, Tensor]:
    """Full-tensor sums of squares and max |g| from per-rank shards, in ONE collective.

    Every rank all-gathers its (2, P) vector of local sums of squares and max |g|,
    then sums the squares over the ranks that hold distinct shards and takes the
    max over all.  A tensor replicated over a mesh dimension is counted once
    (divided by the replication factor); a NaN on any rank's shard reaches every
    rank, so every rank takes the same decision.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Partial, Replicate, Shard

    mesh = grads[sharded[0]].device_mesh
    for i in sharded:
        g = grads[i]
        if g.device_mesh != mesh:
            raise ValueError(f"gradient {names[i]!r} lives on another device mesh; gradguard reduces "
                             "statistics over one mesh per guard")
        for pl in g.placements:
            if isinstance(pl, Partial):
                raise ValueError(f"gradient {names[i]!r} has a Partial placement (not yet reduced); "
                                 "run the guard after the gradient reduction")
            if not isinstance(pl, (Shard, Replicate)):
                raise ValueError(f"gradient {names[i]!r} has an unsupported placement {pl}")
    if mesh.ndim == 1:
        group = mesh.get_group()
    elif mesh.size() == dist.get_world_size():
        group = None  # the whole world is the mesh
    else:
        raise ValueError("gradguard reduces statistics over 1-D meshes or a mesh spanning all ranks")
    world = dist.get_world_size(group)
    # Replication factor of each tensor over the mesh (1 for plain FSDP2 shards).
    repl = torch.ones(len(grads), dtype=torch.float64, device=sumsq.device)
    sharded_set = set(sharded)
    for i in range(len(grads)):
        if i in sharded_set:
            f = 1
            for d, pl in enumerate(grads[i].placements):
                if isinstance(pl, Replicate):
                    f *= mesh.size(d)
            repl[i] = f
        else:
            repl[i] = world  # a plain tensor is the same on every rank (e.g. DDP-averaged)
    n = sumsq.numel()
    comm_device = torch.device("cpu") if dist.get_backend(group) == "gloo" else sumsq.device
    local = torch.cat([sumsq, maxabs]).to(comm_device)
    gathered = torch.empty(world * 2 * n, dtype=local.dtype, device=comm_device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, local, group=group)
    gathered = gathered.view(world, 2, n).to(sumsq.device, non_blocking=True)
    return gathered[:, 0].sum(0) / repl, gathered[:, 1].amax(0)
