"""The learning rate of every param group, recorded beside the row's ``lr`` (group 0's).

A row (``layout.py``) holds one ``lr``, but optimizers often have several groups (no weight
decay on biases and norms, layer-wise LR decay, a smaller LR for embeddings).  The other
groups' learning rates are read each step, kept by step until the flush, and handed to the
store and the sinks as extra global columns ``lr_group1``, ``lr_group2`` ... after the row's
own.  Readers that go by column name (``RunStore.steps``, the sinks) get them; detectors and
remedies, which read the row layout, see the rows unchanged; a one-group run's store is as
before.  The columns are fixed when the guard is built (groups added later are not recorded).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .layout import N_GLOBAL

__all__ = ["GroupLRs"]


class GroupLRs:
    """Learning rates of param groups 1..n-1 of ``optimizer``, by step."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.n = max(0, len(optimizer.param_groups) - 1)
        self.cols = tuple(f"lr_group{i}" for i in range(1, self.n + 1))
        self._by_step: dict[int, tuple] = {}

    def read(self, step: int) -> None:
        """Keep this step's learning rates (call before a scheduler moves them)."""
        if not self.n:
            return
        # A tensor lr is copied (schedulers update it in place) and read back at the flush.
        self._by_step[step] = tuple(
            v.detach().clone() if isinstance(v, torch.Tensor) else v
            for v in (g.get("lr", math.nan) for g in self.optimizer.param_groups[1:self.n + 1]))

    def splice(self, steps, rows: np.ndarray, global_cols: tuple):
        """``(rows, global_cols)`` with the groups' columns after the row's global ones
        (NaN for a step not read, e.g. a row restored from a checkpoint)."""
        if not self.n:
            return rows, global_cols
        missing = (math.nan,) * self.n
        extra = np.array([[float(v) for v in self._by_step.pop(int(s), missing)]  # host sync: tensor lrs only, at the flush
                          for s in steps], dtype=rows.dtype).reshape(len(steps), self.n)
        return (np.concatenate([rows[:, :N_GLOBAL], extra, rows[:, N_GLOBAL:]], axis=1),
                tuple(global_cols) + self.cols)
