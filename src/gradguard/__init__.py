"""gradguard: watch, explain and fix exploding / vanishing gradients in PyTorch.

    import gradguard as gg
    guard = gg.Guard(model, optimizer, clip=gg.GlobalNorm(1.0), on_nonfinite="skip")
    ...
    loss.backward()
    report = guard.step(loss=loss)      # replaces optimizer.step()
"""
import importlib

from .adaptive import AGC, AdaGC, AutoClip, ZClip
from .clip import ClipPolicy, GlobalNorm, PerLayer, PerTensorNorm, Value, clip_grad_norm_, clip_grad_value_
from .detect import (Detector, DivergenceDetector, ExplodingDetector, LossSpikeDetector, OverClippingDetector,
                     PoisonedRunDetector, RunningStatsDetector, SpikeDetector, UnusedDetector, VanishingDetector,
                     WeightGrowthDetector, default_detectors)
from .events import Event, NonFiniteGradientError, RunIsDeadError
from .remedies import Autopilot, FlightRecorder, GuardAlarm, LRBackoff, Raise, Rollback, Skip
from .training import detach_hidden, penalty, tbptt
from .guard import Guard, StepReport
from .watch import watch
from .stats import GradStats, grad_stats

__version__ = "0.1.0"

__all__ = [
    "Guard", "StepReport", "watch", "GradStats", "grad_stats",
    "ClipPolicy", "GlobalNorm", "PerTensorNorm", "Value", "PerLayer",
    "AutoClip", "AGC", "ZClip", "AdaGC",
    "clip_grad_norm_", "clip_grad_value_",
    "Event", "NonFiniteGradientError", "RunIsDeadError",
    "Detector", "SpikeDetector", "ExplodingDetector", "LossSpikeDetector", "VanishingDetector",
    "WeightGrowthDetector", "OverClippingDetector", "UnusedDetector", "DivergenceDetector",
    "PoisonedRunDetector", "RunningStatsDetector", "default_detectors",
    "Skip", "LRBackoff", "Rollback", "Autopilot", "FlightRecorder", "Raise", "GuardAlarm",
    "penalty", "tbptt", "detach_hidden", "RunStore", "diagnose", "Diagnosis", "Finding",
]

# Public names loaded on first use (name -> defining module), so that `import gradguard`
# loads neither the tools (gradguard.tools) nor the run store's reader.
_LAZY = {
    "diagnose": "gradguard.tools.diagnose",
    "Diagnosis": "gradguard.tools.diagnose",
    "Finding": "gradguard.tools.diagnose",
    "RunStore": "gradguard.record.store",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'gradguard' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
