"""Where a NaN was born: re-run a poisoned step with module hooks and name the producer.

The per-step row says which gradients are non-finite -- the propagators: a NaN made in
one module's forward output poisons the loss and, through the backward pass, every
gradient.  ``NanOrigin.locate`` re-runs the poisoned step's forward and backward (a
closure over the same batch) with hooks on every module, and names the first module, in
execution order, whose forward output became non-finite from finite inputs and finite
parameters (``"forward"``), whose parameters already were non-finite (``"parameter"``),
or whose input gradient became non-finite from a finite output gradient (``"backward"``);
the model itself when its input batch already was non-finite (``"input"``: the data);
failing that, the last tensor in model order whose gradient is non-finite (``"gradient"``).
The hooks exist only during ``locate``: a healthy step pays nothing.  The model's
gradients are restored afterwards (the re-run's are discarded), and so are the RNG state
(dropout draws the same masks as the step it re-runs) and the module buffers (BatchNorm's
running statistics are not updated twice).

``OriginOnPoison`` is the guard's use of it: ``guard.step(loss, rerun=fn)`` calls ``fn``
only on a poisoned step, and the step's ``nonfinite`` event names the producer.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["NanOrigin", "OriginOnPoison"]


def _finite(x) -> bool:
    """All floating tensors in ``x`` (a tensor or a nest of tuples/lists/dicts) finite."""
    if isinstance(x, torch.Tensor):
        return not x.is_floating_point() or bool(torch.isfinite(x).all())  # host sync: poisoned steps only
    if isinstance(x, (tuple, list)):
        return all(_finite(v) for v in x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    return True


class NanOrigin:
    """Names the module that produced a NaN/Inf (see the module doc).

    Args:
        model: the ``nn.Module`` being trained.

    Example:
        >>> origin = NanOrigin(model)
        >>> report = guard.step(loss)
        >>> if report.bad:   # a poisoned step: re-run it with the hooks armed
        ...     where = origin.locate(lambda: loss_fn(model(x), y))
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model

    def locate(self, closure) -> dict | None:
        """Re-run ``closure()`` (returns the loss) and its backward with hooks armed.

        Returns ``{"module", "type", "where", "param"}`` (``param``: the module's first
        parameter name, the culprit key the events use) or None if the re-run is finite.
        """
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        mods = [(n, m) for n, m in self.model.named_modules() if n]
        first_param = {}
        for name, p in self.model.named_parameters():
            first_param.setdefault(name.rpartition(".")[0], name)
        found: list = []

        def fwd(name, m):
            def hook(mod, inp, out):
                if found:
                    return
                own = list(mod.parameters(recurse=False))
                if own and not _finite(own):
                    found.append((name, "parameter"))
                elif not _finite(out) and _finite(inp):
                    found.append((name, "forward"))
            return hook

        def bwd(name):
            def hook(mod, grad_in, grad_out):
                if not found and _finite(grad_out) and not _finite(grad_in):
                    found.append((name, "backward"))
            return hook

        params = [p for p in self.model.parameters()]
        saved = [p.grad for p in params]
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]  # poisoned steps only
        rng = torch.random.get_rng_state()
        handles = []
        try:
            # a batch that is non-finite already: the data, not a module, made it
            handles.append(self.model.register_forward_pre_hook(
                lambda mod, args, kwargs: None if found or (_finite(args) and _finite(kwargs))
                else found.append(("", "input")), with_kwargs=True))
            for name, m in mods:
                handles.append(m.register_forward_hook(fwd(name, m)))
                try:
                    handles.append(m.register_full_backward_hook(bwd(name)))
                except RuntimeError:  # a module whose backward hooks torch refuses: forward only
                    pass
            for p in params:
                p.grad = None
            with torch.enable_grad(), warnings.catch_warnings():
                # the first module's input needs no gradient: torch says so once per module
                warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
                loss = closure()
                if isinstance(loss, torch.Tensor) and loss.requires_grad:
                    loss.backward()
            if not found:
                named = list(self.model.named_parameters())
                bad = [n for n, p in named if p.grad is not None and not _finite(p.grad)]
                if bad or not _finite(loss):
                    name = bad[-1].rpartition(".")[0] if bad else ""
                    found.append((name, "gradient" if bad else "loss"))
        finally:
            for h in handles:
                h.remove()
            for p, g in zip(params, saved):
                p.grad = g
            with torch.no_grad():
                for b, v in buffers:
                    b.copy_(v)
            torch.random.set_rng_state(rng)
        if not found:
            return None
        name, where = found[0]
        mod = self.model.get_submodule(name) if name else self.model
        return {"module": name, "type": type(mod).__name__, "where": where,
                "param": first_param.get(name)}


class OriginOnPoison:
    """The producer of each poisoned step, for the guard's ``nonfinite`` events.

    ``see(step, bad, rerun)`` runs ``NanOrigin.locate(rerun)`` when ``bad`` (the step's
    poison flag) is set, before the step is applied (the re-run sees that step's weights and
    batch); healthy steps never call ``rerun``.  A streak of consecutive poisoned steps is
    located once, at its first step, and every step of it carries that finding (a dead run
    is not re-run on every step, and its identical events still fold into one).
    ``take(steps)`` hands the findings of a flush's steps to the events.

    Args:
        model: the guard's ``nn.Module`` (None: a guard built from ``(name, parameter)``
            pairs, which cannot re-run anything: ``rerun`` is refused).
    """

    def __init__(self, model: nn.Module | None):
        self.model = model
        self._found: dict[int, dict] = {}
        self._last, self._current = -2, None

    def see(self, step: int, bad, rerun) -> None:
        if not callable(rerun):
            raise TypeError(f"rerun must be callable (it returns the step's loss), "
                            f"got {type(rerun).__name__}")
        if self.model is None:
            raise TypeError("rerun needs a Guard built on an nn.Module (the hooks go on its modules)")
        if not bool(bad):  # host sync: on an accelerator, one read of the poison flag (only with rerun)
            return
        if step != self._last + 1:
            self._current = NanOrigin(self.model).locate(rerun)
        self._last = step
        if self._current is not None:
            self._found[step] = self._current

    def state_dict(self) -> dict:
        """The findings not yet handed to an event (rows still pending) and the open streak."""
        return {"found": [[s, dict(o)] for s, o in self._found.items()], "last": self._last,
                "current": None if self._current is None else dict(self._current)}

    def load_state_dict(self, sd: dict) -> None:
        self._found = {int(s): dict(o) for s, o in sd.get("found", [])}
        self._last, self._current = int(sd.get("last", -2)), sd.get("current")

    def take(self, steps) -> dict[int, dict]:
        return {s: self._found.pop(s) for s in steps if s in self._found} if self._found else {}
