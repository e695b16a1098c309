"""The step decision: statistics -> (poisoned? held? clip coefficient? skip?).

This is where the skip is decided, for every device: ``decide``.  It is written
once against an array backend (``backend.py``): numpy scalars on CPU, 0-dim
device tensors on accelerators, so nothing is read back to the host here.  The
result is a value (``Decision``) handed to the stepping strategy (``apply.py``)
and to the row writer; nothing reads it back out of a row.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from .backend import Backend

__all__ = ["Decision", "decide", "loss_value", "StepReport", "ON_NONFINITE"]

ON_NONFINITE = ("skip", "raise", "warn")  # what a poisoned step does


@dataclass(slots=True)  # (frozen dataclasses cost 5x to build: this is made every step)
class Decision:
    """What to do with one step, as arrays of one backend.

    Attributes:
        bad: () bool, a gradient or the loss held NaN/Inf (agreed across ranks).
        loss_bad: () bool, the loss alone was NaN/Inf (False without a loss).
        held: a remedy withholds this step (a host bool: the guard's own counter).
        skip: () bool, withhold the optimizer step.
        may_skip: whether ``skip`` can be true at all (known on the host without a
            read: ``on_nonfinite="skip"`` or a held step).  A stepping strategy
            never reads ``skip`` when this is False.
        coef: () the clipping coefficient for every gradient, or None when the
            policy is not one scalar (it then clips in place at apply time) or
            there is no policy.
    """

    bad: Any
    loss_bad: Any
    held: bool
    skip: Any
    may_skip: bool
    coef: Any


def loss_value(loss, xp: Backend, like) -> tuple[Any, Any]:
    """``(loss, loss_bad)`` in backend ``xp`` (float32, like the row), or ``(None, None)``.

    ``like``: a backend array on the statistics' device (a device loss is moved there
    without a sync).  Errors name ``loss``.
    """
    if loss is None:
        return None, None
    if isinstance(loss, Tensor):
        if loss.is_complex() or not (loss.is_floating_point() or loss.dtype in _INT_DTYPES):
            raise TypeError(f"loss must be a real number or a real tensor, got a {loss.dtype} tensor")
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        if loss.is_meta:
            raise ValueError("loss is on the meta device: pass the computed loss")
        if xp.on_host:
            v = _f32(loss.item())  # host sync: the loss value (CPU: host memory)
        else:
            v = loss.detach().reshape(()).to(like.device, torch.float32, non_blocking=True)
    elif isinstance(loss, numbers.Real) and not isinstance(loss, (bool, np.bool_)):
        try:
            f = float(loss)
        except OverflowError:
            raise ValueError(f"loss is too large for a float: {loss!r}") from None
        v = _f32(f)
        if not xp.on_host:
            v = torch.full((), float(v), dtype=torch.float32, device=like.device)
    else:
        raise TypeError(f"loss must be a Tensor or a real number, got {type(loss).__name__}")
    if xp.on_host:
        return v, np.bool_(not math.isfinite(v))
    return v, (v - v) != 0  # NaN/Inf, in two kernels (see backend.nonfinite)


_F32_MAX = float(np.finfo(np.float32).max)


def _f32(f: float) -> np.float32:
    """``f`` as float32, Inf beyond its range (as a tensor's cast gives), without numpy's
    overflow warning and without paying for a warning context on ordinary values."""
    if abs(f) <= _F32_MAX or f != f:
        return np.float32(f)
    with np.errstate(over="ignore"):
        return np.float32(f)


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def decide(stats, loss_bad, *, held: bool, skip_nonfinite: bool, clip, grads: list[Tensor],
           agree: Callable | None = None, scaler: bool = False):
    """The decision for one step, and the statistics the policy saw (vetoed).

    Args:
        stats: this step's ``GradStats`` (its backend is the decision's).
        loss_bad: () bool from ``loss_value``, or None without a loss.
        held: a remedy withholds this step.
        skip_nonfinite: ``on_nonfinite == "skip"``.
        clip: the ``ClipPolicy`` or None.
        grads: the gradients the policy clips (local shards under FSDP2).
        agree: ``bad -> bad`` over all ranks (distributed), or None.
        scaler: a GradScaler steps the optimizer: it skips a step whose gradients are
            non-finite whatever ``on_nonfinite`` says, so such a step is a skip here too
            (the record, the report, the scheduler and the EMA must not count it).
    Returns:
        ``(Decision, stats)``: policies see the guard's verdict through
        ``stats.flag``, so a step that will not be applied (NaN loss, another
        rank's NaN, a held step) never enters their statistics.
    """
    xp = stats.xp
    bad = grads_bad = stats.flag
    if loss_bad is not None:
        bad = bad | loss_bad
    if agree is not None:
        bad = agree(bad)
    stats = stats.with_veto(bad | held if held else bad)
    coef = clip.coefficient(grads, stats) if clip is not None else None
    if held:
        skip = xp.flag(True, bad)
    elif skip_nonfinite:
        skip = bad
    elif scaler:
        skip = grads_bad
    else:
        skip = xp.flag(False, bad)
    no_loss_flag = loss_bad is None
    return Decision(bad=bad, loss_bad=xp.flag(False, bad) if no_loss_flag else loss_bad, held=held,
                    skip=skip, may_skip=held or skip_nonfinite or scaler, coef=coef), stats


class StepReport:
    """What ``guard.step()`` (or ``guard.check()``) did.  Values are read on access.

    Attributes:
        step: the 0-based step index (skipped steps count).
        stats: the step's ``GradStats`` (pre-clip).
        global_norm: pre-clip global L2 norm (float).
        clip_coef: smallest coefficient the policy applied (1.0 = untouched).
        skipped: whether the optimizer step was withheld.
        applied: whether the update was applied (``not skipped``): step an LR
            scheduler or an EMA only when it was.
        loss: the loss passed in (float), or None.
    Each float attribute has a tensor twin (``global_norm_t``, ``clip_coef_t``,
    ``skipped_t``, ``loss_t``); on an accelerator reading a float is a host sync.
    """

    __slots__ = ("step", "stats", "_coef", "_skip", "_loss", "_xp")

    def __init__(self, step: int, stats, coef, skipped, loss, xp: Backend):
        self.step, self.stats = step, stats
        self._coef, self._skip, self._loss, self._xp = coef, skipped, loss, xp

    global_norm_t = property(lambda self: self.stats.global_norm)
    clip_coef_t = property(lambda self: self._xp.tensor(self._coef))
    skipped_t = property(lambda self: self._xp.tensor(self._skip))
    loss_t = property(lambda self: None if self._loss is None else self._xp.tensor(self._loss))

    @property
    def global_norm(self) -> float:
        return float(self.stats.total)  # host sync: only when the caller reads it

    @property
    def clip_coef(self) -> float:
        return float(self._coef)  # host sync: only when the caller reads it

    @property
    def skipped(self) -> bool:
        return bool(self._skip)  # host sync: only when the caller reads it

    @property
    def applied(self) -> bool:
        return not self.skipped

    @property
    def loss(self) -> float | None:
        return None if self._loss is None else float(self._loss)  # host sync: on read

    def __repr__(self) -> str:
        return (f"StepReport(step={self.step}, global_norm={self.global_norm:.4g}, "
                f"clip_coef={self.clip_coef:.4g}, skipped={self.skipped})")
