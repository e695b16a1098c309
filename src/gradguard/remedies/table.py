"""The remedies table: which actions run for which event kind or severity.

Built from ``Guard(remedies=...)``:

    guard = gg.Guard(model, opt, remedies={
        "exploding": "lr_backoff",                 # a name, default settings
        "spike": gg.Rollback(every=50, skip_batches=20),
        "critical": gg.FlightRecorder("dumps/"),   # any critical event
    })

Keys are event kinds (``gradguard.events.KINDS``) or a severity
(``"critical"``, ``"warning"``).  Values are an action name
(``ACTION_NAMES``), an ``Action`` object, or a list of them.  One action
object may serve several keys (one shared snapshot for all).

``remedies="auto"`` (or ``gg.Autopilot(...)`` with tunables) is the built-in
policy of ``autopilot.py``: skip, roll back, back off the learning rate, raise.
"""
from __future__ import annotations

import warnings

from pathlib import Path

from ..events import KINDS, Event
from .actions import Action, GuardAlarm, LRBackoff, Raise, Skip
from .autopilot import Autopilot
from .context import RemedyContext
from .flight import FlightRecorder
from .rollback import Rollback

__all__ = ["Remedies", "ACTION_NAMES", "SEVERITY_KEYS"]

SEVERITY_KEYS = ("critical", "warning")

ACTION_NAMES = {"skip": Skip, "lr_backoff": LRBackoff, "raise": Raise, "rollback": Rollback,
                "record": None}  # "record" needs a directory: built from the log_dir


def _flight_dir(log_dir) -> Path:
    return Path(log_dir) / "flight" if log_dir is not None else Path("gradguard-flight")


class Remedies:
    """The guard's per-kind action table.

    Args:
        spec: ``{kind or severity: action name | Action | list of them}``, or None.
        ctx: the run's ``RemedyContext``; every action is bound to it.
        log_dir: where ``"record"`` writes (``log_dir/flight``); None: ``ctx.log_dir``,
            and without one ``./gradguard-flight``.
    """

    def __init__(self, spec: dict | None, ctx: RemedyContext, log_dir=None):
        if spec is None:
            spec = {}
        if isinstance(spec, str) and spec == "auto":
            spec = Autopilot()
        if isinstance(spec, Autopilot):  # the preset: one object sees every event kind it handles
            spec = {"nonfinite": spec, "rescue": spec}  # it watches every event in on_flush
        if not isinstance(spec, dict):
            raise TypeError(f"remedies must be a dict {{kind: action}}, \"auto\", an Autopilot or None, got "
                            f"{spec!r}" if isinstance(spec, str) else f"remedies must be a dict {{kind: action}}, "
                            f"\"auto\", an Autopilot or None, got {type(spec).__name__}")
        if not isinstance(ctx, RemedyContext):
            raise TypeError(f"ctx must be a RemedyContext, got {type(ctx).__name__}")
        self.failures = 0  # actions that raised (reported with a warning, never fatal)
        if log_dir is None:
            log_dir = ctx.log_dir
        self.ctx = ctx
        self.table: dict[str, list[Action]] = {}
        self.actions: list[Action] = []
        by_name: dict[str, Action] = {}
        for key, value in spec.items():
            if key not in KINDS and key not in SEVERITY_KEYS:
                raise ValueError(f"remedies: unknown key {key!r}; use an event kind {tuple(KINDS)} or a "
                                 f"severity {SEVERITY_KEYS}")
            values = value if isinstance(value, (list, tuple)) else [value]
            acts = []
            for v in values:
                if isinstance(v, str):
                    if v not in ACTION_NAMES:
                        raise ValueError(f"remedies[{key!r}]: unknown action {v!r}; use one of "
                                         f"{tuple(ACTION_NAMES)} or an Action object")
                    if v not in by_name:  # one shared object per name (one snapshot)
                        by_name[v] = FlightRecorder(_flight_dir(log_dir)) if v == "record" else ACTION_NAMES[v]()
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
            a.bind(ctx)

    def __bool__(self) -> bool:
        return bool(self.actions)

    def on_step(self, step: int, batch) -> None:
        for a in self.actions:
            a.on_step(step, batch)

    def after_flush(self, ctx: RemedyContext, steps, rows, events: list[Event]) -> Exception | None:
        """Run the actions for ``events``; return the exception to raise once they are recorded."""
        for a in self.actions:
            try:
                a.on_flush(ctx, steps, rows, events)
            except Exception as exc:  # a failing remedy is reported and counted, never fatal
                self._failed(a, exc)
        pending = None
        for ev in events:
            acts = list(self.table.get(ev.kind, []))
            if ev.severity in self.table:
                acts += [a for a in self.table[ev.severity] if all(a is not b for b in acts)]
            for a in acts:
                try:
                    done = a(ev, ctx)
                except GuardAlarm as exc:
                    pending = pending or exc
                    done = "raised GuardAlarm"
                except Exception as exc:
                    self._failed(a, exc)
                    done = f"failed: {exc!r}"
                if done:
                    ev.data.setdefault("actions", []).append(done)
        return pending

    def _failed(self, action, exc: Exception) -> None:
        self.failures += 1
        warnings.warn(f"gradguard: remedy {action!r} failed ({exc!r}); training continues",
                      RuntimeWarning, stacklevel=4)

    def on_raise(self, ctx: RemedyContext, event: Event) -> None:
        """The core is raising NonFiniteGradientError now: write flight records first."""
        recorders: list[FlightRecorder] = []
        for key in (event.kind, event.severity):
            recorders += [a for a in self.table.get(key, [])
                          if isinstance(a, FlightRecorder) and all(a is not b for b in recorders)]
        for a in recorders:  # one dump per recorder, even when it serves both keys
            done = a(event, ctx, exact=True)
            if done:
                event.data.setdefault("actions", []).append(done)

    def state_dict(self) -> list:
        return [a.state_dict() for a in self.actions]

    def load_state_dict(self, sd: list) -> None:
        if len(sd) != len(self.actions):
            raise ValueError(f"state_dict has {len(sd)} action states, the guard has {len(self.actions)}")
        for a, s in zip(self.actions, sd):
            a.load_state_dict(s)

    def __repr__(self) -> str:
        return f"Remedies({ {k: [repr(a) for a in v] for k, v in self.table.items()} })"
