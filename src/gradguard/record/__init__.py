"""Recording: the device-side step buffer (and, later, the run store)."""
from .buffer import StepBuffer

__all__ = ["StepBuffer"]
