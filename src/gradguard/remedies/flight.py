"""FlightRecorder: on an event, dump what is needed to understand and replay the step."""
from __future__ import annotations

import io
import pickle
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import torch

from .._validate import check_int
from ..layout import GLOBAL_COLS
from .actions import Action
from .rollback import to_cpu

__all__ = ["FlightRecorder", "DUMP_VERSION"]

DUMP_VERSION = 1


class FlightRecorder(Action):
    """On an event, dump what is needed to understand and replay the step.

    The dump (``DIR/flight-<step>-<kind>.pt``, a ``torch.save`` file) holds:
    the last ``keep`` rows of step statistics (global + per-layer), the
    events, the model and optimizer state (cloned when the dump is written:
    the pre-step state of a skipped step on CPU; on an accelerator the state
    may be up to ``flush_every - 1`` steps later, ``exact`` says which), the
    offending batch (when ``guard.step(loss, batch=...)`` was given it; the
    recorder keeps references to the batches of the current flush interval, no copy),
    the model object (pickled, when it pickles) and ``loss_fn``.

    ``gradguard replay DUMP`` re-runs the step under anomaly detection.

    Args:
        directory: where dumps go.
        keep: steps of statistics kept (default 64).
        max_dumps: dumps written at most (default 5).
        loss_fn: ``loss_fn(model, batch) -> loss`` used by replay (a
            module-level function, so it pickles); None: replay uses
            ``model(*batch)`` summed.
        save_model: pickle the model object into the dump (default True).
    """

    def __init__(self, directory, keep: int = 64, max_dumps: int = 5, loss_fn=None,
                 save_model: bool = True):
        self.keep = check_int("keep", keep, 1)
        self.max_dumps = check_int("max_dumps", max_dumps, 0)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable(model, batch) or None, got {type(loss_fn).__name__}")
        self.directory = Path(directory)
        self.loss_fn, self.save_model = loss_fn, save_model
        self.dumps: list[str] = []
        self._steps: deque = deque(maxlen=keep)
        self._rows: deque = deque(maxlen=keep)
        # References to the batches of the steps not yet handled: the events of a
        # flush name its steps, so once the next step starts they can go.
        self._batches: deque = deque()
        self._handled = -1  # last step of the last flush

    def on_step(self, step, batch):
        if step <= self._handled:  # the guard was loaded back to an earlier step
            self._batches.clear()
            self._handled = -1
        while self._batches and self._batches[0][0] <= self._handled:
            self._batches.popleft()
        if batch is not None:
            self._batches.append((step, batch))

    def on_flush(self, ctx, steps, rows, events):
        if len(steps):
            self._handled = int(steps[-1])
            self._steps.extend(steps)
            self._rows.extend(rows)

    def _batch_of(self, step):
        for s, b in self._batches:
            if s == step:
                return to_cpu(b)
        return None

    def __call__(self, event, ctx, exact: bool | None = None):
        path = self.directory / f"flight-{event.step:08d}-{event.kind}.pt"
        if len(self.dumps) >= self.max_dumps or str(path) in self.dumps:
            # (with on_nonfinite="raise" the event is dumped, exactly, before the error and then
            # dispatched at the flush: the second call would overwrite the exact dump)
            return None
        now = ctx.steps
        if exact is None:  # the weights are the pre-step ones only if nothing moved them since
            exact = bool(event.data.get("skipped")) and now == event.step + 1
        names = list(ctx.names)
        width = ctx.run.layout.width
        dump = {
            "version": DUMP_VERSION, "step": event.step, "event": event.to_dict(),
            "names": names, "buffers": list(ctx.run.buffers), "global_cols": list(GLOBAL_COLS),
            "steps": list(self._steps),
            "rows": torch.from_numpy(np.asarray(list(self._rows), np.float32).reshape(len(self._rows), width)),
            "state_step": now, "exact": exact,
            "batch": self._batch_of(event.step), **ctx.capture(),
            "model_pickle": None, "loss_fn": None,
        }
        if self.save_model and ctx.model is not None:
            dump["model_pickle"] = _try_pickle(ctx.model)
        if self.loss_fn is not None:
            dump["loss_fn"] = _try_pickle(self.loss_fn)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            torch.save(dump, path)
        except Exception as exc:  # a failing dump never crashes training
            warnings.warn(f"gradguard: flight record not written: {exc}", RuntimeWarning, stacklevel=2)
            return None
        self.dumps.append(str(path))
        return f"flight record written to {path}"

    def state_dict(self):
        return {"dumps": list(self.dumps)}

    def load_state_dict(self, sd):
        self.dumps = list(sd["dumps"])

    def __repr__(self) -> str:
        return f"FlightRecorder({str(self.directory)!r}, keep={self.keep}, max_dumps={self.max_dumps})"


def _try_pickle(obj) -> bytes | None:
    buf = io.BytesIO()
    try:
        torch.save(obj, buf)  # pickles the class by reference; fails for lambdas / local classes
    except (pickle.PicklingError, AttributeError, TypeError):
        return None
    return buf.getvalue()
