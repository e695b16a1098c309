"""Moved to ``gradguard.buffer`` (kept for one release)."""
from ..buffer import StepBuffer  # noqa: F401

__all__ = ["StepBuffer"]
