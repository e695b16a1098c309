"""Per-tensor sum of squares and max |g| of many CUDA gradients in one read (Triton).

A leaf module: imports only torch (and gradguard.gather) (and Triton, lazily, on first use with CUDA
tensors, so ``import gradguard`` stays cheap and works without Triton).

    available(grads) -> bool
    sumsq_maxabs(grads) -> (sumsq, max_abs)   # (P,) float64 and (P,) float32, on grads' device

How the pass is done:
- The gradients are grouped by dtype (float32 / float16 / bfloat16): one launch of
  ``_partials`` per group.  Each program reads ``CHUNK`` consecutive elements of *one*
  tensor (chunks never straddle tensors) and writes one partial: the float32 sum of
  squares of its chunk and max |g| as integer bits.
- A second small launch, ``_reduce`` (one program per tensor, fixed order, so the
  result is deterministic run to run), adds a tensor's partials in float64 and takes
  the max of its bits, and scatters both into the (P,) outputs.
- Pointers: a device table of every gradient's ``data_ptr()`` (int64, cast to a typed
  pointer in the kernel).  The block -> tensor / block -> offset tables depend only on
  the layout (numels, dtypes, device) and are built once per layout and kept on the
  device.  The pointer table is re-uploaded only when some ``data_ptr()`` changed
  (``zero_grad(set_to_none=True)`` lets backward re-allocate gradients), from pinned
  host memory with ``non_blocking=True``: never a host sync.

Numerics (what the kernel returns):
- sumsq: float32 accumulation within a chunk (one product and one add per element in
  registers; fp64 there would cost consumer GPUs 1/64-rate arithmetic), float64 across
  chunks.  A chunk's float32 sum overflows to Inf only if the chunk holds a finite
  |g| > ~1.8e19 (float32/bfloat16 gradients); max |g| stays finite then, so the
  non-finite flag (derived from max |g|) is still right and only the norm reads Inf.
- max |g| is the max of the float32 bit patterns with the sign bit cleared: for those,
  integer order is finite < Inf < NaN, so NaN and Inf propagate without relying on
  any float max's NaN rule.  A tensor holding a NaN gets max |g| = NaN and sumsq = NaN
  (NaN*NaN = NaN); holding Inf (and no NaN): max |g| = Inf, sumsq = Inf.
- An empty tensor (numel 0) gets no chunk: sumsq 0.0 and max |g| 0.0.
- Offsets are int64, so tensors past 2**31 elements index correctly, but tensors over
  2**31 bytes are outside what the tests cover.

Block sizes (chosen for an H200: 132 SMs, ~4.8 TB/s, memory-bound):
- ``BLOCK`` = 16 bytes per thread per load x 2 loads x 128 threads (4 warps): 1024
  float32 or 2048 float16/bfloat16 elements, 4 KiB per iteration.  ``ITERS`` = 8
  iterations unrolled at compile time (``static_range``): the compiled code issues all
  16 vector loads of a thread before the arithmetic, so a program has its whole 32 KiB
  chunk in flight at once.
- GPT-2-small (124M float32) is then ~15K programs (7.6K in bf16), >50 per SM: the tail
  wave is a small fraction of the run, and a handful of resident programs per SM already
  keep more than the ~40 KiB per SM in flight that 4.8 TB/s x ~1 us latency needs.  A
  small tensor (a bias of 768) costs one mostly-masked program; masked-off lanes issue
  no memory traffic.
- Full chunks load without a mask and, when every pointer of the launch is 16-byte
  aligned (``ALIGNED``; the caching allocator's blocks are), as 16-byte vectors (checked
  in the PTX for sm_90: ``ld.global.v4.b32``).  A tensor's last, partial chunk is
  masked, and the mask (against a length read from memory) makes those loads scalar;
  so does a group holding a view at an odd offset (e.g. a bucketed DDP gradient view).
"""
from __future__ import annotations

import contextlib
import operator
import os

import torch
from torch import Tensor

from .gather import dense as _dense

__all__ = ["available", "sumsq_maxabs"]

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_NUM_WARPS = 4
_ITERS = 8
_RBLOCK = 256  # partials per iteration in _reduce (a tensor has up to ~5K partials in GPT-2)
_MAX_LAYOUTS = 8  # cached layouts (a training run has one or two)
# per-step scans over ~150 tensors run in C (map) rather than in a Python loop
_numel, _data_ptr, _is_contiguous = Tensor.numel, Tensor.data_ptr, Tensor.is_contiguous
_dtype, _device, _layout_of = (operator.attrgetter(a) for a in ("dtype", "device", "layout"))
_PLAIN = frozenset((Tensor, torch.nn.Parameter))
_NO_CONTEXT = contextlib.nullcontext()


def _block(dtype: torch.dtype) -> int:
    """Elements per iteration: two 16-byte vector loads per thread."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (16 // itemsize) * 2 * 32 * _NUM_WARPS


_kernels_cache: tuple | None = None
_import_failed = False


def _kernels():
    """The two jitted kernels, built on first use: Triton is optional and importing it
    costs time that CPU-only users should not pay at ``import gradguard``."""
    global _kernels_cache, _import_failed
    if _kernels_cache is not None or _import_failed:
        return _kernels_cache
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 - any failure to import means "no Triton path"
        _import_failed = True
        return None

    @triton.jit
    def _partials(ptrs, blk_tensor, blk_chunk, numels, part_sum, part_max, blk_base,
                  DTYPE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                  ALIGNED: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(blk_tensor + pid)
        # int64: offsets past 2**31 elements stay exact; a multiple of the chunk (a
        # constant), so the compiler knows every vector below starts 16-byte aligned
        start = tl.load(blk_chunk + pid).to(tl.int64) * (BLOCK * ITERS)
        n = tl.load(numels + t)
        base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
        if ALIGNED:  # every pointer of this launch is a multiple of 16: 16-byte vector loads
            base = tl.multiple_of(base, 16)  # (on the pointer: a hint on the int is lost in the cast)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        mx = tl.zeros([BLOCK], dtype=tl.int32)
        lanes = tl.arange(0, BLOCK)
        if start + BLOCK * ITERS <= n:
            # a full chunk, unmasked: a mask against a loaded length would have unknown
            # alignment and turn every load into scalar loads
            for i in tl.static_range(ITERS):
                x = tl.load(base + (start + i * BLOCK) + lanes).to(tl.float32)
                acc += x * x
                # |x| as bits: sign cleared, finite < Inf < NaN in integer order
                mx = tl.maximum(mx, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
        else:  # the tensor's last, partial chunk
            for i in tl.static_range(ITERS):
                offs = start + i * BLOCK + lanes
                x = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
                acc += x * x
                mx = tl.maximum(mx, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
        out = blk_base + pid
        tl.store(part_sum + out, tl.sum(acc, axis=0))
        tl.store(part_max + out, tl.max(mx, axis=0))

    @triton.jit
    def _reduce(part_sum, part_max, red_tensor, red_lo, red_hi, blk_base, sumsq, maxabs,
                RBLOCK: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(red_tensor + pid)
        lo = tl.load(red_lo + pid) + blk_base
        hi = tl.load(red_hi + pid) + blk_base
        acc = tl.zeros([RBLOCK], dtype=tl.float64)
        mx = tl.zeros([RBLOCK], dtype=tl.int32)
        lanes = tl.arange(0, RBLOCK)
        for j in range(lo, hi, RBLOCK):
            offs = j + lanes
            mask = offs < hi
            acc += tl.load(part_sum + offs, mask=mask, other=0.0).to(tl.float64)
            mx = tl.maximum(mx, tl.load(part_max + offs, mask=mask, other=0))
        tl.store(sumsq + t, tl.sum(acc, axis=0))
        tl.store(maxabs + t, tl.max(mx, axis=0).to(tl.float32, bitcast=True))

    tl_dtypes = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    _kernels_cache = (_partials, _reduce, tl_dtypes)
    return _kernels_cache


def _disabled() -> bool:
    return os.environ.get("GRADGUARD_NO_TRITON", "") not in ("", "0")


def available(grads: list[Tensor]) -> bool:
    """Whether ``sumsq_maxabs(grads)`` can run: a non-empty list of dense strided CUDA
    tensors on one device, of float32/float16/bfloat16, Triton importable, and not
    switched off by the environment variable ``GRADGUARD_NO_TRITON=1``."""
    if not grads or _disabled():
        return False
    devices = set(map(_device, grads))
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return False
    # plain tensors only: a DTensor's data_ptr() is one shard's, not the whole gradient
    if not set(map(type, grads)) <= _PLAIN or not set(map(_dtype, grads)) <= set(_SUPPORTED):
        return False
    if set(map(_layout_of, grads)) != {torch.strided}:
        return False
    if not (all(map(_is_contiguous, grads)) or all(map(_dense, grads))):
        return False
    return _kernels() is not None


def _upload(values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a tensor on ``device`` without a host sync: built on the host, staged
    in a fresh pinned buffer (the caching host allocator keeps it until the async copy
    is done, so nothing overwrites it mid-copy) and copied with ``non_blocking=True``
    (a copy from pageable memory would block the host)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":  # CPU tensors: only under the Triton interpreter (tests)
        return host
    pinned = torch.empty(len(values), dtype=dtype, pin_memory=True)
    pinned.copy_(host)
    return pinned.to(device, non_blocking=True)


class _Layout:
    """Tables for one layout (numels, dtypes, device), kept on the device."""

    def __init__(self, grads: list[Tensor], device: torch.device):
        self.device = device
        numels = [g.numel() for g in grads]
        self.numels = _upload(numels, torch.int64, device)
        self.groups = []  # (dtype, block, n_blocks, blk_base, n_members, tables...)
        self.members = []  # per group: indices into grads
        base = 0
        for dtype in _SUPPORTED:
            members = [i for i, g in enumerate(grads) if g.dtype == dtype]
            if not members:
                continue
            block = _block(dtype)
            chunk = block * _ITERS
            blk_tensor, blk_chunk, lo, hi = [], [], [], []
            for i in members:
                lo.append(len(blk_tensor))
                nchunks = -(-numels[i] // chunk)
                blk_tensor += [i] * nchunks
                blk_chunk += range(nchunks)
                hi.append(len(blk_tensor))
            nblk = len(blk_tensor)
            tables = tuple(_upload(v, dt, device) for v, dt in (
                (blk_tensor, torch.int32), (blk_chunk, torch.int32), (members, torch.int32),
                (lo, torch.int32), (hi, torch.int32)))
            self.groups.append((dtype, block, nblk, base, len(members)) + tables)
            self.members.append(members)
            base += nblk
        self.n_blocks = base
        self.ptrs_host: list[int] | None = None
        self.ptrs: Tensor | None = None
        self.aligned: list[bool] = []  # per group: every pointer a multiple of 16 bytes

    def pointers(self, grads: list[Tensor]) -> Tensor:
        """The device table of ``data_ptr()``s, re-uploaded only when one changed."""
        now = list(map(_data_ptr, grads))
        if now != self.ptrs_host:
            # a new device tensor, not an in-place copy: a launch still queued on another
            # stream keeps reading the table it was given
            self.ptrs = _upload(now, torch.int64, self.device)
            self.ptrs_host = now
            # views into a flat buffer (bucketed DDP gradients) can start anywhere
            self.aligned = [all(now[i] % 16 == 0 for i in m) for m in self.members]
        return self.ptrs


_layouts: dict[tuple, _Layout] = {}


def _layout(grads: list[Tensor], device: torch.device) -> _Layout:
    key = (device, tuple(map(_numel, grads)), tuple(map(_dtype, grads)))
    lay = _layouts.get(key)
    if lay is None:
        if len(_layouts) >= _MAX_LAYOUTS:
            _layouts.pop(next(iter(_layouts)))
        lay = _layouts[key] = _Layout(grads, device)
    return lay


def sumsq_maxabs(grads: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-tensor sum of squares (float64) and max |g| (float32) of ``grads``, each of
    shape (P,) on the gradients' device, in one read of every gradient.

    NaN anywhere in a tensor: both values NaN; Inf (no NaN): both Inf; numel 0: both 0.
    Requires ``available(grads)`` (or CPU tensors under ``TRITON_INTERPRET=1``, for
    tests).  No host sync: nothing is read back from the device.
    """
    grads = list(grads)
    k = _kernels()
    if k is None:
        raise RuntimeError("Triton is not importable: use available(grads) first")
    partials, reduce_, tl_dtypes = k
    if not grads:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float32)
    device = grads[0].device
    lay = _layout(grads, device)
    ptrs = lay.pointers(grads)
    p = len(grads)
    sumsq = torch.empty(p, dtype=torch.float64, device=device)
    maxabs = torch.empty(p, dtype=torch.float32, device=device)
    part_sum = torch.empty(max(lay.n_blocks, 1), dtype=torch.float32, device=device)
    part_max = torch.empty(max(lay.n_blocks, 1), dtype=torch.int32, device=device)
    # Triton launches on the current device: make it the gradients' (cuda:1 while cuda:0 is
    # current); the context costs a few microseconds, so only when it is another device
    switch = device.type == "cuda" and device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if switch else _NO_CONTEXT:
        for (dtype, block, nblk, base, nmem, blk_tensor, blk_chunk, members, lo, hi), aligned in zip(
                lay.groups, lay.aligned):
            if nblk:
                partials[(nblk,)](ptrs, blk_tensor, blk_chunk, lay.numels, part_sum, part_max, base,
                                  DTYPE=tl_dtypes[dtype], BLOCK=block, ITERS=_ITERS, ALIGNED=aligned,
                                  num_warps=_NUM_WARPS)
            reduce_[(nmem,)](part_sum, part_max, members, lo, hi, base, sumsq, maxabs,
                             RBLOCK=_RBLOCK, num_warps=4)
    return sumsq, maxabs
