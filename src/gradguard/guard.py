"""The Guard: the orchestrator of gradguard's flow, one step lane for every device.

``guard.step()`` replaces ``optimizer.step()`` the way ``GradScaler.step`` does.
Each step runs the same sequence, whatever the device:

    gather gradients -> statistics (``stats.py``) -> decide (``decide.py``) ->
    apply: clip, step or withhold (``apply.py``) -> write the row (``buffer.py``)
    -> flush when due: detectors, events, remedies, the store

The arrays the decision runs on are chosen once from the parameters' device
(``backend.py``): host numpy on CPU, device tensors on accelerators, where
nothing is read back until the flush (one copy per ``flush_every`` steps).
How the optimizer is stepped (plain, fused ``grad_scale``/``found_inf``,
GradScaler) is chosen once too.  Parameters and every optimizer-state tensor
stay bitwise unchanged on a withheld step.
"""
from __future__ import annotations

import math
import operator
import threading
import warnings
import weakref

import numpy as np
import torch
from torch import Tensor

from .apply import AfterApplied, NoStep, is_fused, stepper_for
from .backend import DEVICE, HOST
from .buffer import RowWriter, StepBuffer
from .clip import ClipPolicy, refuse_unitwise_on_shards
from .decide import ON_NONFINITE, StepReport, decide, loss_value
from .detect import DeadRunBudget, NonfiniteRepeats, _to_list, default_detectors
from .events import Event, NonFiniteGradientError, add_events, event_order
from .checkpoint import STATE_VERSION, check_state
from .gather import gather, grad_signature, same_grads
from .hooks import OptimizerHooks, check_watched, group_sizes
from ._validate import check_choice, check_int
from .layout import COL, GLOBAL_COLS, RunInfo, watched_buffers
from .lr_groups import GroupLRs
from .nan_origin import OriginOnPoison
from .remedies import Autopilot, RemedyContext, Remedies
from .shards import agree_any, world_of
from .stats import Statistics, compute_stats, local_grads, named_parameters, param_stats

__all__ = ["Guard", "StepReport"]

BACKENDS = ("auto", "host", "device")


# CPU default flush interval: detectors and the store take rows in batches of
# 16 (a poisoned step is flushed at once); the skip decision is still per step.
CPU_FLUSH_EVERY = 16


_dtype = operator.attrgetter("dtype")


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
        nonfinite_budget: consecutive poisoned steps under ``"skip"``/``"warn"`` before
            ``RunIsDeadError`` says the run is dead and why (checked at flushes; None: never).
        log_dir: where the run store is written (None: nothing is written).
            Under torch.distributed only rank ``log_rank`` writes (``"all"``:
            every rank, as runs named ``NAME-rankR``).
        sinks: extra sinks fed the same rows and events, e.g.
            ``[gradguard.sinks.TensorBoardSink("runs/tb")]``; work without ``log_dir``.
        scaler: a ``torch.amp.GradScaler``; the guard unscales, clips on the
            unscaled gradients and calls ``scaler.step(optimizer)``.  You still
            call ``scaler.update()``.
        flush_every: steps between two flushes of the rows to the detectors,
            remedies and the store (default 16 on CPU, 4 with the autopilot, 32 on accelerators, where
            a flush is the interval's one host sync).  A step with NaN/Inf is
            flushed at once on CPU.
        run_name: name of the run in the store.
        detectors: objects with ``bind(run)``, ``update(steps, rows, run) ->
            list[Event]``, ``state_dict()`` / ``load_state_dict()`` (``run``: a
            ``gradguard.layout.RunInfo``; rows: ``gradguard.layout``).  None
            (default): ``detect.default_detectors()``; ``[]``: none.
        remedies: what to do per event kind or severity, e.g.
            ``{"exploding": "lr_backoff", "spike": gg.Rollback(every=50),
            "critical": gg.FlightRecorder("dumps/")}`` (see ``gradguard.remedies``);
            ``"auto"`` (or ``gg.Autopilot(...)``): the built-in skip/rollback/back-off policy.
        param_norm_every: steps between measurements of the total parameter
            norm and of each tensor's (the ``param_norm`` column and the rows'
            per-tensor parameter norms, read by weight_growth); 0: never, nor the
            BatchNorm running variances (``RunInfo.buffers``, read every step otherwise).
        backend: ``"auto"``: decide on host numbers for CPU parameters, on
            device tensors elsewhere; ``"device"``: the accelerator lane on CPU too.
        scheduler: an LR scheduler the guard steps after each *applied* update
            only (a skipped step does not advance it); ``ema``: an
            ``AveragedModel`` (EMA/SWA) updated after applied updates only.  On an
            accelerator either costs one read of the skip flag per step.

    Example:
        >>> guard = gg.Guard(model, optimizer, clip=gg.GlobalNorm(1.0))
        >>> loss.backward(); report = guard.step(loss=loss)
    """

    def __init__(self, model, optimizer, clip: ClipPolicy | None = None, on_nonfinite: str = "skip",
                 log_dir=None, *, scaler=None, flush_every: int | None = None,
                 run_name: str | None = None, detectors: list | None = None,
                 remedies: dict | str | None = None, param_norm_every: int = 10,
                 process_group=None, log_rank: int | str = 0, sinks: list | None = None,
                 backend: str = "auto", scheduler=None, ema=None,
                 nonfinite_budget: int | None = 100):
        pairs = named_parameters(model)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if clip is not None and not isinstance(clip, ClipPolicy):
            raise TypeError(f"clip must be a gradguard ClipPolicy (e.g. gg.GlobalNorm(1.0)) or None, "
                            f"got {type(clip).__name__}")
        check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
        if flush_every is not None:
            check_int("flush_every", flush_every, 1)
        if scaler is not None and not hasattr(scaler, "unscale_"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.param_norm_every = check_int("param_norm_every", param_norm_every, 0)
        # for advice and rollback; a torch.compile'd model's own module (its names have no _orig_mod.)
        self.model = getattr(model, "_orig_mod", model) if isinstance(model, torch.nn.Module) else None
        self.names, self.params = [n for n, _ in pairs], [p for _, p in pairs]
        # What detectors and remedies see of the run (and the BatchNorm running variances); the
        # per-tensor norms are WeightGrowthDetector's reference (full norms, DTensor shards too).
        init_norms = compute_stats(self.names, [p.detach() for p in self.params]).norms
        bufs = watched_buffers(self.model, self.params[0].device) if self.param_norm_every else []
        self._bnames, self._buffers = [n for n, _ in bufs], [b for _, b in bufs]
        self.run = RunInfo.describe(self.names, self.params, self.model, param_norm_every,
                                    init_norms.double().cpu().numpy(), self._bnames)  # host sync: construction only
        self._sharded = local_grads(self.params) is not self.params  # any DTensor parameter
        self.optimizer, self.clip = optimizer, clip
        check_watched(optimizer, self.params, "holds")
        self._groups_seen = group_sizes(optimizer)
        self._group_lrs = GroupLRs(optimizer)  # groups 1..: extra store columns lr_group1...
        self._after = AfterApplied(scheduler, ema, model)  # follows applied updates only
        self.scheduler, self.ema = scheduler, ema
        self._busy = threading.Lock()  # one step at a time (steps from two threads are refused)
        self.failures = {"detectors": 0, "observers": 0}
        if clip is not None:
            clip.bind(self.names)
            refuse_unitwise_on_shards(clip, self.params)
        self.on_nonfinite, self.scaler = on_nonfinite, scaler
        self.fused = is_fused(optimizer)
        devices = {p.device for p in self.params}
        self.device = self.params[0].device
        on_cpu = devices == {torch.device("cpu")}
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        # The arrays the step decision runs on, chosen once: host numpy where the
        # statistics are host memory already (CPU), device tensors elsewhere, where
        # nothing is read back until the flush.  "device" on CPU runs the
        # accelerator lane (for tests and benchmarks of that lane).
        self._xp = HOST if (backend == "host" or (backend == "auto" and on_cpu)) else DEVICE
        if self._xp is HOST and not on_cpu:
            raise ValueError("backend='host' needs every parameter on the CPU")
        # the autopilot rolls back to a snapshot taken at a flush: shorter CPU intervals lose fewer updates
        auto = isinstance(remedies, Autopilot) or (isinstance(remedies, str) and remedies == "auto")
        self.flush_every = flush_every or ((Autopilot.CPU_FLUSH_EVERY if auto else CPU_FLUSH_EVERY) if on_cpu else 32)
        # How the optimizer is stepped, chosen once (apply.py); check() never steps.
        self._stepper = stepper_for(optimizer, scaler if self._scaler_active() else None)
        self._no_step = NoStep(optimizer)
        self._statistics = Statistics(self.params, self._xp)  # how, chosen once
        self._bstats = Statistics(self._buffers, self._xp) if self._buffers else None  # one kernel
        lay = self.run.layout
        self._buffer = StepBuffer(lay.width, self.flush_every, self.device, nan_from=lay.param_norms_slice.start)
        self._writer = RowWriter(self._buffer, self.names, self._xp)
        self._step = 0
        self._skipped = 0
        self._nonfinite = 0
        self._events: list[Event] = []
        self._last_grads: list | None = None
        self._observers: list = []
        self._repeats = NonfiniteRepeats()
        self._budget = DeadRunBudget(nonfinite_budget)  # a dead run raises, it is not skipped forever
        self._origin = OriginOnPoison(self.model)  # the NaN's producer, on poisoned steps only
        self._hooks = OptimizerHooks(self)  # warns when the optimizer is also stepped directly
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
        me = weakref.ref(self)  # the context must not keep the guard alive (no reference cycle)
        self._remedy_ctx = RemedyContext(optimizer, self.params, self.run, lambda: me()._step,
                                         model=self.model, log_dir=log_dir)
        self.remedies = Remedies(remedies, self._remedy_ctx, log_dir)
        self.last_report: StepReport | None = None
        # Distributed: decisions agree across ranks; one rank writes the store.
        self.process_group = process_group
        self._world, self.rank, self._comm_device = world_of(process_group, self.device)
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
                                              config=self.config(), sinks=sinks, buffers=list(self.run.buffers))
                # collected without close(), or the interpreter exits: the rows still in the
                # buffer are handed over and the run says how it ended (the lambda holds no guard)
                buf, glr = self._buffer, self._group_lrs
                self.recorder.attach(self, pending=lambda: (list(buf._steps), *glr.splice(
                    list(buf._steps), buf.pending(), GLOBAL_COLS)))
            except (ValueError, TypeError):  # a bad argument (run_name, log_dir...) is the caller's
                raise
            except Exception as exc:  # a log sink never stops training (OSError, sqlite3.Error...)
                warnings.warn(f"gradguard: cannot write the run store in log_dir {log_dir} ({exc}); "
                              "training continues without it", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ info
    def _layer_info(self) -> list[dict]:
        return [{"name": n, "shape": list(p.shape), "order": i}
                for i, (n, p) in enumerate(zip(self.names, self.params))]

    def config(self) -> dict:
        return {"clip": self.clip.config() if self.clip is not None else None,
                "on_nonfinite": self.on_nonfinite, "nonfinite_budget": self._budget.budget, "optimizer": type(self.optimizer).__name__,
                "fused": self.fused, "flush_every": self.flush_every, "amp": self.scaler is not None,
                "detectors": [type(d).__name__ for d in getattr(self, "detectors", [])],
                "world_size": getattr(self, "_world", 1)}

    @property
    def steps(self) -> int:
        """Number of ``step()`` calls so far (skipped ones included)."""
        return self._step

    @property
    def hold_steps(self) -> int:
        """Next steps whose optimizer step is withheld (set by a remedy such as Rollback)."""
        return self._remedy_ctx.held

    @hold_steps.setter
    def hold_steps(self, n: int) -> None:
        self._remedy_ctx.held = n

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
        names, params, grads, missing = gather(self.names, self.params)
        if same_grads(self._last_grads, grads):
            raise RuntimeError("guard.step() called twice on the same gradients: run a new "
                               "backward (and zero the gradients) between steps")
        return names, params, grads, missing

    def _scaler_active(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def step(self, loss: Tensor | float | None = None, batch=None, closure=None, rerun=None) -> StepReport:
        """Statistics, clipping, and the optimizer step unless the step is poisoned.

        Args:
            loss: this step's loss (tensor or float).  A NaN/Inf loss counts as
                a poisoned step even when the gradients are finite.
            batch: this step's batch, kept (by reference) for a flight record.
            closure: passed to ``optimizer.step(closure)`` (LBFGS and other
                optimizers that re-evaluate the loss).  The statistics and the
                clipping apply to the gradients of the backward you ran before.
            rerun: a callable returning this step's loss again (``lambda: loss_fn(model(x), y)``),
                called only on a poisoned step, with hooks naming the module that made the NaN
                (``event.data["origin"]``); on an accelerator, one read of the poison flag per step.
        Returns:
            StepReport for this step.
        """
        return self._run(loss, batch, closure, self._stepper, rerun)

    def check(self, loss: Tensor | float | None = None, batch=None, rerun=None) -> StepReport:
        """Everything ``step()`` does except stepping the optimizer.

        For loops that step the optimizer themselves (framework adapters): the
        gradients are clipped in place, the step is recorded, and
        ``report.skipped`` says whether to withhold the coming optimizer step.
        """
        return self._run(loss, batch, None, self._no_step, rerun)

    def _run(self, loss, batch, closure, stepper, rerun=None) -> StepReport:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("guard.step() is already running in another thread: a Guard is stepped "
                               "from one thread (its step counter and buffer are not shared)")
        try:
            return self._run_locked(loss, batch, closure, stepper, rerun)
        finally:
            self._busy.release()

    def _run_locked(self, loss, batch, closure, stepper, rerun) -> StepReport:
        if group_sizes(self.optimizer) != self._groups_seen:  # add_param_group() after Guard()
            check_watched(self.optimizer, self.params, "gained (by add_param_group)")
            self._groups_seen = group_sizes(self.optimizer)
        if self._scaler_active():
            from torch.amp.grad_scaler import OptState

            state = self.scaler._per_optimizer_states[id(self.optimizer)]
            if state["stage"] is OptState.READY:
                self.scaler.unscale_(self.optimizer)
        names, params, grads, missing = self._gather()
        if self.remedies:
            self.remedies.on_step(self._step, batch)
        xp = self._xp
        stats = self._statistics(names, grads, missing)
        loss_v, loss_bad = loss_value(loss, xp, stats.total)
        held = self._remedy_ctx.take_hold()  # a remedy (rollback) withholds the next batches
        local_params, local_grads_ = ((local_grads(params), local_grads(grads)) if self._sharded
                                      else (params, grads))  # clipping works on local shards (FSDP2 / TP)
        agree = ((lambda bad: agree_any(bad, xp, self._comm_device, self.device, self.process_group))
                 if self._world > 1 else None)
        d, vstats = decide(stats, loss_bad, held=held, skip_nonfinite=self.on_nonfinite == "skip",
                           clip=self.clip, grads=local_grads_, agree=agree,
                           scaler=self._scaler_active())
        # measured before the update, like every other column of the row
        pnorm = self._param_norm()
        if rerun is not None:  # before the step is applied: the re-run sees this step's weights
            self._origin.see(self._step, d.bad, rerun)
        if self.on_nonfinite == "raise" and bool(d.bad):  # host sync: "raise" needs to know now
            return self._raise(stats, d, loss_v, pnorm, grads)
        lr = self.optimizer.param_groups[0].get("lr", math.nan)  # the step's lr, before the scheduler moves it
        if isinstance(lr, Tensor) and self.scheduler is not None:
            lr = lr.clone()  # schedulers update a tensor lr in place
        self._group_lrs.read(self._step)
        self._hooks.stepping = True  # the optimizer's post-step hook must not call this "direct"
        try:
            coef = stepper.apply(d, self.clip, local_params, local_grads_, vstats, closure)
        finally:
            self._hooks.stepping = False
        self._hooks.expect_external = stepper is self._no_step  # check(): the caller steps next
        skipped = d.skip
        if stepper is self._stepper:
            self._after.run(d)
        self._writer.write(self._step, stats, d, coef, skipped, loss_v, lr, pnorm)
        self._last_grads = grad_signature(grads)
        report = StepReport(self._step, stats, coef, skipped, loss_v, xp)
        self.last_report = report
        self._step += 1
        # A poisoned step is flushed at once where that is free (host decisions): its
        # event, flight record and remedies are not deferred to the end of the interval.
        if len(self._buffer) >= self.flush_every or (xp.on_host and d.bad):
            self.flush()
        return report

    def _param_norm(self):
        """Parameter norms every ``param_norm_every`` steps (every step would double the memory
        traffic), the watched buffers' every step; None: neither."""
        every = self.param_norm_every
        p = param_stats(self.params, self._xp) if every and not self._step % every else None
        b = self._bstats(self._bnames, self._buffers, []) if self._bstats is not None else None
        return None if p is None and b is None else (p, b)

    def _raise(self, stats, d, loss_v, pnorm, grads):
        """``on_nonfinite="raise"``: the step is withheld and recorded like a skip (row,
        count, event, store), then NonFiniteGradientError is raised."""
        xp = self._xp
        step = self._step
        one = xp.flag(True, d.bad)
        self._group_lrs.read(step)
        self._writer.write(step, stats, d, xp.scalar(1.0, stats.total), one, loss_v,
                           self.optimizer.param_groups[0].get("lr", math.nan), pnorm)
        self._last_grads = grad_signature(grads)
        self._step += 1
        self.flush()
        ev = next(e for e in reversed(self._events) if e.step == step and e.kind in ("nonfinite", "amp_overflow"))
        if self.remedies:
            self.remedies.on_raise(self._remedy_ctx, ev)
        raise NonFiniteGradientError(f"step {ev.step}: {ev.message}", ev.step, ev.layers, ev)

    def flush(self) -> None:
        """Read pending rows back (one copy), build events, hand rows to the store."""
        self._process(*self._buffer.drain())

    def add_row_observer(self, fn) -> None:
        """Call ``fn(steps, rows)`` at every flush with the rows read back (host numpy,
        layout ``gradguard.layout``): logging adds no host sync of its own.  An observer
        that raises is reported with a warning; training goes on."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self._observers.append(fn)

    def _process(self, steps: list[int], rows: np.ndarray) -> None:
        """Host side of a flush: events, detectors, remedies, observers, the store."""
        if not steps:
            return
        scaler_on = self._scaler_active()
        new_events: list[Event] = []
        bad, skipped = rows[:, COL["bad"]] > 0, rows[:, COL["skipped"]] > 0
        self._skipped += int(skipped.sum())  # poisoned steps and steps held by a remedy
        self._nonfinite += int(bad.sum())  # one event per streak of identical poisoned steps:
        for ev in self._repeats.update(steps, rows, self.run, amp=scaler_on,  # a dead run's flood
                                       origins=self._origin.take(steps)):
            new_events.append(ev)
            if self.on_nonfinite == "warn" and ev.severity != "info":
                warnings.warn(f"gradguard: {ev}", RuntimeWarning, stacklevel=3)
        for det in self.detectors:
            try:
                new_events += det.update(steps, rows, self.run)
            except Exception as exc:  # a failing detector is reported and counted, rows still go on
                self.failures["detectors"] += 1
                if self.recorder is not None:
                    self.recorder.report_failure(f"detector {type(det).__name__}", exc)
                warnings.warn(f"gradguard: detector {det!r} failed on steps {steps[0]}-{steps[-1]} "
                              f"({exc!r}); training continues", RuntimeWarning, stacklevel=3)
        new_events.sort(key=event_order)
        alarm = self.remedies.after_flush(self._remedy_ctx, steps, rows, new_events) if self.remedies else None
        dead = self._budget.update(steps, rows, self.run) if self.on_nonfinite != "raise" else None
        add_events(self._events, new_events)
        for fn in self._observers:
            try:
                fn(steps, rows)
            except Exception as exc:  # an observer never stops training
                self.failures["observers"] += 1
                warnings.warn(f"gradguard: row observer {fn!r} failed: {exc!r}", RuntimeWarning, stacklevel=3)
        out_rows, out_cols = self._group_lrs.splice(steps, rows, GLOBAL_COLS)  # every group's lr
        if self.recorder is not None:
            self.recorder.write_steps(steps, out_rows, out_cols)
            self.recorder.write_events(new_events)
        if alarm is not None or dead is not None:  # the "raise" remedy or a spent nonfinite_budget,
            raise alarm if alarm is not None else dead  # once the rows and events are recorded

    def close(self, status: str | None = None, error=None) -> None:
        """Flush pending rows and close the run store (even if the last flush raises).
        ``status``: how the run ended (``"finished"`` by default, ``"failed"``)."""
        self._hooks.remove()
        try:
            self.flush()
        finally:
            if self.recorder is not None:
                self.recorder.close(status=status, error=error)

    def __enter__(self):
        return self

    def __exit__(self, tp, exc, tb):
        self.close(status="failed" if tp is not None else "finished", error=exc)

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
            "nonfinite_repeats": self._repeats.state_dict(),
            "nonfinite_budget": self._budget.state_dict(),
            "nonfinite_origins": self._origin.state_dict(),
            "pending": {"steps": steps, "rows": rows},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        dets = state_dict.get("detectors", []) if isinstance(state_dict, dict) else []
        # Validate everything, and load into copies first: a state that fails half-way must
        # leave this guard untouched.
        events, pending, rows = check_state(state_dict, self.names, self.clip, self.detectors,
                                            self.params, self.run.layout)
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
        if "nonfinite_repeats" in state_dict:  # (absent from 0.1.0 states: a fresh count)
            self._repeats.load_state_dict(state_dict["nonfinite_repeats"])
        if "nonfinite_budget" in state_dict:  # (absent from older states: a fresh streak)
            self._budget.load_state_dict(state_dict["nonfinite_budget"])
        self._origin.load_state_dict(state_dict.get("nonfinite_origins", {}))
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
