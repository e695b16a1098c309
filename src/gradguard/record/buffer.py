"""A device ring buffer of per-step rows, read back to the host in one copy.

The guard writes one float32 row per step (global values followed by
per-layer values) without leaving the device.  ``drain`` copies all pending
rows to the host at once: on a GPU that is the single host sync of a flush
interval, on a CPU a memcpy.  ``pending`` exposes the pending rows to the
host without draining them: on a CPU buffer a zero-copy view, which is how
the guard takes its per-step decisions there without a second read.
"""
from __future__ import annotations

import numpy as np
import torch

from .._validate import check_int

__all__ = ["StepBuffer"]


class StepBuffer:
    def __init__(self, width: int, capacity: int, device: torch.device):
        self.width = check_int("width", width, 0)
        self.capacity = check_int("capacity", capacity, 1)
        self.device = torch.device(device)
        self._buf = torch.empty((capacity, width), dtype=torch.float32, device=self.device)
        self._steps: list[int] = []
        # CPU: the same memory as a numpy array, for rows written on the host (see Guard._step_host)
        self.host_view = self._buf.numpy() if self.device.type == "cpu" else None

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def full(self) -> bool:
        return len(self._steps) >= self.capacity

    def push(self, step: int, row: torch.Tensor) -> None:
        self.next_row().copy_(row, non_blocking=True)
        self.commit(step)

    def next_row(self) -> torch.Tensor:
        """The slot of the next row (a view): write it in place, then ``commit``."""
        if self.full:
            raise RuntimeError("StepBuffer is full; drain it first")
        return self._buf[len(self._steps)]

    def cell(self, k: int, col: int) -> torch.Tensor:
        """Row ``k``, column ``col`` as a 0-dim view, for a value that is written as a tensor."""
        return self._buf[k, col]

    def commit(self, step: int) -> None:
        """Mark the slot returned by ``next_row`` as step ``step``'s row."""
        if self.full:
            raise RuntimeError("StepBuffer is full; drain it first")
        self._steps.append(step)

    def pending(self) -> np.ndarray:
        """The pending rows as a host array, oldest first, still pending.

        On a CPU buffer this is a view (valid until the next ``push``); on an
        accelerator it is a copy and a host sync.
        """
        n = len(self._steps)
        if self.device.type == "cpu":
            return self._buf[:n].numpy()  # host sync: none on CPU (a view of host memory)
        return self._buf[:n].cpu().numpy()  # host sync: accelerator buffers only

    def drain(self, rows: np.ndarray | None = None) -> tuple[list[int], np.ndarray]:
        """(steps, rows): every pending row as a float32 array, oldest first.

        ``rows``: what ``pending()`` returned since the last push (no second read).
        """
        n = len(self._steps)
        steps, self._steps = self._steps, []
        if n == 0:
            return steps, np.empty((0, self.width), np.float32)
        if rows is not None:
            if len(rows) != n:
                raise ValueError(f"rows holds {len(rows)} rows, {n} are pending")
            return steps, np.array(rows, np.float32)  # a copy: the buffer is reused
        rows = self._buf[:n].cpu().numpy().copy()  # host sync: once per flush interval
        return steps, rows
