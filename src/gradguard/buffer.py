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

from ._validate import check_int
from .layout import N_GLOBAL as G
from .stats import _index_tensor

__all__ = ["StepBuffer", "RowWriter"]


class StepBuffer:
    """``nan_from``: columns from there on start every flush interval as NaN (values measured on
    some steps only: one fill per interval instead of one per step)."""

    def __init__(self, width: int, capacity: int, device: torch.device, nan_from: int | None = None):
        self.width = check_int("width", width, 0)
        self.capacity = check_int("capacity", capacity, 1)
        self.device = torch.device(device)
        self._buf = torch.empty((capacity, width), dtype=torch.float32, device=self.device)
        self._steps: list[int] = []
        # CPU: the same memory as a numpy array, for rows written on the host (the host backend writes rows in place)
        self.host_view = self._buf.numpy() if self.device.type == "cpu" else None
        self._nan_from = None if nan_from is None else check_int("nan_from", nan_from, 0)
        self._reset()

    def _reset(self) -> None:
        if self._nan_from is not None and self._nan_from < self.width:
            self._buf[:, self._nan_from:].fill_(float("nan"))

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
        if n == 0:
            return [], np.empty((0, self.width), np.float32)
        if rows is not None and len(rows) != n:
            raise ValueError(f"rows holds {len(rows)} rows, {n} are pending")
        steps, self._steps = self._steps, []
        if rows is not None:
            out = np.array(rows, np.float32)  # a copy: the buffer is reused
        elif self.host_view is not None:
            out = self.host_view[:n].copy()  # host memory: a copy, not a read back
        else:
            out = self._buf[:n].cpu().numpy().copy()  # host sync: once per flush interval
        self._reset()
        return steps, out


class RowWriter:
    """Writes one step's row into a ``StepBuffer`` from backend values (the record arrow).

    Host backend: numpy assignments into the buffer's host memory.  Device backend:
    a constant handful of tensor ops on the device (no read back).
    """

    def __init__(self, buffer: StepBuffer, names: list[str], xp):
        self.buffer, self.xp, self.names = buffer, xp, list(names)
        self.n = len(self.names)
        self._index = {n: i for i, n in enumerate(self.names)}
        self._lr_cache: tuple = (None, None)
        dev = buffer.device
        self._nan = torch.full((), float("nan"), device=dev)
        self._zero = torch.zeros((), device=dev)

    def write(self, step: int, stats, d, coef, skipped, loss, lr, measured) -> None:
        """``measured``: on a step that measures them, the parameters' and the watched buffers'
        statistics (``param_stats``; the second None without buffers), else None."""
        buf, n = self.buffer, self.n
        params, buffers = measured if measured is not None else (None, None)
        pend = G + 3 * n  # the parameter-norm block ends there, the buffers' begins
        k = len(buf)
        missing = len(stats.names) != n
        if self.xp.on_host:
            row = buf.host_view[k]
            with np.errstate(over="ignore", invalid="ignore"):
                row[:G] = (d.bad, skipped, np.nan if loss is None else loss, d.loss_bad, stats.total,
                           coef, lr if not isinstance(lr, torch.Tensor) else float(lr),
                           np.nan if params is None else params.total)
                sumsq, max_abs = stats.host("sumsq"), stats.host("max_abs")
                if not missing:
                    if sumsq is not None:  # sqrt straight into the row: no temporary
                        np.sqrt(sumsq, out=row[G:G + n], casting="unsafe")
                    else:
                        row[G:G + n] = stats.host("norms")
                    row[G + n:G + 2 * n] = max_abs
                else:  # layers without a gradient this step: NaN norm, 0 max|g|
                    norms = stats.host("norms")
                    idx = np.fromiter(map(self._index.__getitem__, stats.names), np.intp, len(stats.names))
                    row[G:G + n] = np.nan
                    row[G + n:G + 2 * n] = 0
                    row[G + idx] = norms
                    row[G + n + idx] = max_abs
                # otherwise NaN from the buffer's fill at the last drain
                for st, out in ((params, row[G + 2 * n:pend]), (buffers, row[pend:])):
                    if st is None:
                        continue
                    if (p_sumsq := st.host("sumsq")) is not None:
                        np.sqrt(p_sumsq, out=out, casting="unsafe")
                    else:
                        out[:] = st.host("norms")
        else:
            row = buf.next_row()
            f32 = torch.float32
            dev = buf.device
            lr_t = self._lr(lr, dev)
            bad = d.bad.to(f32)
            torch.stack([t.to(f32) for t in (
                bad, bad if skipped is d.bad else skipped, self._nan if loss is None else loss,
                d.loss_bad, stats.total, coef, lr_t, self._nan if params is None else params.total)],
                out=row[:G])
            if not missing:
                self._norms_into(row[G:G + n], stats)
                row[G + n:G + 2 * n].copy_(stats.max_abs_raw)
            else:
                row[G:G + n].fill_(float("nan"))
                row[G + n:G + 2 * n].zero_()
                idx = _index_tensor(tuple(self._index[name] for name in stats.names), dev)
                row[G:G + n].index_copy_(0, idx, stats.norms.to(f32))
                row[G + n:G + 2 * n].index_copy_(0, idx, stats.max_abs.to(f32))
            if params is not None:  # otherwise NaN from the buffer's fill at the last drain
                self._norms_into(row[G + 2 * n:pend], params)
            if buffers is not None:
                self._norms_into(row[pend:], buffers)
        buf.commit(step)

    @staticmethod
    def _norms_into(out, stats) -> None:
        sumsq = stats.device_sumsq
        if sumsq is not None:  # the norms straight into the row: one kernel
            torch.sqrt(sumsq, out=out)
        else:
            out.copy_(stats.norms)

    def _lr(self, lr, dev):
        if isinstance(lr, torch.Tensor):
            return lr.detach().to(dev, torch.float32).reshape(())
        if lr != self._lr_cache[0]:  # a new lr: one fill, no host-to-device copy
            self._lr_cache = (lr, torch.full((), float(lr), device=dev))
        return self._lr_cache[1]
