"""Gathering a step's gradients: the first arrow of the flow.

Which watched parameters have a gradient this step, and whether these are the
very gradient tensors of the previous step (``guard.step()`` called twice
without a backward in between).
"""
from __future__ import annotations

import operator
import weakref

import torch
from torch import Tensor

__all__ = ["gather", "grad_signature", "same_grads", "dense", "all_dense"]

_version = operator.attrgetter("_version")
_grad = operator.attrgetter("grad")
_NoneType = type(None)
_is_contiguous = Tensor.is_contiguous


def gather(names: list[str], params: list[Tensor], allow_none: bool = False):
    """``(names, params, grads, missing)`` of the parameters that have a gradient
    (RuntimeError when none has, unless ``allow_none``)."""
    grads = list(map(_grad, params))
    if _NoneType not in map(type, grads):  # the common case: one C-level pass
        return names, params, grads, []
    kept_names, kept_params, kept, missing = [], [], [], []
    for n, p, g in zip(names, params, grads):
        if g is None:
            missing.append(n)
        else:
            kept_names.append(n)
            kept_params.append(p)
            kept.append(g)
    if not kept and not allow_none:
        raise RuntimeError("guard.step(): no watched parameter has a gradient; "
                           "call loss.backward() before guard.step()")
    return kept_names, kept_params, kept, missing


def grad_signature(grads: list[Tensor]) -> tuple[list, list]:
    """Weak references to this step's gradients and their version counters."""
    return list(map(weakref.ref, grads)), list(map(_version, grads))


def same_grads(sig: tuple[list, list] | None, grads: list[Tensor]) -> bool:
    """Whether ``grads`` are the very tensors of ``sig``, unmodified (no backward ran).

    Weak references: a freed gradient's id() can be reused by the next one.
    """
    if sig is None or len(sig[0]) != len(grads):
        return False
    refs, versions = sig
    # The first tensor decides almost every call (a new backward makes new
    # tensors, or bumps their versions when accumulating).
    if refs[0]() is not grads[0] or versions[0] != grads[0]._version:
        return False
    return all(r() is g for r, g in zip(refs, grads)) and versions == list(map(_version, grads))


def dense(g: Tensor) -> bool:
    """Whether ``g``'s elements fill ``numel`` consecutive slots (any order): contiguous, or
    channels-last (conv weights and their gradients under ``memory_format=channels_last``).
    Norms and max |g| do not depend on the order, so the kernel reads such a tensor linearly.
    Sparse tensors are never dense here."""
    if g.is_contiguous():
        return True
    d = g.dim()
    return ((d == 4 and g.is_contiguous(memory_format=torch.channels_last))
            or (d == 5 and g.is_contiguous(memory_format=torch.channels_last_3d)))


def all_dense(grads: list[Tensor]) -> bool:
    """``dense`` for every tensor (the common all-contiguous case in one C-level pass)."""
    return all(map(_is_contiguous, grads)) or all(map(dense, grads))
