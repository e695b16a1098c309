"""Applying a decision: clip the gradients, then step the optimizer or withhold the step.

How the optimizer is stepped is chosen once, at construction (``stepper_for``):

- ``PlainStep``: any optimizer.  The clip coefficient is one ``_foreach_mul_``;
  a skip is ``optimizer.step()`` not being called (on an accelerator that needs
  one read of the flag per step, only when a skip is possible).
- ``FusedStep``: fused Adam/AdamW/SGD (``fused=True``).  The coefficient goes
  into the optimizer's own ``grad_scale`` and the skip into its ``found_inf``
  (the attributes GradScaler uses): no host sync, and no separate pass over the
  gradients for clipping.  On the host backend the decision is already a host
  number, so a skip simply does not call the optimizer.
- ``ScalerStep``: a ``torch.amp.GradScaler``; our skip joins its ``found_inf``.
- ``NoStep``: ``Guard.check()`` (framework adapters step themselves): clips in
  place and never steps.

Parameters and every optimizer-state tensor stay bitwise unchanged on a
withheld step.  ``_step`` is the one place that calls ``optimizer.step``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from .clip import _scale_

__all__ = ["Stepper", "PlainStep", "FusedStep", "ScalerStep", "NoStep", "stepper_for", "is_fused",
           "AfterApplied"]

_MISSING = object()


def is_fused(optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)
                and getattr(optimizer, "defaults", {}).get("fused", False))


def _step(opt, closure, scaler=None, **attrs) -> None:
    """``opt.step(closure)`` (through ``scaler`` if given) with attributes set for this
    call only (a fused optimizer's ``grad_scale`` / ``found_inf``), restored even if the
    step raises."""
    had = {a: getattr(opt, a, _MISSING) for a in attrs}
    for a, v in attrs.items():
        setattr(opt, a, v)
    try:
        if scaler is not None:
            scaler.step(opt) if closure is None else scaler.step(opt, closure)
        else:
            opt.step() if closure is None else opt.step(closure)
    finally:
        for a, v in had.items():
            if v is _MISSING:
                if hasattr(opt, a):  # GradScaler.step deletes the attributes itself
                    delattr(opt, a)
            else:
                setattr(opt, a, v)


class Stepper:
    """Clips per the decision, then steps or withholds.  ``apply`` returns the
    coefficient to record (backend scalar: the smallest one applied)."""

    def __init__(self, optimizer, scaler=None):
        self.optimizer = optimizer
        self.scaler = scaler

    def apply(self, d, clip, params: list[Tensor], grads: list[Tensor], stats, closure=None):
        raise NotImplementedError

    @staticmethod
    def _clip_in_place(d, clip, params, grads, stats):
        """The recorded coefficient; gradients scaled or clamped in place where needed."""
        xp = stats.xp
        if clip is None:
            return xp.scalar(1.0, stats.total)
        if d.coef is None:  # per tensor / element / unit: the policy clips
            coefs = clip.clip_(params, grads, stats)
            return xp.asarray(coefs.min() if coefs.numel() else coefs.new_ones(()))
        if xp.on_host:
            if d.coef != 1:  # x * 1 == x: a coefficient of 1 needs no pass over the gradients
                _scale_(grads, xp.tensor(d.coef))
        else:
            _scale_(grads, d.coef)  # clamped, never branched on (a branch would read it back)
        return d.coef

    @staticmethod
    def _read_skip(d) -> bool:
        return bool(d.skip)  # host sync: on an accelerator, one read per step where a skip is possible


class PlainStep(Stepper):
    def apply(self, d, clip, params, grads, stats, closure=None):
        coef = self._clip_in_place(d, clip, params, grads, stats)
        if d.may_skip and self._read_skip(d):
            return coef
        _step(self.optimizer, closure)
        return coef


class NoStep(Stepper):
    """``Guard.check()``: the decision and the clipping, no optimizer step."""

    def apply(self, d, clip, params, grads, stats, closure=None):
        return self._clip_in_place(d, clip, params, grads, stats)


class FusedStep(Stepper):
    def __init__(self, optimizer, scaler=None):
        super().__init__(optimizer, scaler)
        self._state_key, self._state_ready = None, False

    def apply(self, d, clip, params, grads, stats, closure=None):
        xp = stats.xp
        if clip is None or d.coef is None:
            coef, grad_scale = self._clip_in_place(d, clip, params, grads, stats), None
        else:
            coef = d.coef
            grad_scale = xp.reciprocal(coef)
        if xp.on_host:
            if d.may_skip and d.skip:
                return coef
            # grad_scale costs fused AdamW a division and a write-back per element:
            # pass it only on steps that clip.
            if grad_scale is not None and coef != 1:
                _step(self.optimizer, closure, grad_scale=xp.tensor(grad_scale))
            else:
                _step(self.optimizer, closure)
            return coef
        attrs = {} if grad_scale is None else {"grad_scale": grad_scale}
        if d.may_skip:
            # A fused optimizer skipped through found_inf before its state exists is
            # left broken (torch's fused SGD keeps an uninitialised momentum buffer),
            # so until the state is there the skip is read on the host.
            if not self._ready(params):
                if self._read_skip(d):
                    return coef
            else:
                attrs["found_inf"] = d.skip.float()
        _step(self.optimizer, closure, **attrs)
        return coef

    def _ready(self, params) -> bool:
        """Whether every parameter stepped now already has optimizer state (cached on the
        state size and which parameters have gradients: a late first gradient re-checks)."""
        state = self.optimizer.state
        key = (len(state), tuple(map(id, params)))
        if key != self._state_key:
            self._state_key = key
            self._state_ready = all(len(state.get(p, ())) > 0 for p in params)
        return self._state_ready


class ScalerStep(Stepper):
    """A ``torch.amp.GradScaler``: the guard unscaled the gradients already (``unscale_``).

    The scaler backs off on its own overflow only, never on a step the guard withholds for
    another reason (a NaN loss with finite gradients, a held step): its ``found_inf`` is
    left alone and our skip reaches the optimizer directly.
    """

    def __init__(self, optimizer, scaler):
        super().__init__(optimizer, scaler)
        self._fused = FusedStep(optimizer)  # for its state-readiness check

    def apply(self, d, clip, params, grads, stats, closure=None):
        xp = stats.xp
        opt, scaler = self.optimizer, self.scaler
        if not is_fused(opt):
            coef = self._clip_in_place(d, clip, params, grads, stats)
            # scaler.step() reads its found_inf on the host anyway; ours is read with it
            if d.may_skip and self._read_skip(d):
                return coef  # scaler.update() then sees its own found_inf only
            _step(opt, closure, scaler=scaler)
            return coef
        # GradScaler.step's branch for fused optimizers, with our skip joined to the
        # optimizer's found_inf and not to the scaler's.
        attrs = {}
        if clip is not None and d.coef is not None:
            coef = d.coef
            attrs["grad_scale"] = xp.tensor(xp.reciprocal(coef))
        else:
            coef = self._clip_in_place(d, clip, params, grads, stats)
        state = scaler._per_optimizer_states[id(opt)]
        founds = list(state["found_inf_per_device"].values())
        dev = founds[0].device if founds else params[0].device
        found = sum(f.to(dev, non_blocking=True) for f in founds) if founds else torch.zeros((), device=dev)
        if d.may_skip:
            # the fused kernels skip on found_inf == 1 exactly: a sum of two flags must stay 1
            found = (found + xp.tensor(d.skip).to(dev, found.dtype, non_blocking=True)).clamp(max=1.0)
        if not self._fused._ready(params) and float(found) > 0:  # host sync: a fused optimizer's first steps only
            return coef
        attrs["found_inf"] = found
        _step(opt, closure, **attrs)
        state["stage"] = OptState.STEPPED
        return coef


def stepper_for(optimizer, scaler=None) -> Stepper:
    """The stepping strategy for ``optimizer`` (chosen once, at construction)."""
    if scaler is not None:
        return ScalerStep(optimizer, scaler)
    return FusedStep(optimizer) if is_fused(optimizer) else PlainStep(optimizer)


class AfterApplied:
    """What follows an *applied* update only: the LR scheduler's step and an EMA/SWA update.

    A withheld step advances neither (an LR schedule counts updates, and an average must not
    take in the weights of a step that did not happen).  On the device backend knowing
    "applied" is one read of the skip flag per step, paid only when one of them is given.
    """

    def __init__(self, scheduler=None, ema=None, model=None):
        if scheduler is not None and not callable(getattr(scheduler, "step", None)):
            raise TypeError(f"scheduler must be an LR scheduler (with step()), got {type(scheduler).__name__}")
        if ema is not None and not callable(getattr(ema, "update_parameters", None)):
            raise TypeError("ema must be a torch.optim.swa_utils.AveragedModel (with update_parameters), "
                            f"got {type(ema).__name__}")
        if ema is not None and not isinstance(model, torch.nn.Module):
            raise ValueError("ema needs the model: pass an nn.Module as model")
        self.scheduler, self.ema = scheduler, ema
        self.model = getattr(model, "_orig_mod", model)

    def run(self, d) -> None:
        if self.scheduler is None and self.ema is None:
            return
        if d.may_skip and bool(d.skip):  # host sync: on an accelerator, one read per step
            return
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        if self.scheduler is not None:
            self.scheduler.step()
