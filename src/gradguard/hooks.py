"""A guard and the optimizer's own ``step`` hooks: watching without replacing it, and misuse.

``gg.watch(model, optimizer)`` is one line for "just watch my training": the guard rides on
the optimizer's step hooks (``register_step_pre_hook``), so every ``optimizer.step()``
records a row (statistics, events, store, dashboard) without the loop changing.  It does
not clip or skip unless asked (``clip=``, ``on_nonfinite="skip"``: then a poisoned step's
gradients are set to None before the optimizer runs, which torch optimizers skip).

A plain ``Guard`` steps the optimizer itself.  A post-step hook notices the two common
mistakes and warns once each: the optimizer stepped directly while the guard also steps it
(the skipped NaN step gets applied anyway, and a step after ``guard.step()`` applies twice),
and a guard that never sees a step while its optimizer keeps stepping.
"""
from __future__ import annotations

import warnings
import weakref

__all__ = ["OptimizerHooks", "check_watched", "group_sizes"]


def check_watched(optimizer, params, verb: str) -> None:
    """Every parameter the optimizer trains is watched: clipping and skipping would miss
    the others (their NaN would be stepped)."""
    watched = {id(p) for p in params}
    unseen = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"] if id(p) not in watched]
    if unseen:
        raise ValueError(f"optimizer {verb} {len(unseen)} parameter(s) the guard does not watch "
                         f"(shapes {unseen[:3]}); clipping and skipping would miss them. Pass the "
                         "whole model, or every (name, parameter) the optimizer trains.")


def group_sizes(optimizer) -> tuple:
    """Parameters per group: a change means ``add_param_group`` ran."""
    return tuple(len(g["params"]) for g in optimizer.param_groups)

NEVER_SEEN_AFTER = 10  # direct optimizer steps before "the guard never sees a step" warns


class OptimizerHooks:
    """The optimizer hooks of one guard (weak: the optimizer does not keep the guard alive)."""

    def __init__(self, guard, watch: bool = False):
        ref = weakref.ref(guard)
        self.watching = watch
        self.stepping = False  # the guard is stepping the optimizer now (apply)
        self.expect_external = False  # check() ran: the caller steps next
        self.direct = 0
        self._warned: set[str] = set()
        opt = guard.optimizer
        self._handles = []
        try:
            self._handles.append(opt.register_step_post_hook(lambda o, a, k: self._post(ref)))
            if watch:
                self._handles.append(opt.register_step_pre_hook(lambda o, a, k: self._pre(ref)))
        except AttributeError:  # an optimizer-like view that is never stepped (the Keras adapter)
            if watch:
                raise TypeError(f"optimizer: {type(opt).__name__} has no step hooks to watch") from None

    def _pre(self, ref) -> None:
        guard = ref()
        if guard is None or self.stepping:
            return
        self.stepping = True  # the optimizer step that follows is the guard's own
        try:
            report = guard.check()
        finally:
            self.stepping = False
        # host sync: on an accelerator, only where a skip is possible (the step follows now)
        if (guard.on_nonfinite == "skip" or guard.remedies) and report.skipped:
            for p in guard.params:
                p.grad = None  # torch optimizers skip parameters without a gradient
        self.expect_external = True

    def _post(self, ref) -> None:
        guard = ref()
        if guard is None or self.stepping:
            return
        if self.expect_external:
            self.expect_external = False
            return
        self.direct += 1
        if guard.steps > 0:
            self._warn_once("direct", "optimizer.step() was called directly while a gradguard Guard "
                            "steps this optimizer: that step is neither clipped nor skipped, and a "
                            "step after guard.step() is applied twice. Call guard.step() only (or "
                            "use gg.watch(model, optimizer) to watch without replacing it).")
        elif self.direct >= NEVER_SEEN_AFTER:
            self._warn_once("never", f"the optimizer stepped {self.direct} times but its gradguard "
                            "Guard never did: nothing is recorded, clipped or skipped. Replace "
                            "optimizer.step() by guard.step(loss=loss), or use "
                            "gg.watch(model, optimizer) to watch without changing the loop.")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"gradguard: {message}", UserWarning, stacklevel=4)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
