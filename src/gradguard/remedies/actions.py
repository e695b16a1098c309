"""The action protocol and the simple actions: skip, raise, learning-rate back-off.

An action is bound once to the run's ``RemedyContext`` and then called at
each flush for the events of the kinds it is configured for.  It acts on
training only through the context (the optimizer, the model, the hold
counter): it never sees the guard.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .._validate import check_int, check_open_unit, check_positive
from ..events import Event

if TYPE_CHECKING:  # annotations only: the context imports this module's neighbours
    from .context import RemedyContext

__all__ = ["Action", "Skip", "Raise", "LRBackoff", "GuardAlarm"]


class GuardAlarm(RuntimeError):
    """Raised by the ``"raise"`` remedy.  ``.event`` is the event, ``.layers`` its culprits."""

    def __init__(self, event: Event):
        super().__init__(f"gradguard: {event}")
        self.event = event
        self.step = event.step
        self.layers = event.layers


class Action:
    """Base class.  Override ``__call__`` (and ``on_step`` / ``on_flush`` if needed)."""

    ctx: "RemedyContext | None" = None

    def bind(self, ctx: "RemedyContext") -> None:
        """Called once, when the guard's remedies table is built."""
        self.ctx = ctx

    def on_step(self, step: int, batch) -> None:
        """Every ``guard.step()``; host-only bookkeeping, must be cheap."""

    def on_flush(self, ctx: "RemedyContext", steps: list[int], rows: np.ndarray, events: list[Event]) -> None:
        """Every flush, before the events are handled."""

    def __call__(self, event: Event, ctx: "RemedyContext") -> str | None:
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

    def __call__(self, event, ctx):
        return "step skipped" if event.data.get("skipped") else None


class Raise(Action):
    """Raise ``GuardAlarm`` (after the event is recorded)."""

    def __call__(self, event, ctx):
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
        min_scale: lowest scale, in (0, 1] (default 1/64).
        recover_every: quiet steps before each restore step (default 100).
    """

    def __init__(self, factor: float = 0.5, patience: int = 2, min_scale: float = 1 / 64,
                 recover_every: int = 100):
        self.factor = check_open_unit("factor", factor)
        self.patience = check_int("patience", patience, 1)
        self.min_scale = check_positive("min_scale", min_scale)
        if self.min_scale > 1:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale!r}")
        self.recover_every = check_int("recover_every", recover_every, 1)
        self.scale = 1.0
        self._count = 0
        self._last = 0  # step of the last event or change

    def _set(self, ctx, scale: float) -> None:
        ratio = scale / self.scale
        for group in ctx.optimizer.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                lr.mul_(ratio)  # in place: a tensor lr may be captured by a compiled step
            else:
                group["lr"] = lr * ratio
        self.scale = scale

    def __call__(self, event, ctx):
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
        self._set(ctx, new)
        return f"learning rate x{self.factor:g} (now x{self.scale:g} of the original)"

    def on_flush(self, ctx, steps, rows, events):
        now = ctx.steps
        if self.scale < 1.0 and now - self._last >= self.recover_every:
            self._set(ctx, min(1.0, self.scale / self.factor))
            self._last = now

    def state_dict(self):
        return {"scale": self.scale, "count": self._count, "last": self._last}

    def load_state_dict(self, sd):
        self.scale, self._count, self._last = float(sd["scale"]), int(sd["count"]), int(sd["last"])

    def __repr__(self) -> str:
        return (f"LRBackoff(factor={self.factor:g}, patience={self.patience}, min_scale={self.min_scale:g}, "
                f"recover_every={self.recover_every})")
