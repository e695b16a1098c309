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

import numpy as np
import torch

__all__ = ["available", "cpu_stats", "KERNEL_DTYPES"]

# dtype -> (code in _cstats.c, unsigned integer dtype holding its bits)
KERNEL_DTYPES = {
    torch.float32: (0, np.uint32),
    torch.float64: (1, np.uint64),
    torch.float16: (2, np.uint16),
    torch.bfloat16: (3, np.uint16),
}
_BITS_TO_FLOAT = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
}


def _load():
    if os.environ.get("GRADGUARD_NO_KERNEL", "") not in ("", "0"):
        return None
    try:
        spec = importlib.util.find_spec("gradguard._cstats")
        if spec is None or not spec.origin:
            return None
        lib = ctypes.CDLL(spec.origin)
        fn = lib.gg_grad_stats
    except (OSError, AttributeError, ImportError):
        return None
    p = ctypes.c_void_p
    fn.argtypes = [ctypes.c_int64, p, p, p, ctypes.c_int32, p, p]
    fn.restype = ctypes.c_int
    return fn


_fn = _load()
_codes_cache: dict = {}
_data_ptr, _numel, _dtype = torch.Tensor.data_ptr, torch.Tensor.numel, operator.attrgetter("dtype")


def available() -> bool:
    return _fn is not None


def cpu_stats(grads: list[torch.Tensor], dtypes: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sum of squares (float64) and max |g| (float64) for contiguous CPU tensors.

    The caller guarantees: CPU, contiguous, dtype in KERNEL_DTYPES.  NaN/Inf in
    a tensor come back as a NaN/Inf max |g|; the sum of squares is computed in
    float64 (as torch does on CPU), so finite values up to ~1e150 never overflow.
    """
    n = len(grads)
    ptrs = np.fromiter(map(_data_ptr, grads), np.uint64, n)
    numels = np.fromiter(map(_numel, grads), np.int64, n)
    if dtypes is None:
        dtypes = list(map(_dtype, grads))
    key = (n, tuple(dtypes))
    cached = _codes_cache.get(key)
    if cached is None:  # dtypes repeat every step: build the code array once
        cached = (np.array([KERNEL_DTYPES[d][0] for d in dtypes], dtype=np.int32),
                  all(d is torch.float32 for d in dtypes))
        if len(_codes_cache) > 16:
            _codes_cache.clear()
        _codes_cache[key] = cached
    codes, all_f32 = cached
    sumsq = np.empty(n, np.float64)
    maxbits = np.empty(n, np.uint64)
    rc = _fn(n, ptrs.ctypes.data, numels.ctypes.data, codes.ctypes.data,
             torch.get_num_threads(), sumsq.ctypes.data, maxbits.ctypes.data)
    if rc != 0:
        raise MemoryError("gradguard: the statistics kernel could not allocate its work list")
    if all_f32:
        with np.errstate(invalid="ignore"):  # a signalling-NaN pattern widens to NaN, as it should
            return sumsq, maxbits.astype(np.uint32).view(np.float32).astype(np.float64)
    maxabs = np.empty(n, np.float64)
    with np.errstate(invalid="ignore"):  # signalling-NaN patterns widen to NaN, as they should
        for dt in set(dtypes):
            sel = codes == KERNEL_DTYPES[dt][0]
            bits = maxbits[sel].astype(KERNEL_DTYPES[dt][1])
            if dt is torch.bfloat16:  # bf16 is the top half of a float32
                maxabs[sel] = (bits.astype(np.uint32) << 16).view(np.float32)
            else:
                maxabs[sel] = bits.view(_BITS_TO_FLOAT[dt])
    return sumsq, maxabs
