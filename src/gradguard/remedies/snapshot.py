"""Snapshots of a model and its optimizer (what Rollback restores), cloned to CPU memory."""
from __future__ import annotations

import torch

__all__ = ["to_cpu", "capture_state", "restore_state"]


def to_cpu(obj):
    """Deep copy with every tensor cloned to CPU (optimizer state dicts, batches)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return type(obj)(*(to_cpu(v) for v in obj)) if hasattr(obj, "_fields") \
            else tuple(to_cpu(v) for v in obj)
    return obj


def capture_state(owner) -> dict:
    """Model (state_dict, or the watched parameters) and optimizer state, cloned to CPU.

    ``owner`` is anything with ``optimizer``, ``model`` (or None), ``names`` and
    ``params``: a ``RemedyContext`` (or, for callers of the old API, a guard).
    """
    with torch.no_grad():
        model = getattr(owner, "model", None)
        if model is not None:
            model_state = to_cpu(model.state_dict())
        else:
            model_state = {n: p.detach().to("cpu", copy=True) for n, p in zip(owner.names, owner.params)}
        return {"model": model_state, "optimizer": to_cpu(owner.optimizer.state_dict())}


def restore_state(owner, snap: dict) -> None:
    """Copy a ``capture_state`` snapshot back in place (bitwise)."""
    with torch.no_grad():
        model = getattr(owner, "model", None)
        if model is not None:
            model.load_state_dict(snap["model"])
        else:
            for n, p in zip(owner.names, owner.params):
                p.copy_(snap["model"][n])
        # load_state_dict may keep the tensors it is given: hand it a fresh copy
        # so later optimizer steps cannot modify the snapshot.
        owner.optimizer.load_state_dict(to_cpu(snap["optimizer"]))
