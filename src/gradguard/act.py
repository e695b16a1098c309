"""Deprecated module path: the remedies live in ``gradguard.remedies`` (kept for one release).

``KINDS`` is now every registered event kind (``gradguard.events.KINDS``), so
``"unused"`` and ``"amp_overflow"`` are valid remedies keys.
"""
from __future__ import annotations

from .events import KINDS as _KINDS
from .remedies import (ACTION_NAMES, DUMP_VERSION, SEVERITY_KEYS, Action, FlightRecorder, GuardAlarm,
                       LRBackoff, Raise, Remedies, RemedyContext, Rollback, Skip, capture_state,
                       restore_state)
from .remedies.flight import _try_pickle  # noqa: F401  (old private name, imported by old code)
from .remedies.rollback import to_cpu as _to_cpu  # noqa: F401

KINDS = tuple(_KINDS)

__all__ = ["Action", "LRBackoff", "Raise", "Skip", "Rollback", "FlightRecorder", "Remedies",
           "GuardAlarm", "ACTION_NAMES", "DUMP_VERSION", "KINDS", "SEVERITY_KEYS", "RemedyContext",
           "capture_state", "restore_state"]
