"""Weights & Biases sink (works offline): global values as scalars, per-layer norms summarised.

Each kept row becomes one ``run.log`` with, under ``gradguard/``: the global
columns (loss, global_norm, clip_coef, skipped, lr, ...; NaN/Inf left out),
``layer_log10_norm`` (a ``wandb.Histogram`` over all layers),
``layer_norm_{min,p50,p90,max}``, ``nonfinite_layers`` and
``top/<layer>`` for the row's ``top_k`` largest layers, never one series per
parameter per step.  Everything is plotted against ``gradguard/step``
(``define_metric``), so the sink never fights the run's own ``_step``.
Events are logged as text (``gradguard/event``) at their step, counted in
the run summary and, on close, written as one ``wandb.Table``.

``wandb`` is imported when the sink opens (the ``[wandb]`` extra; from a checkout
``pip install -e ".[wandb]"``).
For offline use set ``WANDB_MODE=offline`` or pass ``mode="offline"``; no
login or network is then needed, and ``wandb sync`` uploads later.
"""
from __future__ import annotations

import numpy as np

from .._extras import require
from .._validate import check_int
from ._summary import check_common, event_text, summarise_row

__all__ = ["WandbSink"]

MAX_EVENTS = 10_000   # kept in memory for the closing table; later ones are only logged


class WandbSink:
    """Write the guard's rows to a W&B run.

    Args:
        project: W&B project (None: W&B's default / ``WANDB_PROJECT``).
        top_k: how many of the row's largest layers get their own series.
        every: log every ``every``-th step (W&B is slow per call; use e.g. 10 on long runs).
        hist_bins: bins of the per-step log10-norm histogram (0 disables it).
        run: an existing ``wandb`` run to log into (not finished on close);
            None creates a run named after the gradguard run.
        **init_kwargs: passed to ``wandb.init`` (``mode="offline"``, ``dir``,
            ``group``, ``tags``, ...).

    Example:
        >>> guard = gg.Guard(model, opt, log_dir="gradguard-runs",
        ...                  sinks=[WandbSink("my-project", mode="offline", dir="wandb_logs")])
    """

    name = "wandb"

    def __init__(self, project: str | None = None, top_k: int = 5, every: int = 1, hist_bins: int = 32,
                 run=None, **init_kwargs):
        require("WandbSink", "wandb", "wandb")
        top_k, every = check_common(top_k, every)
        if check_int("hist_bins", hist_bins, 0) > 512:
            raise ValueError(f"hist_bins must be an int in [0, 512], got {hist_bins!r}")
        if project is not None and not isinstance(project, str):
            raise TypeError(f"project must be a str or None, got {type(project).__name__}")
        self.project = project
        self.top_k = top_k
        self.every = every
        self.hist_bins = hist_bins
        self.run = run
        self._own = run is None
        self.init_kwargs = init_kwargs
        self.names: list[str] = []
        self.events: list = []
        self.n_events = 0

    def open(self, run_name: str, layers: list[dict], config: dict) -> None:
        import wandb

        self._wandb = wandb
        self.names = [str(l["name"]) for l in layers]
        if self._own:
            kw = {"project": self.project, "name": run_name, "reinit": "create_new",
                  "config": {"gradguard": config, "gradguard_layers": len(layers)}}
            kw.update(self.init_kwargs)
            # No console capture or system sampling: the sink is a logger, not the run's owner.
            kw.setdefault("settings", wandb.Settings(console="off", x_disable_stats=True, silent=True))
            self.run = wandb.init(**kw)
        self.run.define_metric("gradguard/step")
        self.run.define_metric("gradguard/*", step_metric="gradguard/step")

    def write_steps(self, steps, rows, global_cols) -> None:
        G, L = len(global_cols), len(self.names)
        for step, row in zip(steps, rows):
            step = int(step)
            if step % self.every:
                continue
            d = {"gradguard/step": step}
            for c, v in zip(global_cols, row[:G]):
                if np.isfinite(v):
                    d[f"gradguard/{c}"] = float(v)
            norms, scal, top = summarise_row(row, G, L, self.top_k)
            d.update({f"gradguard/{k}": v for k, v in scal.items()})
            pos = norms[norms > 0]
            if self.hist_bins and len(pos):
                d["gradguard/layer_log10_norm"] = self._wandb.Histogram(
                    np_histogram=np.histogram(np.log10(pos), bins=self.hist_bins))
            for i in top:
                d[f"gradguard/top/{self.names[i]}"] = float(row[G + i])
            self.run.log(d)

    def write_events(self, events) -> None:
        for e in events:
            self.run.log({"gradguard/step": int(e.step), "gradguard/event": event_text(e)})
            self.n_events += 1
            if len(self.events) < MAX_EVENTS:
                self.events.append(e)
        self.run.summary["gradguard/n_events"] = self.n_events

    def close(self) -> None:
        if self.run is None:
            return
        try:
            if self.events:
                table = self._wandb.Table(columns=["step", "severity", "kind", "layers", "message", "advice"])
                for e in self.events:
                    table.add_data(int(e.step), str(e.severity), str(e.kind), ", ".join(map(str, e.layers)),
                                   str(e.message), "\n".join(map(str, e.advice)))
                self.run.log({"gradguard/events": table})
        finally:
            if self._own:
                self.run.finish()
