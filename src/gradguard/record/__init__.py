"""Recording: device step buffer -> background writer -> SQLite run store -> readers.

- ``StepBuffer``: per-step rows kept on the device, read back once per flush.
- ``open_recorder`` / ``Recorder``: queue rows and events, write them on a thread.
- ``RunStore``: read-only queries (runs, layers, downsampled series, events).

The guard imports ``record.buffer`` on every ``import gradguard``; the writer
and the store (sqlite3, threads, schema) are loaded only when one of their
names is first used, e.g. by ``Guard(log_dir=...)``.
"""
import importlib

from .buffer import StepBuffer

__all__ = ["StepBuffer", "Recorder", "open_recorder", "RunStore", "RunNotFound", "RunUnreadable",
           "SCHEMA_VERSION"]

# name -> submodule that defines it
_LAZY = {"Recorder": "writer", "open_recorder": "writer", "RunStore": "store", "RunNotFound": "store",
         "RunUnreadable": "store",          "SCHEMA_VERSION": "schema"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
