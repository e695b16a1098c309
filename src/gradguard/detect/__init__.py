"""Detectors: turn recorded step rows into events.

Detectors read host-side rows (one per step, drained from the device buffer
once per flush interval) and return ``Event`` objects.  They never change the
model or the optimizer; actions live in ``act.py``.

A detector has ``bind(run)``, ``update(steps, rows, run) -> list[Event]`` and
``state_dict()`` / ``load_state_dict()``; ``run`` is a ``gradguard.layout.RunInfo``
and rows are numpy float32 in the ``gradguard.layout`` format.  All numbers are
the PRE-clip ones.  Running statistics only ever absorb finite values.

Event kinds: ``"spike"``, ``"exploding"``, ``"loss_spike"``, ``"vanishing"``,
``"weight_growth"``, ``"over_clipping"``, ``"unused"``, ``"diverging"``, ``"running_stats"`` (plus ``"nonfinite"`` /
``"amp_overflow"`` from ``nonfinite_event``).  Every threshold is a constructor
argument; defaults are in docs/detection.md.
"""
from __future__ import annotations

from .._json import array_to_list as _to_list, list_to_array as _from_list
from ..advice import (ACT_ADVICE, BATCH_ADVICE, CLIP_ADVICE, INIT_ADVICE, L2_ADVICE, LR_ADVICE,
                      NONFINITE_ADVICE, NORM_ADVICE, RECUR_INIT_ADVICE, RNN_ADVICE, ROLLBACK_ADVICE,
                      TBPTT_ADVICE, advice_for)
from .base import Detector
from .divergence import DivergenceDetector
from .exploding import ExplodingDetector
from .loss_spike import LossSpikeDetector
from .nonfinite import NonfiniteRepeats, nonfinite_event
from .over_clipping import OverClippingDetector
from .poisoned import DeadRunBudget, PoisonedRunDetector
from .running_stats import RunningStatsDetector
from .spike import SpikeDetector
from .unused import UnusedDetector
from .vanishing import VanishingDetector
from .weight_growth import WeightGrowthDetector

__all__ = [
    "nonfinite_event", "NonfiniteRepeats", "NONFINITE_ADVICE", "Detector", "SpikeDetector", "ExplodingDetector",
    "LossSpikeDetector", "VanishingDetector", "WeightGrowthDetector", "OverClippingDetector",
    "UnusedDetector", "DivergenceDetector", "PoisonedRunDetector", "RunningStatsDetector", "DeadRunBudget", "default_detectors", "advice_for",
]

# Kept importable from here for one release (guard.py and older code import them).
_COMPAT = (_to_list, _from_list, ACT_ADVICE, BATCH_ADVICE, CLIP_ADVICE, INIT_ADVICE, L2_ADVICE, LR_ADVICE,
           NORM_ADVICE, RECUR_INIT_ADVICE, RNN_ADVICE, ROLLBACK_ADVICE, TBPTT_ADVICE)


def _module_types(guard) -> tuple[dict[str, str], set[str]]:
    """Parameter name -> owning module type name, and all module type names (old helper;
    ``RunInfo.describe`` computes the same, as ``run.owner`` / ``run.module_types``)."""
    model = getattr(guard, "model", None)
    if model is None:
        return {}, set()
    mods = dict(model.named_modules())
    owner = {n: type(mods[n.rpartition(".")[0]]).__name__ for n in guard.names if n.rpartition(".")[0] in mods}
    return owner, {type(m).__name__ for m in mods.values()}


# Appended to the defaults after the first version's seven: a guard state saved without them
# still loads (they start fresh).
ADDED_DEFAULTS = (DivergenceDetector, PoisonedRunDetector, RunningStatsDetector)


def default_detectors() -> list[Detector]:
    """The detectors a ``Guard`` uses when ``detectors=None`` (pass ``[]`` for none)."""
    return [SpikeDetector(), ExplodingDetector(), LossSpikeDetector(), VanishingDetector(),
            WeightGrowthDetector(), OverClippingDetector(), UnusedDetector(), DivergenceDetector(),
            PoisonedRunDetector(), RunningStatsDetector()]
