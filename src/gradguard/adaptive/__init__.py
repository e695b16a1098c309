"""Adaptive clipping policies: thresholds learned from the run's own gradients.

- ``AutoClip``: global norm clipped to a percentile of the norms seen so far
  (Seetharaman et al. 2020).
- ``AGC``: unit-wise clipping relative to the weight norm (Brock et al. 2021).
- ``ZClip``: z-score spike clipping against an EMA mean/variance of the
  global norm (Kumar et al. 2025).
- ``AdaGC``: per-tensor clipping to a ratio of each tensor's EMA norm
  (Wang et al. 2025; OLMo's optimizer does the same).

All are ``ClipPolicy`` objects: usable as ``clip=`` of ``gg.Guard`` and inside
``gg.PerLayer``.  Their statistics live in device tensors and are updated with
``torch.where``, never a Python ``if`` on a tensor, so a step costs no host
sync.  A step whose gradients hold NaN/Inf (or whose norm overflows) is left
untouched (coefficient 1, as ``GlobalNorm``) and never enters a statistic:
the published zclip package keeps a NaN mean forever after one bad step.
Statistics are kept in float64 (float32 on MPS): a finite 1e30 norm squared
still fits, so a huge-but-finite spike cannot overflow a variance.
"""
from __future__ import annotations

from .adagc import AdaGC
from .agc import AGC
from .autoclip import AutoClip
from .zclip import ZClip

__all__ = ["AutoClip", "AGC", "ZClip", "AdaGC"]
