"""A device ring buffer of per-step rows, read back to the host in one copy.

The guard writes one float32 row per step (global values followed by
per-layer values) without leaving the device.  ``drain`` copies all pending
rows to the host at once: on a GPU that is the single host sync of a flush
interval, on a CPU a memcpy.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["StepBuffer"]


class StepBuffer:
    def __init__(self, width: int, capacity: int, device: torch.device):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.width = width
        self.capacity = capacity
        self.device = torch.device(device)
        self._buf = torch.empty((capacity, width), dtype=torch.float32, device=self.device)
        self._steps: list[int] = []

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def full(self) -> bool:
        return len(self._steps) >= self.capacity

    def push(self, step: int, row: torch.Tensor) -> None:
        if self.full:
            raise RuntimeError("StepBuffer is full; drain it first")
        self._buf[len(self._steps)].copy_(row, non_blocking=True)
        self._steps.append(step)

    def drain(self) -> tuple[list[int], np.ndarray]:
        """(steps, rows): every pending row as a float32 array, oldest first."""
        n = len(self._steps)
        steps, self._steps = self._steps, []
        if n == 0:
            return steps, np.empty((0, self.width), np.float32)
        rows = self._buf[:n].cpu().numpy().copy()  # host sync: once per flush interval
        return steps, rows
