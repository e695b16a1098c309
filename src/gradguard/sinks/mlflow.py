"""MLflow sink: global values as metrics, per-layer norms summarised, events as text.

Per kept step, metrics under ``gradguard/``: the global columns (loss,
global_norm, clip_coef, skipped, lr, ...; NaN/Inf left out, MLflow cannot
plot them), ``layer_norm_{min,p50,p90,max}`` over all layers (MLflow has no
histogram type, so the histogram is summarised by its quantiles),
``nonfinite_layers`` and ``top/<layer>`` for the step's ``top_k`` largest
layers, never one metric per parameter per step.  Events: a metric
``gradguard/events`` (count at each event step), the tags
``gradguard.n_events`` / ``gradguard.last_event`` and the artifact
``gradguard/events.jsonl`` (rewritten as events arrive).  The run config
becomes params ``gradguard.<key>``.

Uses ``MlflowClient`` (never the fluent API), so the user's active run is
left alone.  ``mlflow`` (or ``mlflow-skinny``) is imported when the sink
opens (the ``[mlflow]`` extra; from a checkout ``pip install -e ".[mlflow]"``).
MLflow >= 3.x refuses the local file store (``file:`` URIs, ``./mlruns``) unless ``MLFLOW_ALLOW_FILE_STORE=true``
is set; a database URI (``sqlite:///mlflow.db``, needs full ``mlflow``) works as is.
"""
from __future__ import annotations

import json
import time

import numpy as np

from .._extras import require
from .._json import json_safe
from ._summary import check_common, event_text, metric_name, summarise_row

__all__ = ["MlflowSink"]

_BATCH = 1000          # MLflow's limit of metrics per log_batch call
_PARAM_LEN = 6000      # MLflow's limit of a param value


def _dumps(v) -> str:
    return json.dumps(json_safe(v), default=str, allow_nan=False)  # NaN as "NaN": valid JSON


class MlflowSink:
    """Write the guard's rows to an MLflow run.

    Args:
        tracking_uri: e.g. ``"file:///abs/mlruns"`` or ``"sqlite:///mlflow.db"``;
            None: MLflow's default (``MLFLOW_TRACKING_URI``).
        experiment: experiment name (created if missing), used when ``run_id`` is None.
        run_id: log into this existing run (not terminated on close);
            None creates a run named after the gradguard run.
        top_k: how many of the step's largest layers get their own metric.
        every: log every ``every``-th step.

    Example:
        >>> guard = gg.Guard(model, opt, log_dir="gradguard-runs",
        ...                  sinks=[MlflowSink("file:///tmp/mlruns", experiment="lstm")])
    """

    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str = "gradguard",
                 run_id: str | None = None, top_k: int = 5, every: int = 1):
        require("MlflowSink", "mlflow", "mlflow")
        top_k, every = check_common(top_k, every)
        for arg, v in (("tracking_uri", tracking_uri), ("run_id", run_id)):
            if v is not None and not isinstance(v, str):
                raise TypeError(f"{arg} must be a str or None, got {type(v).__name__}")
        if not isinstance(experiment, str) or not experiment:
            raise ValueError(f"experiment must be a non-empty str, got {experiment!r}")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_id = run_id
        self._own = run_id is None
        self.top_k = top_k
        self.every = every
        self.client = None
        self.names: list[str] = []
        self.events: list[dict] = []

    def open(self, run_name: str, layers: list[dict], config: dict) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.names = [metric_name(l["name"]) for l in layers]
        if self._own:
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(self.experiment)
            self.run_id = self.client.create_run(exp_id, run_name=run_name,
                                                 tags={"gradguard.run_name": run_name}).info.run_id
        params = {"gradguard.layers": len(layers)}
        params.update({f"gradguard.{metric_name(k)}": v for k, v in config.items()})
        params = [Param(k, (v if isinstance(v, str) else _dumps(v))[:_PARAM_LEN]) for k, v in params.items()]
        for a in range(0, len(params), 100):     # 100 params per batch at most
            self.client.log_batch(self.run_id, params=params[a:a + 100])

    def write_steps(self, steps, rows, global_cols) -> None:
        from mlflow.entities import Metric

        G, L = len(global_cols), len(self.names)
        ts = int(time.time() * 1000)
        out = []
        for step, row in zip(steps, rows):
            step = int(step)
            if step % self.every:
                continue
            for c, v in zip(global_cols, row[:G]):
                if np.isfinite(v):
                    out.append(Metric(f"gradguard/{c}", float(v), ts, step))
            _, scal, top = summarise_row(row, G, L, self.top_k)
            out += [Metric(f"gradguard/{k}", v, ts, step) for k, v in scal.items()]
            out += [Metric(f"gradguard/top/{self.names[i]}", float(row[G + i]), ts, step) for i in top]
        for a in range(0, len(out), _BATCH):
            self.client.log_batch(self.run_id, metrics=out[a:a + _BATCH])

    def write_events(self, events) -> None:
        from mlflow.entities import Metric, RunTag

        ts = int(time.time() * 1000)
        per_step: dict[int, int] = {}
        for e in events:
            per_step[int(e.step)] = per_step.get(int(e.step), 0) + 1
            self.events.append({"step": int(e.step), "kind": str(e.kind), "severity": str(e.severity),
                                "layers": [str(x) for x in e.layers], "message": str(e.message),
                                "advice": [str(x) for x in e.advice]})
        self.client.log_batch(
            self.run_id, metrics=[Metric("gradguard/events", float(n), ts, s) for s, n in per_step.items()],
            tags=[RunTag("gradguard.n_events", str(len(self.events))),
                  RunTag("gradguard.last_event", event_text(events[-1])[:5000])])
        # Events are rare: rewriting the whole file keeps it one readable artifact.
        self.client.log_text(self.run_id, "".join(json.dumps(d) + "\n" for d in self.events),
                             "gradguard/events.jsonl")

    def close(self) -> None:
        if self.client is not None and self._own and self.run_id is not None:
            self.client.set_terminated(self.run_id)
