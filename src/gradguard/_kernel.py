"""Loads the optional one-pass CPU statistics kernel (``_cstats.c``).

The kernel reads each gradient once and yields its sum of squares and its
largest magnitude (NaN/Inf propagating).  torch's eager ops need two passes
for that, and ``torch._foreach_norm(.., inf)`` is ~15x one read on CPU.

Set ``GRADGUARD_NO_KERNEL=1`` to force the pure-torch path.
"""
from __future__ import annotations

import ctypes
import importlib.util
import operator
import os
from itertools import chain

import numpy as np
import torch

__all__ = ["available", "cpu_stats", "cpu_stats_packed", "KERNEL_DTYPES"]

# dtype -> code in _cstats.c
KERNEL_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _load():
    if os.environ.get("GRADGUARD_NO_KERNEL", "") not in ("", "0"):
        return None
    try:
        spec = importlib.util.find_spec("gradguard._cstats")
        if spec is None or not spec.origin:
            return None
        lib = ctypes.CDLL(spec.origin)
        fn = lib.gg_grad_stats_packed
    except (OSError, AttributeError, ImportError):
        return None
    p = ctypes.c_void_p
    fn.argtypes = [ctypes.c_int64, p, p, ctypes.c_int32, p]
    fn.restype = ctypes.c_int
    return fn


_fn = _load()
_codes_cache: dict = {}
_data_ptr, _numel, _dtype = torch.Tensor.data_ptr, torch.Tensor.numel, operator.attrgetter("dtype")


def available() -> bool:
    return _fn is not None


# (the dtypes tuple seen last, its codes), swapped as one object so that threads never pair
# one layout's dtypes with another's codes (which would make the kernel misread memory)
_last: list = [(None, None)]


def _codes(dtypes) -> tuple[np.ndarray, int]:
    """The kernel's dtype codes for ``dtypes`` (and their address), built once per layout."""
    last = _last[0]
    if dtypes is last[0]:  # the guard passes the same tuple every step
        return last[1]
    key = tuple(dtypes)
    cached = _codes_cache.get(key)
    if cached is None:  # dtypes repeat every step: build the code array once
        codes = np.array([KERNEL_DTYPES[d] for d in dtypes], dtype=np.int32)
        if len(_codes_cache) > 16:
            _codes_cache.clear()
        cached = _codes_cache[key] = (codes, codes.ctypes.data)
    if type(dtypes) is tuple:  # immutable: safe to recognise by identity next time
        _last[0] = (dtypes, cached)
    return cached


def cpu_stats_packed(grads: list[torch.Tensor], dtypes: list) -> np.ndarray:
    """``(2n + 1,)`` float64: sums of squares, then max |g| per tensor, then 1.0 if any
    max |g| is NaN/Inf.  Same contract as ``cpu_stats``; the guard's per-step call."""
    n = len(grads)
    ptr_numel = np.fromiter(chain(map(_data_ptr, grads), map(_numel, grads)), np.int64, 2 * n)
    out = np.empty(2 * n + 1, np.float64)
    rc = _fn(n, ptr_numel.ctypes.data, _codes(dtypes)[1], torch.get_num_threads(), out.ctypes.data)
    if rc != 0:
        raise MemoryError("gradguard: the statistics kernel could not allocate its work list")
    return out


def cpu_stats(grads: list[torch.Tensor], dtypes: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sum of squares (float64) and max |g| (float64) for dense (``stats.dense``) CPU tensors.

    The caller guarantees: CPU, dense, dtype in KERNEL_DTYPES.  NaN/Inf in
    a tensor come back as a NaN/Inf max |g|; the sum of squares is computed in
    float64 (as torch does on CPU), so finite values up to ~1e150 never overflow.
    """
    n = len(grads)
    out = cpu_stats_packed(grads, list(map(_dtype, grads)) if dtypes is None else dtypes)
    return out[:n], out[n:2 * n]
