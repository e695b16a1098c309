"""Snapshots of a model and its optimizer (what Rollback restores), cloned to CPU memory.

On a GPU a synchronous copy would stall training for the whole transfer (a GPT-2-small
model with AdamW state is ~1.5 GB) and sync once per tensor.  ``capture_state(...,
wait=False)`` instead copies every CUDA tensor into pinned host memory with
``non_blocking=True`` and records a CUDA event: the copies are ordered before the later
optimizer steps on the same stream, so the snapshot holds this moment's values, and
training goes on while they arrive.  ``wait_ready`` (called by ``restore_state``) waits for
the event; a snapshot read any other way must call it first.  ``reuse=`` hands back an old
snapshot whose pinned buffers are overwritten (pinning gigabytes on every capture costs more
than the copy).
"""
from __future__ import annotations

import torch

__all__ = ["to_cpu", "capture_state", "restore_state", "wait_ready"]

_READY = "_ready"  # key of the pending CUDA events in an asynchronous snapshot


def to_cpu(obj):
    """Deep copy with every tensor cloned to CPU (optimizer state dicts, batches)."""
    return _copy(obj, None, None)


def _copy(obj, reuse, events: list | None):
    """``to_cpu``; with ``events`` (a list), CUDA tensors go to pinned memory asynchronously
    (into ``reuse``'s tensor at the same place when it fits) and their devices are noted."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if events is None or not t.is_cuda:
            return t.to("cpu", copy=True)
        dst = reuse if _fits(reuse, t) else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        dst.copy_(t, non_blocking=True)
        if t.device not in events:
            events.append(t.device)
        return dst
    if isinstance(obj, dict):
        r = reuse if isinstance(reuse, dict) else {}
        return {k: _copy(v, r.get(k), events) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        r = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(obj) else [None] * len(obj)
        items = [_copy(v, rv, events) for v, rv in zip(obj, r)]
        if isinstance(obj, list):
            return items
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


def _fits(reuse, t: torch.Tensor) -> bool:
    """Can the old snapshot's tensor ``reuse`` take ``t``'s values in place?  Pinned host
    memory of the very same shape and dtype only: anything else would be broadcast into, cast,
    or copied without overlap with the device."""
    return (isinstance(reuse, torch.Tensor) and reuse.is_pinned() and reuse.shape == t.shape
            and reuse.dtype == t.dtype)


def capture_state(owner, *, wait: bool = True, reuse: dict | None = None) -> dict:
    """Model (state_dict, or the watched parameters) and optimizer state, cloned to CPU.

    ``owner`` is anything with ``optimizer``, ``model`` (or None), ``names`` and
    ``params``: a ``RemedyContext`` (or, for callers of the old API, a guard).
    ``wait=False``: CUDA tensors are copied asynchronously (see the module docstring);
    ``reuse``: an older snapshot of the same model whose buffers may be overwritten.
    """
    events = None if wait else []
    reuse = reuse or {}
    with torch.no_grad():
        model = getattr(owner, "model", None)
        if model is not None:
            model_state = _copy(model.state_dict(), reuse.get("model"), events)
        else:
            model_state = _copy(dict(zip(owner.names, owner.params)), reuse.get("model"), events)
        snap = {"model": model_state,
                "optimizer": _copy(owner.optimizer.state_dict(), reuse.get("optimizer"), events)}
    if events:
        marks = []
        for device in events:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(device))
            marks.append(ev)
        snap[_READY] = marks
    return snap


def wait_ready(snap: dict) -> dict:
    """Wait until an asynchronous snapshot's copies have landed; returns ``snap``."""
    for ev in snap.pop(_READY, ()):
        ev.synchronize()  # host sync: once, before a snapshot is read (a restore or a save)
    return snap


def restore_state(owner, snap: dict) -> None:
    """Copy a ``capture_state`` snapshot back in place (bitwise)."""
    wait_ready(snap)
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
