"""Remedies: what the guard does about an event (skip, LR back-off, raise, rollback, flight record).

Actions run on the host at flush time (every ``flush_every`` steps: 16 on
CPU, 32 on an accelerator; at once on CPU for a step with NaN/Inf), after
the detectors, in the order the events occurred.  They are configured per
event kind or severity (see ``table.py``) and act on training only through a
``RemedyContext`` (``context.py``): they never see the guard.  What each
action did is appended to ``event.data["actions"]``.

Modules: ``context`` (RemedyContext), ``actions`` (Action, Skip, Raise,
LRBackoff, GuardAlarm), ``rollback`` (Rollback, snapshots), ``flight``
(FlightRecorder), ``autopilot`` (Autopilot,
``remedies="auto"``), ``table`` (Remedies, ACTION_NAMES).

``penalty``, ``tbptt`` and ``detach_hidden`` (helpers for the user's own
training loop) live in ``gradguard.training``; they are re-exported here
because ``gradguard.remedies`` was their home before.
"""
from __future__ import annotations

from ..training import detach_hidden, penalty, tbptt
from .actions import Action, GuardAlarm, LRBackoff, Raise, Skip
from .autopilot import Autopilot
from .context import RemedyContext
from .flight import DUMP_VERSION, FlightRecorder
from .rollback import Rollback, capture_state, restore_state
from .table import ACTION_NAMES, SEVERITY_KEYS, Remedies

__all__ = ["RemedyContext", "Action", "Skip", "Raise", "LRBackoff", "GuardAlarm", "Rollback",
           "Autopilot", "FlightRecorder", "Remedies", "ACTION_NAMES", "SEVERITY_KEYS", "DUMP_VERSION",
           "capture_state", "restore_state", "penalty", "tbptt", "detach_hidden"]
