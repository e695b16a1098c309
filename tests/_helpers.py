"""Shared test helpers: one bitwise comparison and one state snapshot.

Bitwise means the floats' bit patterns: -0.0 != 0.0, and NaN payloads count (two NaNs are
equal only when their bits are), which is what "a skipped step leaves everything untouched"
and "a resume is bitwise" promise.  ``torch.equal`` is not that (-0.0 == 0.0, NaN != NaN),
nor is comparing ``str()`` of a state (4 significant digits).
"""
from __future__ import annotations

import copy
import struct

import numpy as np
import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(x):
    """The bit pattern of a tensor (an integer tensor of the same shape), a numpy array or
    scalar (an unsigned integer array), or a Python float (an int).  Non-floats unchanged."""
    if torch.is_tensor(x):
        x = x.detach()
        if x.is_complex():
            x = torch.view_as_real(x)
        if x.is_floating_point():
            return x.contiguous().view(_INT_OF_SIZE[x.element_size()])
        return x
    if isinstance(x, (np.ndarray, np.generic)):
        a = np.asarray(x)
        return a.view(f"u{a.itemsize}") if a.dtype.kind in "fc" else a
    if isinstance(x, float):
        return struct.unpack("<q", struct.pack("<d", x))[0]
    return x


def assert_bitwise(a, b, path: str = "value") -> None:
    """Deep bitwise equality of tensors, arrays, floats and nested dicts/lists/tuples.

    Tensors must agree in dtype, shape and bits (their device is not compared)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b), (path, type(b))
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(bits(a.cpu()), bits(b.cpu())), (path, a, b)
    elif isinstance(a, (np.ndarray, np.generic)):
        a2, b2 = np.asarray(a), np.asarray(b)
        assert a2.dtype == b2.dtype and a2.shape == b2.shape, path
        assert np.array_equal(bits(a2), bits(b2)), (path, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, set(a) ^ set(b) if isinstance(b, dict) else b)
        for k in a:
            assert_bitwise(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, float) and bits(a) == bits(b), (path, a, b)
    else:
        assert a == b, (path, a, b)


def snapshot(model=None, opt=None, *extra) -> dict:
    """Deep copies of everything a step may change: parameters, buffers, optimizer state
    (and any further ``state_dict``-bearing objects: a scheduler, a scaler, a policy)."""
    out = {}
    if model is not None:
        out["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if opt is not None:
        out["opt"] = copy.deepcopy(opt.state_dict())
    for i, obj in enumerate(extra):
        out[f"extra{i}"] = copy.deepcopy(obj.state_dict())
    return out



_ACTS = {"tanh": lambda w: torch.nn.Tanh(), "relu": lambda w: torch.nn.ReLU(),
         "layernorm": lambda w: torch.nn.LayerNorm(w)}


def mlp(*widths: int, act="tanh", seed: int | None = 0, dtype=None) -> torch.nn.Sequential:
    """The tests' one model factory: ``Linear`` layers through ``widths`` (``mlp(6, 16, 2)`` is
    Linear(6, 16), Tanh, Linear(16, 2)), built after ``torch.manual_seed(seed)`` (None: not
    seeded).  ``act``: ``"tanh"``, ``"relu"``, ``"layernorm"``, or one name per hidden layer."""
    if len(widths) < 2:
        raise ValueError(f"widths needs an input and an output width, got {widths}")
    hidden = len(widths) - 2
    acts = [act] * hidden if isinstance(act, str) else list(act)
    if len(acts) != hidden:
        raise ValueError(f"act names {len(acts)} activations for {hidden} hidden layers")
    if seed is not None:
        torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < hidden:
            layers.append(_ACTS[acts[i]](b))
    model = torch.nn.Sequential(*layers)
    return model if dtype is None else model.to(dtype)
