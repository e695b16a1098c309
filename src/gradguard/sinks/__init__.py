"""Extra places the recorder writes to, next to the run store.

A sink has ``open(run_name, layers, config)``, ``write_steps(steps, rows,
global_cols)``, ``write_events(events)`` and ``close()``; the recorder calls
them on its writer thread and counts (never raises) their failures.

    rec = guard.recorder                       # Guard(..., log_dir=...)
    rec.add_sink(TensorBoardSink("tb_logs"))

``TensorBoardSink``, ``WandbSink`` and ``MlflowSink`` need the
``[tensorboard]`` / ``[wandb]`` / ``[mlflow]`` extras: a missing one is named
when the sink is made; the framework itself is imported only when it opens.
"""
from .mlflow import MlflowSink
from .tensorboard import TensorBoardSink
from .wandb import WandbSink

__all__ = ["TensorBoardSink", "WandbSink", "MlflowSink"]
