"""TensorBoard sink: global values as scalars, per-layer norms summarised.

Per step: ``gradguard/<global>`` scalars (loss, global_norm, clip_coef,
skipped, lr, ...), one histogram ``gradguard/layer_log10_norm`` of every
layer's log10 gradient norm, and ``gradguard/top/<layer>`` scalars for the
``top_k`` largest layers of that step, not one scalar per parameter per
step.  Events go in as text.  ``torch.utils.tensorboard`` is imported when
the sink opens.
"""
from __future__ import annotations

import numpy as np

from .._extras import require
from ._summary import check_common

__all__ = ["TensorBoardSink"]


class TensorBoardSink:
    """Write the guard's rows to TensorBoard event files.

    Args:
        log_dir: TensorBoard directory; the run name is appended as a subdirectory.
        top_k: how many of the step's largest layers get their own scalar.
        every: write every ``every``-th row (histograms are the bulky part).

    Example:
        >>> guard = gg.Guard(model, opt, log_dir="gradguard-runs")
        >>> guard.recorder.add_sink(TensorBoardSink("tb"))
    """

    name = "tensorboard"

    def __init__(self, log_dir, top_k: int = 5, every: int = 1):
        require("TensorBoardSink", "tensorboard", "tensorboard")  # torch.utils.tensorboard needs it
        self.top_k, self.every = check_common(top_k, every)
        self.log_dir = log_dir
        self.writer = None
        self.names: list[str] = []

    def open(self, run_name: str, layers: list[dict], config: dict) -> None:
        import os

        from torch.utils.tensorboard import SummaryWriter

        self.names = [str(l["name"]) for l in layers]
        self.writer = SummaryWriter(os.path.join(os.fspath(self.log_dir), run_name))

    def write_steps(self, steps, rows, global_cols) -> None:
        w = self.writer
        G, L = len(global_cols), len(self.names)
        for step, row in zip(steps, rows):
            step = int(step)
            if step % self.every:
                continue
            for c, v in zip(global_cols, row[:G]):
                if np.isfinite(v):
                    w.add_scalar(f"gradguard/{c}", float(v), step)
            norms = row[G:G + L].astype(np.float64)
            fin = np.isfinite(norms) & (norms > 0)
            if fin.any():
                w.add_histogram("gradguard/layer_log10_norm", np.log10(norms[fin]), step)
            w.add_scalar("gradguard/nonfinite_layers", float((~np.isfinite(row[G + L:G + 2 * L])).sum()), step)
            if self.top_k:
                ranked = np.where(np.isfinite(norms), norms, -np.inf).argsort()[::-1][:self.top_k]
                for i in ranked:
                    if np.isfinite(norms[i]):
                        w.add_scalar(f"gradguard/top/{self.names[i]}", float(norms[i]), step)

    def write_events(self, events) -> None:
        for e in events:
            self.writer.add_text("gradguard/events", f"**{e.severity} {e.kind}**: {e.message}", int(e.step))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
