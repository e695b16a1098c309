"""Rollback: restore the last good snapshot and withhold the next batches; snapshot capture/restore.

A snapshot is the model (its ``state_dict``, or the watched parameters) and
the optimizer state, cloned to CPU.  Restoring copies it back in place,
bitwise, and leaves the snapshot itself intact, so one snapshot serves any
number of rollbacks.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .._validate import check_int
from .actions import Action
from .snapshot import capture_state, restore_state, to_cpu  # noqa: F401 (re-exported)

__all__ = ["Rollback", "capture_state", "restore_state", "to_cpu"]


class Rollback(Action):
    """Restore the last good snapshot and skip the next ``skip_batches`` batches (PaLM's recipe).

    A snapshot (model + optimizer state, cloned to CPU memory, or written to
    ``to``/snapshot.pt) is taken at a flush with no warning/critical event,
    at most every ``every`` steps: never a copy on every step.  On an event
    it copies the snapshot back in place (bitwise) and holds the next
    ``skip_batches`` optimizer steps (``guard.hold_steps`` tells how many
    remain, to skip the forward too).

    Args:
        every: steps between snapshots (default 100).
        skip_batches: batches withheld after a rollback (default 10).
        to: None (CPU memory) or a directory for ``snapshot.pt``.
        max_rollbacks: stop rolling back after this many (default None: no limit).
    """

    def __init__(self, every: int = 100, skip_batches: int = 10, to=None, max_rollbacks: int | None = None):
        self.every = check_int("every", every, 1)
        self.skip_batches = check_int("skip_batches", skip_batches, 0)
        self.max_rollbacks = None if max_rollbacks is None else check_int("max_rollbacks", max_rollbacks, 0)
        self.to = None if to is None else Path(to)
        self._snap: dict | None = None
        self.snapshot_step: int | None = None  # the snapshot holds the state after this many steps
        self.rollbacks = 0
        self._handled_flush = -1

    def _path(self) -> Path:
        return self.to / "snapshot.pt"

    def snapshot(self, ctx=None) -> None:
        """Take a snapshot now (also called automatically); ``ctx`` defaults to the bound one."""
        ctx = ctx if ctx is not None else self.ctx
        if ctx is None:
            raise RuntimeError("Rollback.snapshot: the action is not bound to a guard yet")
        # in memory: asynchronous on a GPU, into the previous snapshot's pinned buffers
        # (restore waits for the copy); on disk the values are needed now
        snap = ctx.capture(wait=self.to is not None, reuse=self._snap)
        if self.to is not None:
            self.to.mkdir(parents=True, exist_ok=True)
            tmp = self._path().with_suffix(".tmp")
            torch.save(snap, tmp)
            os.replace(tmp, self._path())  # atomic: a crash never leaves half a snapshot
            self._snap = None
        else:
            self._snap = snap
        self.snapshot_step = ctx.steps

    def _load(self) -> dict | None:
        if self.snapshot_step is None:
            return None
        if self.to is None:
            return self._snap
        return torch.load(self._path(), map_location="cpu", weights_only=True)

    def on_flush(self, ctx, steps, rows, events):
        if any(e.severity in ("warning", "critical") for e in events):
            return
        if ctx.held > 0:  # held steps are not progress: the state is still the rolled-back one
            return
        if self.snapshot_step is None or ctx.steps - self.snapshot_step >= self.every:
            self.snapshot(ctx)

    def __call__(self, event, ctx):
        now = ctx.steps
        if self._handled_flush == now:
            return "rolled back (once per flush)"
        snap = self._load()
        if snap is None:
            return "no snapshot yet: nothing to roll back to"
        if self.max_rollbacks is not None and self.rollbacks >= self.max_rollbacks:
            return f"rollback limit ({self.max_rollbacks}) reached"
        ctx.restore(snap)
        ctx.hold(self.skip_batches)
        self.rollbacks += 1
        self._handled_flush = now
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

    def __repr__(self) -> str:
        return (f"Rollback(every={self.every}, skip_batches={self.skip_batches}, to={self.to!r}, "
                f"max_rollbacks={self.max_rollbacks})")
