"""``gg.watch``: one line that records every ``optimizer.step()`` of an unchanged loop.

See ``hooks.py`` for how: the guard rides on the optimizer's step pre-hook.
"""
from __future__ import annotations

from .guard import Guard
from .hooks import OptimizerHooks

__all__ = ["watch"]


def watch(model, optimizer, log_dir=None, *, clip=None, on_nonfinite: str = "warn", **guard_kwargs):
    """Watch every ``optimizer.step()`` of a training loop without changing it.

    Args:
        model: an ``nn.Module`` or an iterable of ``(name, parameter)``.
        optimizer: the optimizer the loop steps itself.
        log_dir: where the run store is written (for the dashboard); None: nothing written.
        clip: a clip policy, applied before each step (default None: watching only).
        on_nonfinite: ``"warn"`` (default: watching only), ``"skip"`` (a poisoned step's
            gradients are dropped before the optimizer runs) or ``"raise"``.  Even when
            watching, ``nonfinite_budget`` (default 100) consecutive poisoned steps raise
            ``gg.RunIsDeadError``: the weights are NaN by then and every further step is
            wasted; pass ``nonfinite_budget=None`` to never raise.
        **guard_kwargs: passed to ``gg.Guard`` (``detectors``, ``run_name``, ``flush_every`` ...).
    Returns:
        the ``Guard``: ``.events``, ``.close()``, ``.state_dict()`` as usual.

    Example:
        >>> guard = gg.watch(model, optimizer, log_dir="gradguard-runs")
        >>> ...  # the loop is unchanged: loss.backward(); optimizer.step()
        >>> guard.close(); print(guard.events)
    """
    guard = Guard(model, optimizer, clip=clip, on_nonfinite=on_nonfinite, log_dir=log_dir, **guard_kwargs)
    guard._hooks.remove()
    guard._hooks = OptimizerHooks(guard, watch=True)
    return guard
