"""The Guard: statistics -> clipping -> skip decision -> optimizer step -> record.

``guard.step()`` replaces ``optimizer.step()`` the way ``GradScaler.step`` does.
Per step it computes every layer's gradient statistics on the device, applies
the clipping policy, and steps the optimizer unless a gradient (or the loss)
holds NaN/Inf.  How a poisoned step is skipped depends on the optimizer:

- fused Adam/AdamW/SGD (``fused=True``): the skip flag goes into the
  optimizer's own ``found_inf`` tensor and a ``GlobalNorm`` coefficient into
  its ``grad_scale`` (the attributes GradScaler uses): no host sync, and no
  separate pass over the gradients for clipping.
- any other optimizer: one host read of the flag per step, then
  ``optimizer.step()`` is called or not.  Parameters and every optimizer-state
  tensor stay bitwise unchanged on a skipped step.

Per-step rows (loss, norms, coefficient, per-layer statistics) go to a device
buffer that is read back once per ``flush_every`` steps; events are built from
those rows (``detect.py``).
"""
from __future__ import annotations

import contextlib
import copy
import math
import operator
import sqlite3
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .clip import ClipPolicy
from .act import Remedies
from .detect import _from_list, _to_list, default_detectors, nonfinite_event
from .events import Event, NonFiniteGradientError
from .layout import RunInfo
from .record.buffer import StepBuffer
from . import _kernel
from .stats import GradStats, all_dense, compute_stats, kernel_stats, local_grads, named_parameters

__all__ = ["Guard", "StepReport"]

ON_NONFINITE = ("skip", "raise", "warn")
STATE_VERSION = 2  # 2: rows pending a flush are saved ("pending")
# Row layout in the step buffer: these global columns, then 2 per layer.
# "param_norm": total parameter L2 norm, every `param_norm_every` steps (NaN in between).
GLOBAL_COLS = ("bad", "skipped", "loss", "loss_bad", "global_norm", "clip_coef", "lr", "param_norm")
_G = len(GLOBAL_COLS)
# CPU default flush interval: detectors and the store take rows in batches of
# 16 (a poisoned step is flushed at once); the skip decision is still per step.
CPU_FLUSH_EVERY = 16
_MISSING = object()
_NO_CONTEXT = contextlib.nullcontext()


@dataclass(eq=False)
class StepReport:
    """What ``guard.step()`` did.  Tensor-backed fields are read on access.

    Attributes:
        step: the 0-based step index (skipped steps count).
        stats: the step's ``GradStats`` (device tensors, pre-clip).
        global_norm: pre-clip global L2 norm (float).
        clip_coef: smallest coefficient the policy applied (1.0 = untouched).
        skipped: whether the optimizer step was withheld.
    """

    step: int
    stats: GradStats
    global_norm_t: Tensor = field(repr=False)
    clip_coef_t: Tensor = field(repr=False)
    skipped_t: Tensor = field(repr=False)
    loss_t: Tensor | None = field(default=None, repr=False)

    @property
    def global_norm(self) -> float:
        return float(self.global_norm_t)  # host sync: only when the caller reads it

    @property
    def clip_coef(self) -> float:
        return float(self.clip_coef_t)  # host sync: only when the caller reads it

    @property
    def skipped(self) -> bool:
        return bool(self.skipped_t)  # host sync: only when the caller reads it

    @property
    def loss(self) -> float | None:
        return None if self.loss_t is None else float(self.loss_t)  # host sync: on read

    def __repr__(self) -> str:
        return (f"StepReport(step={self.step}, global_norm={self.global_norm:.4g}, "
                f"clip_coef={self.clip_coef:.4g}, skipped={self.skipped})")


class _HostStepReport(StepReport):
    """StepReport of the CPU path: host numbers, tensors made on first access."""

    def __init__(self, step: int, stats: GradStats, coef: np.float32, skipped: bool, loss):
        self.step, self.stats = step, stats
        self._host = (coef, skipped, loss)

    global_norm_t = property(lambda self: self.stats.global_norm)
    clip_coef_t = property(lambda self: torch.from_numpy(np.asarray(self._host[0], np.float32)))
    skipped_t = property(lambda self: torch.from_numpy(np.asarray(self._host[1])))
    loss_t = property(lambda self: None if self._host[2] is None
                      else torch.from_numpy(np.asarray(self._host[2], np.float32)))
    # the same numbers without a tensor in between
    global_norm = property(lambda self: float(self.stats.host[2]))
    clip_coef = property(lambda self: float(self._host[0]))
    skipped = property(lambda self: bool(self._host[1]))
    loss = property(lambda self: None if self._host[2] is None else float(self._host[2]))


def _step_with(opt, closure, **attrs) -> None:
    """``opt.step(closure)`` with attributes set for this call only (a fused optimizer's
    ``grad_scale`` / ``found_inf``), restored even if the step raises."""
    had = {a: getattr(opt, a, _MISSING) for a in attrs}
    for a, v in attrs.items():
        setattr(opt, a, v)
    try:
        opt.step() if closure is None else opt.step(closure)
    finally:
        for a, v in had.items():
            if v is _MISSING:
                delattr(opt, a)
            else:
                setattr(opt, a, v)


def _refuse_unitwise_on_shards(clip: ClipPolicy, params: list[Tensor]) -> None:
    """AGC's whole-tensor units (biases, norms) would be clipped per shard under FSDP2."""
    from .adaptive import AGC
    from .clip import PerLayer
    from .stats import _dtensor_type

    dt = _dtensor_type()
    if dt is None or not any(isinstance(p, dt) for p in params):
        return
    stack = [clip]
    while stack:
        pol = stack.pop()
        if isinstance(pol, AGC):
            raise ValueError("clip: AGC is not supported with sharded (DTensor) parameters: its "
                             "whole-tensor units (biases, norm weights) would be clipped shard by "
                             "shard. Use GlobalNorm, AutoClip, ZClip or AdaGC under FSDP2.")
        if isinstance(pol, PerLayer):
            stack += list(pol.rules.values()) + ([pol.default] if pol.default is not None else [])


_version = operator.attrgetter("_version")
_grad = operator.attrgetter("grad")
_NoneType = type(None)
_dtype = operator.attrgetter("dtype")


def _grad_signature(grads: list[Tensor]) -> tuple[list, list]:
    """Weak references to this step's gradients and their version counters."""
    return list(map(weakref.ref, grads)), list(map(_version, grads))


def _same_grads(sig: tuple[list, list] | None, grads: list[Tensor]) -> bool:
    """Whether ``grads`` are the very tensors of ``sig``, unmodified (no backward ran).

    Weak references: a freed gradient's id() can be reused by the next one.
    """
    if sig is None or len(sig[0]) != len(grads):
        return False
    refs, versions = sig
    # The first tensor decides almost every call (a new backward makes new
    # tensors, or bumps their versions when accumulating).
    if refs[0]() is not grads[0] or versions[0] != grads[0]._version:
        return False
    return all(r() is g for r, g in zip(refs, grads)) and versions == list(map(_version, grads))


def _is_fused(optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)
                and optimizer.defaults.get("fused", False))


class Guard:
    """Watches, clips and protects every step of a PyTorch training loop.

    Args:
        model: an ``nn.Module`` or an iterable of ``(name, parameter)``.
        optimizer: the ``torch.optim.Optimizer`` that trains those parameters.
        clip: a ``ClipPolicy`` (``gg.GlobalNorm(1.0)``, ``gg.Value(0.5)``, ...) or None.
        on_nonfinite: ``"skip"`` (default) withholds the optimizer step when a
            gradient or the loss holds NaN/Inf; ``"raise"`` raises
            ``NonFiniteGradientError`` naming the layers; ``"warn"`` warns and
            steps anyway.
        log_dir: where the run store is written (None: nothing is written).
            Under torch.distributed only rank ``log_rank`` writes (``"all"``:
            every rank, as runs named ``NAME-rankR``).
        sinks: extra sinks fed the same rows and events, e.g.
            ``[gradguard.sinks.TensorBoardSink("runs/tb")]``; work without ``log_dir``.
        scaler: a ``torch.amp.GradScaler``; the guard unscales, clips on the
            unscaled gradients and calls ``scaler.step(optimizer)``.  You still
            call ``scaler.update()``.
        flush_every: steps between two flushes of the recorded rows to the
            detectors, remedies and the store (default 16 on CPU, 32 on
            accelerators).  Events appear at flush time; a step with NaN/Inf
            is flushed at once on CPU.  On an accelerator a flush is the one
            host sync of the interval; on CPU the skip decision is taken on
            the host every step (one read of the loss, free: host memory).
        run_name: name of the run in the store.
        detectors: objects with ``bind(guard)``, ``update(steps, rows, guard)
            -> list[Event]``, ``state_dict()`` / ``load_state_dict()``.  They
            read the rows drained from the device buffer (layout: ``GLOBAL_COLS``,
            then per-layer norms, then per-layer max |g|).  None (default): the
            standard set (``detect.default_detectors()``); ``[]``: none.
        remedies: what to do per event kind or severity, e.g.
            ``{"exploding": "lr_backoff", "spike": gg.Rollback(every=50),
            "critical": gg.FlightRecorder("dumps/")}`` (see ``act.py``).
        param_norm_every: steps between measurements of the total parameter
            norm (the ``param_norm`` column, read by weight_growth); 0: never.

    Example:
        >>> guard = gg.Guard(model, optimizer, clip=gg.GlobalNorm(1.0))
        >>> loss.backward(); report = guard.step(loss=loss)
    """

    def __init__(self, model, optimizer, clip: ClipPolicy | None = None, on_nonfinite: str = "skip",
                 log_dir=None, *, scaler=None, flush_every: int | None = None,
                 run_name: str | None = None, detectors: list | None = None,
                 remedies: dict | None = None, param_norm_every: int = 10,
                 process_group=None, log_rank: int | str = 0, sinks: list | None = None):
        pairs = named_parameters(model)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if clip is not None and not isinstance(clip, ClipPolicy):
            raise TypeError(f"clip must be a gradguard ClipPolicy (e.g. gg.GlobalNorm(1.0)) or None, "
                            f"got {type(clip).__name__}")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
        if flush_every is not None and (isinstance(flush_every, bool) or not isinstance(flush_every, int)
                                        or flush_every < 1):
            raise ValueError(f"flush_every must be a positive int, got {flush_every!r}")
        if scaler is not None and not hasattr(scaler, "unscale_"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")

        if isinstance(param_norm_every, bool) or not isinstance(param_norm_every, int) or param_norm_every < 0:
            raise ValueError(f"param_norm_every must be an int >= 0, got {param_norm_every!r}")
        self.param_norm_every = param_norm_every
        self.model = model if isinstance(model, torch.nn.Module) else None  # for advice and rollback
        self.hold_steps = 0  # next steps whose optimizer step is withheld (set by Rollback)
        self.names = [n for n, _ in pairs]
        self.params = [p for _, p in pairs]
        # What detectors see of the run; the per-tensor norms are WeightGrowthDetector's reference
        # (compute_stats: full-tensor norms, DTensor shards included).
        init_norms = compute_stats(self.names, [p.detach() for p in self.params]).norms
        self.run = RunInfo.describe(self.names, self.params, self.model, param_norm_every,
                                    init_layer_norms=init_norms.double().cpu().numpy())  # host sync: construction only
        self._sharded = local_grads(self.params) is not self.params  # any DTensor parameter
        watched = {id(p) for p in self.params}
        unseen = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"] if id(p) not in watched]
        if unseen:
            raise ValueError(f"optimizer holds {len(unseen)} parameter(s) the guard does not watch "
                             f"(shapes {unseen[:3]}); clipping would silently miss them. Pass the "
                             "whole model, or every (name, parameter) the optimizer trains.")
        self.optimizer = optimizer
        self.clip = clip
        if clip is not None:
            clip.bind(self.names)
            _refuse_unitwise_on_shards(clip, self.params)
        self.on_nonfinite = on_nonfinite
        self.scaler = scaler
        self.fused = _is_fused(optimizer)
        self._state_key, self._state_ready = None, False
        devices = {p.device for p in self.params}
        self.device = self.params[0].device
        on_cpu = devices == {torch.device("cpu")}
        self.flush_every = flush_every or (CPU_FLUSH_EVERY if on_cpu else 32)
        # On CPU the statistics are already in host memory: each step's skip /
        # clip decision is read from its row (one read, free) instead of being
        # folded into the optimizer through found_inf / grad_scale tensors.
        self._host_decisions = on_cpu
        # The CPU kernel's per-step input that does not change: the parameters' dtypes.
        self._kernel_dtypes, self._kernel_out = None, torch.float32
        dts = [p.dtype for p in self.params]
        if on_cpu and not self._sharded and set(dts) <= _kernel.KERNEL_DTYPES.keys():
            self._kernel_dtypes = tuple(dts)
            self._kernel_out = torch.float64 if torch.float64 in dts else torch.float32
        self._index = {n: i for i, n in enumerate(self.names)}
        self._buffer = StepBuffer(_G + 2 * len(self.names), self.flush_every, self.device)
        self._nan = torch.full((), math.nan, device=self.device)  # never written: a fill value
        self._lr_cache: tuple = (None, self._nan)
        self._step = 0
        self._skipped = 0
        self._nonfinite = 0
        self._events: list[Event] = []
        self._last_grads: list | None = None
        # Detectors read the drained rows (host numpy) at each flush; the
        # non-finite check above is built in and always on.
        self.detectors = list(detectors) if detectors is not None else default_detectors()
        for i, det in enumerate(self.detectors):
            missing_api = [m for m in ("bind", "update", "state_dict", "load_state_dict")
                           if not callable(getattr(det, m, None))]
            if missing_api:
                raise TypeError(f"detectors[{i}] ({type(det).__name__}) lacks {', '.join(missing_api)}: "
                                "a detector needs bind, update, state_dict and load_state_dict")
            det.bind(self.run)
        self.remedies = Remedies(remedies, self, log_dir)
        self.last_report: StepReport | None = None
        # Distributed: decisions agree across ranks; one rank writes the store.
        self.process_group = process_group
        self._world, self.rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            import torch.distributed as dist

            self._world = dist.get_world_size(process_group)
            self.rank = dist.get_rank(process_group)
            self._comm_device = (torch.device("cpu") if dist.get_backend(process_group) == "gloo"
                                 else self.device)
        if not (log_rank == "all" or (isinstance(log_rank, int) and not isinstance(log_rank, bool)
                                      and 0 <= log_rank < self._world)):
            raise ValueError(f"log_rank must be a rank in [0, {self._world}) or 'all', got {log_rank!r}")
        self.recorder = None
        if (log_dir is not None or sinks) and (log_rank == "all" or log_rank == self.rank):
            from .record import open_recorder  # the run store; lazy so the core stays light

            if log_rank == "all" and self._world > 1:
                run_name = f"{run_name or 'run'}-rank{self.rank}"
            try:
                self.recorder = open_recorder(log_dir, run_name=run_name, layers=self._layer_info(),
                                              config=self.config(), sinks=sinks)
                # A guard dropped without close() still ends its writer thread and connection.
                weakref.finalize(self, self.recorder.close)
            except (OSError, sqlite3.Error) as exc:  # a log sink never stops training
                warnings.warn(f"gradguard: cannot write the run store in log_dir {log_dir} ({exc}); "
                              "training continues without it", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ info
    def _layer_info(self) -> list[dict]:
        return [{"name": n, "shape": list(p.shape), "order": i}
                for i, (n, p) in enumerate(zip(self.names, self.params))]

    def config(self) -> dict:
        return {"clip": self.clip.config() if self.clip is not None else None,
                "on_nonfinite": self.on_nonfinite, "optimizer": type(self.optimizer).__name__,
                "fused": self.fused, "flush_every": self.flush_every,
                "amp": self.scaler is not None,
                "detectors": [type(d).__name__ for d in getattr(self, "detectors", [])],
                "world_size": getattr(self, "_world", 1)}

    @property
    def steps(self) -> int:
        """Number of ``step()`` calls so far (skipped ones included)."""
        return self._step

    @property
    def skipped_steps(self) -> int:
        self.flush()
        return self._skipped

    @property
    def events(self) -> list[Event]:
        """Every event so far (flushes pending rows first)."""
        self.flush()
        return self._events

    # ------------------------------------------------------------------ step
    def _gather(self):
        grads = list(map(_grad, self.params))
        if _NoneType in map(type, grads):  # some parameters have no gradient this step
            names, params, kept, missing = [], [], [], []
            for n, p, g in zip(self.names, self.params, grads):
                if g is None:
                    missing.append(n)
                else:
                    names.append(n)
                    params.append(p)
                    kept.append(g)
            if not kept:
                raise RuntimeError("guard.step(): no watched parameter has a gradient; "
                                   "call loss.backward() before guard.step()")
            names, params, grads = names, params, kept
        else:
            names, params, missing = self.names, self.params, []
        if _same_grads(self._last_grads, grads):
            raise RuntimeError("guard.step() called twice on the same gradients: run a new "
                               "backward (and zero the gradients) between steps")
        return names, params, grads, missing

    def _scaler_active(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def step(self, loss: Tensor | float | None = None, batch=None, closure=None) -> StepReport:
        """Statistics, clipping, and the optimizer step unless the step is poisoned.

        Args:
            loss: this step's loss (tensor or float).  A NaN/Inf loss counts as
                a poisoned step even when the gradients are finite.
            batch: this step's batch, kept (by reference) for a flight record.
            closure: passed to ``optimizer.step(closure)`` (LBFGS and other
                optimizers that re-evaluate the loss).  The statistics and the
                clipping apply to the gradients of the backward you ran before.
        Returns:
            StepReport for this step.
        """
        scaler_on = self._scaler_active()
        if scaler_on:
            from torch.amp.grad_scaler import OptState

            state = self.scaler._per_optimizer_states[id(self.optimizer)]
            if state["stage"] is OptState.READY:
                self.scaler.unscale_(self.optimizer)
        names, params, grads, missing = self._gather()
        if self.remedies:
            self.remedies.on_step(self._step, batch)
        kd = self._kernel_dtypes
        if (kd is not None and not missing and _kernel.available() and tuple(map(_dtype, grads)) == kd
                and all_dense(grads)):
            # compute_stats' checks, minus what torch already enforces for a parameter's
            # gradient (its device and size); dtype and layout are checked just above.
            stats = kernel_stats(names, grads, missing, kd, self._kernel_out)
        else:
            stats = compute_stats(names, grads, missing)
        if (self._host_decisions and stats.host is not None and not scaler_on and self._world == 1
                and self.on_nonfinite != "raise" and self._buffer.host_view is not None):
            return self._step_host(stats, loss, params, grads, closure)
        dev = stats.device

        bad = stats.bad
        loss_t = loss_bad = None
        if loss is not None:
            if not isinstance(loss, (Tensor, int, float)) or isinstance(loss, bool):
                raise TypeError(f"loss must be a Tensor or a number, got {type(loss).__name__}")
            loss_t = (loss.detach() if isinstance(loss, Tensor) else torch.tensor(float(loss)))
            loss_t = loss_t.to(dev, torch.float32, non_blocking=True)
            if loss_t.numel() != 1:
                raise ValueError(f"loss must be a scalar, got shape {tuple(loss_t.shape)}")
            loss_t = loss_t.reshape(())
            loss_bad = ~torch.isfinite(loss_t)
            bad = bad | loss_bad
        if self._world > 1:
            bad = self._agree(bad)
        held = self.hold_steps > 0  # a remedy (rollback) withholds the next batches
        # Policies see the guard's verdict: a step that will not be applied (NaN
        # loss, another rank's NaN, held) never enters their statistics.
        stats = stats.with_veto(bad | held if held else bad)
        user_params, user_grads = params, grads  # the user's tensors, not local shard views
        if self._sharded:  # clipping works on local shards (DTensor gradients under FSDP2 / TP)
            params, grads = local_grads(params), local_grads(grads)

        # Clipping: fold into the fused optimizer's grad_scale when possible.
        grad_scale = None
        if self.clip is None:
            coef = torch.ones((), device=dev)
        else:
            if self.fused:
                grad_scale = self.clip.fused_scale(params, grads, stats)
            if grad_scale is not None:
                coef = 1.0 / grad_scale
            else:
                coefs = self.clip.clip_(params, grads, stats)
                coef = coefs.min().float() if coefs.numel() else torch.ones((), device=dev)

        if self.on_nonfinite == "raise" and bool(bad):  # host sync: "raise" needs to know now
            # The step is withheld and recorded like a skip (row, count, event, store), then raised.
            step = self._step
            self._record(stats, bad, torch.ones((), dtype=torch.bool, device=dev), loss_t, coef)
            self._last_grads = _grad_signature(user_grads)
            self._step += 1
            self._process(*self._buffer.drain())
            ev = next(e for e in reversed(self._events) if e.step == step and e.kind in ("nonfinite", "amp_overflow"))
            if self.remedies:
                self.remedies.on_raise(self, ev)
            raise NonFiniteGradientError(f"step {ev.step}: {ev.message}", ev.step, ev.layers, ev)

        skip = self.on_nonfinite == "skip"
        skipped = bad if skip else torch.zeros((), dtype=torch.bool, device=dev)
        if held:
            self.hold_steps -= 1
            skipped, skip = torch.ones((), dtype=torch.bool, device=dev), True
        # The row is recorded before the optimizer step so that, when this step
        # ends a flush interval (every step on CPU), the one copy to the host
        # also carries the skip decision: no second read for non-fused optimizers.
        self._record(stats, bad, skipped, loss_t, coef, loss_bad)
        drained, host_row = None, None
        if self._host_decisions and not scaler_on:
            # CPU: the rows are host memory, so this step's verdict and clip
            # coefficient are read from its row (one read, no device), and
            # the optimizer runs plainly when there is nothing to skip or scale.
            pending = self._buffer.pending()  # host sync: the one read per step on CPU
            host_row = pending[-1]
            # A poisoned step is flushed at once: its event, flight record and
            # remedies are not deferred to the end of the interval.
            if len(pending) >= self.flush_every or host_row[0] > 0:
                drained = self._buffer.drain(pending)
                host_row = drained[1][-1]
        elif len(self._buffer) >= self.flush_every:
            drained = self._buffer.drain()
            host_row = drained[1][-1]
        self._optimizer_step(skipped, grad_scale, scaler_on, skip, host_row, user_params, closure)

        self._last_grads = _grad_signature(user_grads)
        report = StepReport(self._step, stats, stats.global_norm, coef, skipped, loss_t)
        self.last_report = report
        self._step += 1
        if drained is not None:
            self._process(*drained)
        return report

    def _step_host(self, stats: GradStats, loss, params, grads, closure) -> StepReport:
        """``step`` on CPU with the kernel's host statistics: the same decisions and the same
        row as the tensor path (``test_cpu_host_decisions_equal_the_device_path``), taken with
        numpy scalars instead of a few dozen small torch ops (each costs ~10-20 us once the
        optimizer has swept the caches).  One read: the loss value."""
        k = len(self._buffer)
        row = self._buffer.host_view[k]  # this step's slot (host memory, written in place)
        if loss is None:
            row[2] = math.nan
        elif isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
            row[2] = loss.item()  # host sync: the one read per step on CPU (free: host memory)
        elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
            row[2] = float(loss)
        else:
            raise TypeError(f"loss must be a Tensor or a number, got {type(loss).__name__}")
        # (stored as float32, the rounding of the tensor path's loss.to(float32))
        sumsq, maxabs, total, grads_bad = stats.host
        loss_bad = loss is not None and not math.isfinite(row[2])
        bad = bool(grads_bad) or loss_bad  # a numpy bool
        held = self.hold_steps > 0
        veto = bad or held
        stats.set_host_veto(veto)  # a tensor only if a policy or the caller asks for it

        grad_scale, coef_host = None, None
        clip = self.clip
        if clip is None:
            coef_host = np.float32(1)
        else:
            c = clip.host_coefficient(stats)
            if c is not None and c == 1:  # the common case: nothing to scale
                coef_host = np.float32(1)
            else:
                coef_host, grad_scale = self._clip_host(c, clip, params, grads, stats, k)
        if coef_host is not None:
            row[5] = coef_host
        skipped = (bad and self.on_nonfinite == "skip") or held
        if held:
            self.hold_steps -= 1
        n = len(self.names)
        # float64 -> float32 can overflow to Inf only when the float32 global norm did
        with np.errstate(over="ignore", invalid="ignore") if grads_bad else _NO_CONTEXT:
            row[0], row[1], row[3], row[4] = bad, skipped, loss_bad, total
            lr = self.optimizer.param_groups[0].get("lr", math.nan)
            if isinstance(lr, Tensor):
                self._buffer.cell(k, 6).copy_(lr.detach().reshape(()))
            else:
                row[6] = lr
            row[7] = self._host_param_norm()
            if len(stats.names) == n:
                np.sqrt(sumsq, out=row[_G:_G + n], casting="unsafe")
                row[_G + n:] = maxabs
            else:  # layers without a gradient this step: NaN norm, 0 max|g|
                idx = [self._index[name] for name in stats.names]
                row[_G:_G + n] = math.nan
                row[_G + n:] = 0
                row[[_G + i for i in idx]] = np.sqrt(sumsq)
                row[[_G + n + i for i in idx]] = maxabs
        self._buffer.commit(self._step)
        drained = None
        if len(self._buffer) >= self.flush_every or bad:  # a poisoned step is flushed at once
            drained = self._buffer.drain(self._buffer.host_view[:len(self._buffer)])  # read above

        if not skipped:
            if grad_scale is not None:
                _step_with(self.optimizer, closure, grad_scale=grad_scale)
            else:
                self.optimizer.step() if closure is None else self.optimizer.step(closure)

        self._last_grads = _grad_signature(grads)
        report = _HostStepReport(self._step, stats, row[5], skipped, None if loss is None else row[2])
        self.last_report = report
        self._step += 1
        if drained is not None:
            self._process(*drained)
        return report

    def _clip_host(self, c, clip, params, grads, stats, k) -> tuple:
        """The CPU path's clipping when it may scale: (host coefficient or None, grad_scale or None).

        ``c``: the policy's host coefficient, None when it has none (the policy then runs
        its tensor code and its coefficient goes into the row as a tensor write)."""
        with np.errstate(all="ignore"):
            if c is not None and self.fused:
                gs = np.float32(1) / c.astype(np.float32)  # what fused_scale() returns
                # grad_scale costs fused AdamW a division and write-back per element
                return np.float32(1) / gs, (torch.from_numpy(np.asarray(gs)) if gs != 1 else None)
            if c is not None:
                if c != 1:  # x * 1 == x: a coefficient of 1 needs no pass over the gradients
                    clip.scale_(grads, torch.from_numpy(c))
                return c.astype(np.float32), None
            if self.fused and (gs_t := clip.fused_scale(params, grads, stats)) is not None:
                self._buffer.cell(k, 5).copy_(1.0 / gs_t)
                return None, gs_t
            coefs = clip.clip_(params, grads, stats)
            self._buffer.cell(k, 5).copy_(coefs.min() if coefs.numel() else torch.ones(()))
            return None, None

    def _host_param_norm(self) -> float:
        """The ``param_norm`` column on the CPU path (NaN between measurements)."""
        if not self.param_norm_every or self._step % self.param_norm_every:
            return math.nan
        s = compute_stats(self.names, [p.detach() for p in self.params])
        return s.host[2] if s.host is not None else float(s.global_norm)  # host sync: CPU only

    def _agree(self, bad: Tensor) -> Tensor:
        """Every rank skips if any rank must (a NaN loss is per rank): one tiny all-reduce."""
        import torch.distributed as dist

        flag = bad.to(self._comm_device, torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group)
        return (flag[0] > 0).to(bad.device, non_blocking=True)

    def _optimizer_step(self, skipped: Tensor, grad_scale: Tensor | None, scaler_on: bool,
                        skip: bool, host_row, params: list[Tensor], closure=None) -> None:
        """Step, or withhold the step.  ``host_row``: this step's row when already on the host."""
        opt = self.optimizer
        host_skipped = bool(host_row[1] > 0) if host_row is not None else None
        if self._host_decisions and host_row is not None and not scaler_on:
            if skip and host_skipped:
                return
            # A fused optimizer's grad_scale / found_inf cost a division and a
            # write-back per element: pass the scale only when it clips.
            if self.fused and grad_scale is not None and host_row[5] != 1.0:
                _step_with(opt, closure, grad_scale=grad_scale)
                return
            opt.step() if closure is None else opt.step(closure)
            return
        # A fused optimizer skipped through found_inf before its state exists
        # is left broken (torch's fused SGD keeps an uninitialised momentum
        # buffer), so until the state is there the skip is decided on the host.
        host_skip = skip and self.fused and not self._fused_state_ready(params)
        if scaler_on:
            # GradScaler sums its found_inf tensors to decide; ours joins them.
            found = self.scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
            if skip and found:
                t = next(iter(found.values()))
                t.add_(skipped.to(t.device, t.dtype, non_blocking=True))
                if host_skip and sum(float(v) for v in found.values()) > 0:  # host sync: first steps only
                    return  # scaler.update() still backs off: it reads the same found_inf
            if grad_scale is not None:
                opt.grad_scale = grad_scale  # kept by GradScaler when grads are already unscaled
            self.scaler.step(opt) if closure is None else self.scaler.step(opt, closure)
            return
        if host_skip and (host_skipped if host_skipped is not None
                          else bool(skipped)):  # host sync: fused optimizer's first steps only
            return
        if self.fused:
            _step_with(opt, closure, grad_scale=grad_scale, found_inf=skipped.float())
            return
        if skip and (host_skipped if host_skipped is not None
                     else bool(skipped)):  # host sync: one read per step for non-fused optimizers
            return
        opt.step() if closure is None else opt.step(closure)

    def _fused_state_ready(self, params: list[Tensor]) -> bool:
        """Whether every parameter stepped now already has optimizer state.

        Cached on (state size, which parameters have gradients): a parameter
        whose first gradient arrives late must be checked again.
        """
        state = self.optimizer.state
        key = (len(state), tuple(map(id, params)))
        if key != self._state_key:
            self._state_key = key
            self._state_ready = all(len(state.get(p, ())) > 0 for p in params)
        return self._state_ready

    # ------------------------------------------------------------- recording
    def _record(self, stats: GradStats, bad: Tensor, skipped: Tensor, loss_t, coef: Tensor,
                loss_bad: Tensor | None = None) -> None:
        """Write this step's row into the device buffer (a handful of ops, no read)."""
        dev = stats.device
        nan = self._nan if self._nan.device == dev else torch.full((), math.nan, device=dev)
        if loss_t is None:
            loss_t, loss_bad = nan, nan.new_zeros(())
        elif loss_bad is None:
            loss_bad = ~torch.isfinite(loss_t)
        lr = self.optimizer.param_groups[0].get("lr", math.nan)
        if isinstance(lr, Tensor):
            lr_t = lr.detach().float().to(dev).reshape(())
        else:
            if lr != self._lr_cache[0] or self._lr_cache[1].device != dev:  # a new lr (or NaN)
                self._lr_cache = (lr, torch.full((), float(lr), device=dev))
            lr_t = self._lr_cache[1]
        row = self._buffer.next_row()
        f32 = torch.float32
        torch.stack([bad.to(f32), skipped.to(f32), loss_t, loss_bad.to(f32), stats.global_norm.to(f32),
                     coef.to(f32).reshape(()), lr_t, self._param_norm(dev, nan)], out=row[:_G])
        if len(stats.names) == len(self.names):
            torch.cat([stats.norms.to(f32), stats.max_abs.to(f32)], out=row[_G:])
        else:
            # Layers without a gradient this step are recorded as NaN norm, 0 max|g|.
            n = len(self.names)
            row[_G:_G + n].fill_(math.nan)
            row[_G + n:].zero_()
            idx = torch.as_tensor([self._index[name] for name in stats.names], device=dev)
            row[_G:_G + n].index_copy_(0, idx, stats.norms.to(f32))
            row[_G + n:].index_copy_(0, idx, stats.max_abs.to(f32))
        self._buffer.commit(self._step)

    def _param_norm(self, dev, nan: Tensor) -> Tensor:
        # Every K steps only: reading every parameter each step would double the memory traffic.
        if not self.param_norm_every or self._step % self.param_norm_every:
            return nan
        # compute_stats: one pass, float64 sums, and full-tensor numbers for DTensor shards.
        return compute_stats(self.names, [p.detach() for p in self.params]).global_norm.float().to(dev)

    def flush(self) -> None:
        """Read pending rows back (one copy), build events, hand rows to the store."""
        self._process(*self._buffer.drain())

    def _process(self, steps: list[int], rows: np.ndarray) -> None:
        """Host side of a flush: events, detectors, remedies, the store."""
        if not steps:
            return
        scaler_on = self._scaler_active()
        new_events: list[Event] = []
        for step, row in zip(steps, rows):
            self._skipped += int(row[1] > 0)  # poisoned steps and steps held by a remedy
            if row[0] > 0:
                self._nonfinite += 1
                ev = nonfinite_event(step, self.run, row, amp=scaler_on)
                new_events.append(ev)
                if self.on_nonfinite == "warn":
                    warnings.warn(f"gradguard: {ev}", RuntimeWarning, stacklevel=2)
        for det in self.detectors:
            new_events += det.update(steps, rows, self.run)
        new_events.sort(key=lambda e: e.step)
        alarm = self.remedies.after_flush(self, steps, rows, new_events) if self.remedies else None
        self._events += new_events
        if self.recorder is not None:
            self.recorder.write_steps(steps, rows, GLOBAL_COLS)
            self.recorder.write_events(new_events)
        if alarm is not None:  # the "raise" remedy, once the events are recorded
            raise alarm

    def close(self) -> None:
        """Flush pending rows and close the run store (even if the last flush raises)."""
        try:
            self.flush()
        finally:
            if self.recorder is not None:
                self.recorder.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything to resume this guard: counters, policy, detectors, remedies, events.

        Rows still waiting for their flush are saved as they are (not flushed):
        a resumed run flushes at the same steps as an uninterrupted one, so
        remedies that act at a flush act at the same step too.
        """
        steps = list(self._buffer._steps)
        # float32 -> Python float is exact; NaN saved as None (state dicts compare with ==)
        rows = _to_list(self._buffer.pending())  # host sync: checkpoint time only
        return {
            "version": STATE_VERSION,
            "names": list(self.names),
            "step": self._step,
            "skipped": self._skipped,
            "nonfinite": self._nonfinite,
            "clip": self.clip.state_dict() if self.clip is not None else None,
            "clip_config": self.clip.config() if self.clip is not None else None,
            "run": self.recorder.run_name if self.recorder is not None and self.recorder.path else None,
            "events": [e.to_dict() for e in self._events],
            "detectors": [d.state_dict() for d in self.detectors],
            "remedies": self.remedies.state_dict(),
            "hold_steps": self.hold_steps,
            "pending": {"steps": steps, "rows": rows},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "version" not in state_dict:
            raise TypeError("state_dict must be a dict made by Guard.state_dict()")
        if state_dict["version"] > STATE_VERSION:
            raise ValueError(f"state_dict has version {state_dict['version']}; this gradguard reads "
                             f"up to {STATE_VERSION}: upgrade gradguard")
        if list(state_dict["names"]) != self.names:
            theirs = set(state_dict["names"])
            diff = sorted(theirs.symmetric_difference(self.names))[:3]
            raise ValueError(f"state_dict was saved for another model (parameter names differ, "
                             f"e.g. {diff})")
        saved = state_dict.get("clip_config", state_dict.get("clip") and {"policy": "?"})
        mine = self.clip.config() if self.clip is not None else None
        if "clip_config" in state_dict and (saved or {}).get("policy") != (mine or {}).get("policy"):
            def name(c):
                return "None" if c is None else c.get("policy", "?")
            raise ValueError(f"state_dict was saved with clip={name(saved)}, this guard has "
                             f"clip={name(mine)}: its learned state would be lost or misread")
        dets = state_dict.get("detectors", [])
        if len(dets) != len(self.detectors):
            raise ValueError(f"state_dict has {len(dets)} detector states, the guard has "
                             f"{len(self.detectors)} detectors")
        # Load into copies first: a state that fails half-way must leave this guard untouched.
        clip = copy.deepcopy(self.clip)
        if clip is not None and state_dict.get("clip") is not None:
            clip.load_state_dict(state_dict["clip"])
        keep = {id(p): p for p in self.params}  # never copy the model's tensors
        for d, sd in zip(copy.deepcopy(self.detectors, keep), dets):
            d.load_state_dict(sd)
        events = [Event.from_dict(e) for e in state_dict["events"]]
        pending = state_dict.get("pending") or {"steps": [], "rows": []}
        rows = _from_list(pending["rows"]).astype(np.float32).reshape(len(pending["rows"]), -1) \
            if pending["rows"] else np.zeros((0, self._buffer.width), np.float32)
        if len(rows) != len(pending["steps"]) or (len(rows) and rows.shape[1] != self._buffer.width):
            raise ValueError("state_dict['pending'] does not hold rows of this guard's layout")
        self.flush()
        self._step = int(state_dict["step"])
        self._skipped = int(state_dict["skipped"])
        self._nonfinite = int(state_dict["nonfinite"])
        if self.clip is not None and state_dict.get("clip") is not None:
            self.clip.load_state_dict(state_dict["clip"])
        for d, sd in zip(self.detectors, dets):
            d.load_state_dict(sd)
        self._events = events
        if "remedies" in state_dict:
            self.remedies.load_state_dict(state_dict["remedies"])
        self.hold_steps = int(state_dict.get("hold_steps", 0))
        self._last_grads = None
        if self.recorder is not None and state_dict.get("run"):
            # Continue the checkpointed run in the store (dropping what it logged after the
            # checkpoint) rather than starting a second, overlapping one.
            first = int(pending["steps"][0]) if pending["steps"] else self._step
            self.recorder.resume(state_dict["run"], first)
        for step, row in zip(pending["steps"], rows):  # back in the buffer, flushed when due
            if self._buffer.full:
                self.flush()
            self._buffer.push(int(step), torch.from_numpy(row).to(self.device))
