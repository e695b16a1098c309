"""What a remedy may see and change: the ``RemedyContext``.

Actions never receive the guard.  They get this small object, built once by
the guard: the optimizer and the model (to change the learning rate or roll
back), the watched ``(names, params)``, the run description, the step count,
and the hold counter through which a remedy withholds the next optimizer
steps.  Everything an action does to training goes through here.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .._validate import check_int
from ..layout import RunInfo
from .snapshot import capture_state, restore_state

__all__ = ["RemedyContext"]


class RemedyContext:
    """The part of a run that remedies may read and change.

    Args:
        optimizer: the wrapped optimizer (its ``param_groups`` and state).
        params: the watched parameters, in row order.
        run: the ``RunInfo`` of the run (``run.names`` are the parameter names).
        steps: a callable returning how many guard steps were taken so far.
        model: the ``nn.Module`` (None when the guard was given parameters).
        log_dir: the run store's directory (None: no store).

    The hold counter: ``hold(n)`` withholds the next ``n`` optimizer steps
    (counts never add up: ``max(held, n)``); the guard's step decision calls
    ``take_hold()`` once per step.
    """

    def __init__(self, optimizer, params, run: RunInfo, steps: Callable[[], int], *, model=None,
                 log_dir=None):
        if not hasattr(optimizer, "param_groups") or not callable(getattr(optimizer, "state_dict", None)):
            raise TypeError(f"optimizer must be a torch optimizer, got {type(optimizer).__name__}")
        if not isinstance(run, RunInfo):
            raise TypeError(f"run must be a gradguard.layout.RunInfo, got {type(run).__name__}")
        params = list(params)
        if len(params) != len(run.names):
            raise ValueError(f"params holds {len(params)} tensors, run describes {len(run.names)}")
        if not callable(steps):
            raise TypeError(f"steps must be a callable returning the step count, got {type(steps).__name__}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        self.optimizer = optimizer
        self.model = model
        self.params = params
        self.run = run
        self.log_dir = log_dir
        self._steps = steps
        self._held = 0

    @property
    def names(self) -> tuple[str, ...]:
        return self.run.names

    @property
    def steps(self) -> int:
        """Guard steps taken so far (skipped and held ones included)."""
        return self._steps()

    # ---------------------------------------------------------- hold counter
    @property
    def held(self) -> int:
        """How many of the next steps will be withheld."""
        return self._held

    @held.setter
    def held(self, n: int) -> None:
        # Set outright only by the guard (its ``hold_steps`` / resume); remedies call ``hold``.
        self._held = check_int("hold_steps", n, 0)

    def hold(self, n: int) -> None:
        """Withhold the next ``n`` optimizer steps (a longer hold already running is kept)."""
        self._held = max(self._held, check_int("n", n, 0))

    def take_hold(self) -> bool:
        """Consume one held step: True if this step is withheld."""
        if self._held > 0:
            self._held -= 1
            return True
        return False

    # --------------------------------------------------------------- state
    def capture(self, *, wait: bool = True, reuse: dict | None = None) -> dict:
        """Model + optimizer state cloned to CPU (a snapshot for ``restore``); ``wait=False``:
        asynchronous on a GPU, ``reuse``: an old snapshot's buffers (see ``snapshot.py``)."""
        return capture_state(self, wait=wait, reuse=reuse)

    def restore(self, snapshot: dict) -> None:
        """Copy a ``capture()`` snapshot back in place, bitwise; the snapshot stays intact."""
        restore_state(self, snapshot)

    def state_dict(self) -> dict:
        return {"hold_steps": self._held}

    def load_state_dict(self, state_dict: dict) -> None:
        self.held = state_dict.get("hold_steps", 0)

    def __repr__(self) -> str:
        return (f"RemedyContext(optimizer={type(self.optimizer).__name__}, layers={len(self.params)}, "
                f"steps={self.steps}, held={self._held})")
