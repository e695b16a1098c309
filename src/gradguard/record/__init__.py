"""Recording: device step buffer -> background writer -> SQLite run store -> readers.

- ``StepBuffer``: per-step rows kept on the device, read back once per flush.
- ``open_recorder`` / ``Recorder``: queue rows and events, write them on a thread.
- ``RunStore``: read-only queries (runs, layers, downsampled series, events).
"""
from .buffer import StepBuffer
from .schema import SCHEMA_VERSION
from .store import RunNotFound, RunStore
from .writer import Recorder, open_recorder

__all__ = ["StepBuffer", "Recorder", "open_recorder", "RunStore", "RunNotFound", "SCHEMA_VERSION"]
