"""Extra places the recorder writes to, next to the run store.

A sink has ``open(run_name, layers, config)``, ``write_steps(steps, rows,
global_cols)``, ``write_events(events)`` and ``close()``; the recorder calls
them on its writer thread and counts (never raises) their failures.

    rec = guard.recorder                       # Guard(..., log_dir=...)
    rec.add_sink(TensorBoardSink("tb_logs"))
"""
from .tensorboard import TensorBoardSink

__all__ = ["TensorBoardSink"]
