"""Helpers shared by the adaptive policies."""
from __future__ import annotations


import torch
from torch import Tensor

from .._validate import check_int, check_open_unit
from ..stats import GradStats

# ------------------------------------------------------------------ helpers


def _state_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _ok(stats: GradStats) -> Tensor:
    """() bool on the stats device: this step may enter the statistics."""
    return ~stats.bad


def _load_tensor(sd: dict, key: str, like: Tensor | None = None) -> Tensor:
    if key not in sd:
        raise ValueError(f"state_dict: missing key {key!r}")
    t = sd[key]
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t)
    t = t.detach().clone()
    if like is not None and t.shape != like.shape:
        raise ValueError(f"state_dict: {key!r} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
    return t



_check_open_unit = check_open_unit
_check_int = check_int
