"""Actions: what the guard does about an event (skip, LR back-off, raise, rollback, flight record).

Actions run on the host at flush time (every ``flush_every`` steps: 16 on
CPU, 32 on an accelerator; at once on CPU for a step with NaN/Inf), after
the detectors, in the order
the events occurred.  They are configured per event kind:

    guard = gg.Guard(model, opt, remedies={
        "exploding": "lr_backoff",                 # a name, default settings
        "spike": gg.Rollback(every=50, skip_batches=20),
        "critical": gg.FlightRecorder("dumps/"),   # any critical event
    })

Keys are event kinds (``"nonfinite"``, ``"spike"``, ``"exploding"``,
``"loss_spike"``, ``"vanishing"``, ``"weight_growth"``, ``"over_clipping"``)
or a severity (``"critical"``, ``"warning"``) for every event of that
severity.  Values are a name (``"skip"``, ``"lr_backoff"``, ``"raise"``,
``"rollback"``, ``"record"``), an action object, or a list of them.  One
action object may serve several keys (one shared snapshot for all).

What each action did is appended to ``event.data["actions"]``.
"""
from __future__ import annotations

import io
import os
import pickle
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import torch

from .events import Event

__all__ = ["Action", "LRBackoff", "Raise", "Skip", "Rollback", "FlightRecorder", "Remedies",
           "GuardAlarm", "ACTION_NAMES", "DUMP_VERSION"]

DUMP_VERSION = 1
KINDS = ("nonfinite", "spike", "exploding", "loss_spike", "vanishing", "weight_growth", "over_clipping")
SEVERITY_KEYS = ("critical", "warning")


class GuardAlarm(RuntimeError):
    """Raised by the ``"raise"`` remedy.  ``.event`` is the event, ``.layers`` its culprits."""

    def __init__(self, event: Event):
        super().__init__(f"gradguard: {event}")
        self.event = event
        self.step = event.step
        self.layers = event.layers


class Action:
    """Base class.  Override ``__call__`` (and ``on_step`` / ``on_flush`` if needed)."""

    def bind(self, guard) -> None:
        self.guard = guard

    def on_step(self, step: int, batch) -> None:
        """Every ``guard.step()``; host-only bookkeeping, must be cheap."""

    def on_flush(self, guard, steps: list[int], rows: np.ndarray, events: list[Event]) -> None:
        """Every flush, before the events are handled."""

    def __call__(self, event: Event, guard) -> str | None:
        """Handle one event; return a short description of what was done (or None)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Skip(Action):
    """The core's skip: a NaN/Inf step never reaches the optimizer (``on_nonfinite="skip"``).

    Only valid for ``"nonfinite"``: other kinds are known after the step was
    taken; use ``Rollback`` to undo those.
    """

    def __call__(self, event, guard):
        return "step skipped" if event.data.get("skipped") else None


class Raise(Action):
    """Raise ``GuardAlarm`` (after the event is recorded)."""

    def __call__(self, event, guard):
        raise GuardAlarm(event)


class LRBackoff(Action):
    """Multiply every param group's learning rate by ``factor`` after repeated events; restore gradually.

    After ``patience`` events (counted until ``recover_every`` quiet steps
    pass), the scale is multiplied by ``factor`` (never below ``min_scale``).
    After ``recover_every`` steps without an event, it is divided by
    ``factor`` again, up to 1 (the user's learning rate).  The change is a
    ratio applied to the current ``lr``, so schedulers that multiply the lr
    (chainable ones) compose; a scheduler that sets lr from its base_lrs
    overrides it at its next step.

    Args:
        factor: multiplier in (0, 1) (default 0.5).
        patience: events before a back-off (default 2).
        min_scale: lowest scale (default 1/64).
        recover_every: quiet steps before each restore step (default 100).
    """

    def __init__(self, factor: float = 0.5, patience: int = 2, min_scale: float = 1 / 64,
                 recover_every: int = 100):
        if not (isinstance(factor, (int, float)) and 0 < factor < 1):
            raise ValueError(f"factor must be in (0, 1), got {factor!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        if not (isinstance(min_scale, (int, float)) and 0 < min_scale <= 1):
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale!r}")
        if isinstance(recover_every, bool) or not isinstance(recover_every, int) or recover_every < 1:
            raise ValueError(f"recover_every must be an int >= 1, got {recover_every!r}")
        self.factor, self.patience = float(factor), patience
        self.min_scale, self.recover_every = float(min_scale), recover_every
        self.scale = 1.0
        self._count = 0
        self._last = 0  # step of the last event or change

    def _set(self, guard, scale: float) -> None:
        ratio = scale / self.scale
        for group in guard.optimizer.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                lr.mul_(ratio)
            else:
                group["lr"] = lr * ratio
        self.scale = scale

    def __call__(self, event, guard):
        if event.step - self._last >= self.recover_every:
            self._count = 0
        self._count += 1
        self._last = event.step
        if self._count < self.patience:
            return f"lr back-off armed ({self._count}/{self.patience})"
        self._count = 0
        new = max(self.scale * self.factor, self.min_scale)
        if new == self.scale:
            return f"lr already at its floor (x{self.scale:g})"
        self._set(guard, new)
        return f"learning rate x{self.factor:g} (now x{self.scale:g} of the original)"

    def on_flush(self, guard, steps, rows, events):
        if self.scale < 1.0 and guard.steps - self._last >= self.recover_every:
            self._set(guard, min(1.0, self.scale / self.factor))
            self._last = guard.steps

    def state_dict(self):
        return {"scale": self.scale, "count": self._count, "last": self._last}

    def load_state_dict(self, sd):
        self.scale, self._count, self._last = float(sd["scale"]), int(sd["count"]), int(sd["last"])


# ------------------------------------------------------------------ snapshots
def _to_cpu(obj):
    """Deep copy with every tensor cloned to CPU (optimizer state dicts, batches)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return type(obj)(*(_to_cpu(v) for v in obj)) if hasattr(obj, "_fields") \
            else tuple(_to_cpu(v) for v in obj)
    return obj


def capture_state(guard) -> dict:
    """Model (state_dict, or the watched parameters) and optimizer state, cloned to CPU."""
    with torch.no_grad():
        if getattr(guard, "model", None) is not None:
            model_state = _to_cpu(guard.model.state_dict())
        else:
            model_state = {n: p.detach().to("cpu", copy=True) for n, p in zip(guard.names, guard.params)}
        return {"model": model_state, "optimizer": _to_cpu(guard.optimizer.state_dict())}


def restore_state(guard, snap: dict) -> None:
    """Copy a ``capture_state`` snapshot back in place (bitwise)."""
    with torch.no_grad():
        if getattr(guard, "model", None) is not None:
            guard.model.load_state_dict(snap["model"])
        else:
            for n, p in zip(guard.names, guard.params):
                p.copy_(snap["model"][n])
        # load_state_dict may keep the tensors it is given: hand it a fresh copy
        # so later optimizer steps cannot modify the snapshot.
        guard.optimizer.load_state_dict(_to_cpu(snap["optimizer"]))


class Rollback(Action):
    """Restore the last good snapshot and skip the next ``skip_batches`` batches (PaLM's recipe).

    A snapshot (model + optimizer state, cloned to CPU memory, or written to
    ``to``/snapshot.pt) is taken at a flush with no warning/critical event,
    at most every ``every`` steps: never a copy on every step.  On an event
    it copies the snapshot back in place (bitwise) and makes the next
    ``skip_batches`` ``guard.step()`` calls withhold the optimizer step
    (``guard.hold_steps`` tells how many remain, to skip the forward too).

    Args:
        every: steps between snapshots (default 100).
        skip_batches: batches withheld after a rollback (default 10).
        to: None (CPU memory) or a directory for ``snapshot.pt``.
        max_rollbacks: stop rolling back after this many (default None: no limit).
    """

    def __init__(self, every: int = 100, skip_batches: int = 10, to=None, max_rollbacks: int | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if isinstance(skip_batches, bool) or not isinstance(skip_batches, int) or skip_batches < 0:
            raise ValueError(f"skip_batches must be an int >= 0, got {skip_batches!r}")
        if max_rollbacks is not None and (not isinstance(max_rollbacks, int) or max_rollbacks < 0):
            raise ValueError(f"max_rollbacks must be None or an int >= 0, got {max_rollbacks!r}")
        self.every, self.skip_batches, self.max_rollbacks = every, skip_batches, max_rollbacks
        self.to = None if to is None else Path(to)
        self._snap: dict | None = None
        self.snapshot_step: int | None = None  # the snapshot holds the state after this many steps
        self.rollbacks = 0
        self._handled_flush = -1

    def _path(self) -> Path:
        return self.to / "snapshot.pt"

    def snapshot(self, guard) -> None:
        """Take a snapshot now (also called automatically)."""
        snap = capture_state(guard)
        if self.to is not None:
            self.to.mkdir(parents=True, exist_ok=True)
            tmp = self._path().with_suffix(".tmp")
            torch.save(snap, tmp)
            os.replace(tmp, self._path())  # atomic: a crash never leaves half a snapshot
            self._snap = None
        else:
            self._snap = snap
        self.snapshot_step = guard.steps

    def _load(self) -> dict | None:
        if self.snapshot_step is None:
            return None
        if self.to is None:
            return self._snap
        return torch.load(self._path(), map_location="cpu", weights_only=True)

    def on_flush(self, guard, steps, rows, events):
        if any(e.severity in ("warning", "critical") for e in events):
            return
        if guard.hold_steps > 0:
            return
        if self.snapshot_step is None or guard.steps - self.snapshot_step >= self.every:
            self.snapshot(guard)

    def __call__(self, event, guard):
        if self._handled_flush == guard.steps:
            return "rolled back (once per flush)"
        snap = self._load()
        if snap is None:
            return "no snapshot yet: nothing to roll back to"
        if self.max_rollbacks is not None and self.rollbacks >= self.max_rollbacks:
            return f"rollback limit ({self.max_rollbacks}) reached"
        restore_state(guard, snap)
        guard.hold_steps = max(guard.hold_steps, self.skip_batches)
        self.rollbacks += 1
        self._handled_flush = guard.steps
        return (f"rolled back to the state after step {self.snapshot_step - 1}; skipping the next "
                f"{self.skip_batches} batches")

    def state_dict(self):
        # A memory snapshot does not survive a checkpoint; a disk one does.
        return {"snapshot_step": self.snapshot_step if self.to is not None else None,
                "rollbacks": self.rollbacks}

    def load_state_dict(self, sd):
        # The snapshot itself is not part of the state (it is a model copy);
        # after a resume the next clean flush takes a new one.
        self.rollbacks = int(sd["rollbacks"])
        if self.to is not None and sd.get("snapshot_step") is not None and self._path().exists():
            self.snapshot_step = int(sd["snapshot_step"])
        else:
            self.snapshot_step, self._snap = None, None


# ------------------------------------------------------------ flight recorder
class FlightRecorder(Action):
    """On an event, dump what is needed to understand and replay the step.

    The dump (``DIR/flight-<step>-<kind>.pt``, a ``torch.save`` file) holds:
    the last ``keep`` rows of step statistics (global + per-layer), the
    events, the model and optimizer state (cloned when the dump is written:
    the pre-step state of a skipped step on CPU; on an accelerator the state
    may be up to ``flush_every - 1`` steps later, ``exact`` says which), the
    offending batch (when ``guard.step(loss, batch=...)`` was given it; the
    recorder keeps references to the last ``flush_every`` batches, no copy),
    the model object (pickled, when it pickles) and ``loss_fn``.

    ``gradguard replay DUMP`` re-runs the step under anomaly detection.

    Args:
        directory: where dumps go.
        keep: steps of statistics kept (default 64).
        max_dumps: dumps written at most (default 5).
        loss_fn: ``loss_fn(model, batch) -> loss`` used by replay (a
            module-level function, so it pickles); None: replay uses
            ``model(*batch)`` summed.
        save_model: pickle the model object into the dump (default True).
    """

    def __init__(self, directory, keep: int = 64, max_dumps: int = 5, loss_fn=None,
                 save_model: bool = True):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        if isinstance(max_dumps, bool) or not isinstance(max_dumps, int) or max_dumps < 0:
            raise ValueError(f"max_dumps must be an int >= 0, got {max_dumps!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable(model, batch) or None, got {type(loss_fn).__name__}")
        self.directory = Path(directory)
        self.keep, self.max_dumps, self.loss_fn, self.save_model = keep, max_dumps, loss_fn, save_model
        self.dumps: list[str] = []
        self._steps: deque = deque(maxlen=keep)
        self._rows: deque = deque(maxlen=keep)
        self._batches: deque = deque(maxlen=2)

    def bind(self, guard):
        super().bind(guard)
        self._batches = deque(maxlen=guard.flush_every + 1)

    def on_step(self, step, batch):
        if batch is not None:
            self._batches.append((step, batch))

    def on_flush(self, guard, steps, rows, events):
        self._steps.extend(steps)
        self._rows.extend(rows)

    def _batch_of(self, step):
        for s, b in self._batches:
            if s == step:
                return _to_cpu(b)
        return None

    def __call__(self, event, guard, exact: bool | None = None):
        if len(self.dumps) >= self.max_dumps:
            return None
        from .guard import GLOBAL_COLS

        if exact is None:  # the weights are the pre-step ones only if nothing moved them since
            exact = bool(event.data.get("skipped")) and guard.steps == event.step + 1
        dump = {
            "version": DUMP_VERSION, "step": event.step, "event": event.to_dict(),
            "names": list(guard.names), "global_cols": list(GLOBAL_COLS),
            "steps": list(self._steps),
            "rows": torch.from_numpy(np.asarray(list(self._rows), np.float32).reshape(
                len(self._rows), len(GLOBAL_COLS) + 2 * len(guard.names))),
            "state_step": guard.steps, "exact": exact,
            "batch": self._batch_of(event.step), **capture_state(guard),
            "model_pickle": None, "loss_fn": None,
        }
        if self.save_model and getattr(guard, "model", None) is not None:
            dump["model_pickle"] = _try_pickle(guard.model)
        if self.loss_fn is not None:
            dump["loss_fn"] = _try_pickle(self.loss_fn)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"flight-{event.step:08d}-{event.kind}.pt"
        try:
            torch.save(dump, path)
        except Exception as exc:  # a failing sink never crashes training
            warnings.warn(f"gradguard: flight record not written: {exc}", RuntimeWarning, stacklevel=2)
            return None
        self.dumps.append(str(path))
        return f"flight record written to {path}"

    def state_dict(self):
        return {"dumps": list(self.dumps)}

    def load_state_dict(self, sd):
        self.dumps = list(sd["dumps"])


def _try_pickle(obj) -> bytes | None:
    buf = io.BytesIO()
    try:
        torch.save(obj, buf)  # pickles the class by reference; fails for lambdas / local classes
    except (pickle.PicklingError, AttributeError, TypeError):
        return None
    return buf.getvalue()


# -------------------------------------------------------------- the registry
ACTION_NAMES = {"skip": Skip, "lr_backoff": LRBackoff, "raise": Raise, "rollback": Rollback,
                "record": None}  # "record" needs a directory: built from the guard's log_dir


class Remedies:
    """The guard's per-kind action table (built from ``Guard(remedies=...)``)."""

    def __init__(self, spec: dict | None, guard, log_dir=None):
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise TypeError(f"remedies must be a dict {{kind: action}} or None, got {type(spec).__name__}")
        self.table: dict[str, list[Action]] = {}
        self.actions: list[Action] = []
        by_name: dict[str, Action] = {}
        for key, value in spec.items():
            if key not in KINDS and key not in SEVERITY_KEYS:
                raise ValueError(f"remedies: unknown key {key!r}; use an event kind {KINDS} or a "
                                 f"severity {SEVERITY_KEYS}")
            values = value if isinstance(value, (list, tuple)) else [value]
            acts = []
            for v in values:
                if isinstance(v, str):
                    if v not in ACTION_NAMES:
                        raise ValueError(f"remedies[{key!r}]: unknown action {v!r}; use one of "
                                         f"{tuple(ACTION_NAMES)} or an Action object")
                    if v not in by_name:  # one shared object per name (one snapshot)
                        if v == "record":
                            base = Path(log_dir) if log_dir is not None else Path("gradguard-flight")
                            by_name[v] = FlightRecorder(base / "flight" if log_dir is not None else base)
                        else:
                            by_name[v] = ACTION_NAMES[v]()
                    v = by_name[v]
                if not isinstance(v, Action):
                    raise TypeError(f"remedies[{key!r}]: expected an action name or an Action, got "
                                    f"{type(v).__name__}")
                if isinstance(v, Skip) and key != "nonfinite":
                    raise ValueError(f"remedies[{key!r}]: 'skip' works only for 'nonfinite' (other kinds "
                                     "are detected after the step): use 'rollback' to undo the step")
                acts.append(v)
                if all(v is not a for a in self.actions):
                    self.actions.append(v)
            self.table[key] = acts
        for a in self.actions:
            a.bind(guard)

    def __bool__(self) -> bool:
        return bool(self.actions)

    def on_step(self, step: int, batch) -> None:
        for a in self.actions:
            a.on_step(step, batch)

    def after_flush(self, guard, steps, rows, events: list[Event]) -> Exception | None:
        """Run the actions for ``events``; return the exception to raise once they are recorded."""
        for a in self.actions:
            a.on_flush(guard, steps, rows, events)
        pending = None
        for ev in events:
            acts = list(self.table.get(ev.kind, []))
            if ev.severity in self.table:
                acts += [a for a in self.table[ev.severity] if all(a is not b for b in acts)]
            for a in acts:
                try:
                    done = a(ev, guard)
                except GuardAlarm as exc:
                    pending = pending or exc
                    done = "raised GuardAlarm"
                if done:
                    ev.data.setdefault("actions", []).append(done)
        return pending

    def on_raise(self, guard, event: Event) -> None:
        """The core is raising NonFiniteGradientError now: write flight records first."""
        for key in (event.kind, event.severity):
            for a in self.table.get(key, []):
                if isinstance(a, FlightRecorder):
                    done = a(event, guard, exact=True)
                    if done:
                        event.data.setdefault("actions", []).append(done)

    def state_dict(self) -> list:
        return [a.state_dict() for a in self.actions]

    def load_state_dict(self, sd: list) -> None:
        if len(sd) != len(self.actions):
            raise ValueError(f"state_dict has {len(sd)} action states, the guard has {len(self.actions)}")
        for a, s in zip(self.actions, sd):
            a.load_state_dict(s)
