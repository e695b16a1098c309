"""Extra places the recorder writes to, next to the run store.

A sink has ``open(run_name, layers, config)``, ``write_steps(steps, rows,
global_cols)``, ``write_events(events)`` and ``close()``; the recorder calls
them on its writer thread and counts (never raises) their failures.

    rec = guard.recorder                       # Guard(..., log_dir=...)
    rec.add_sink(TensorBoardSink("tb_logs"))

``WandbSink`` and ``MlflowSink`` need the ``wandb`` / ``mlflow`` extras; like
TensorBoard, the framework is imported only when the sink opens.
"""
from .mlflow import MlflowSink
from .tensorboard import TensorBoardSink
from .wandb import WandbSink

__all__ = ["TensorBoardSink", "WandbSink", "MlflowSink"]
