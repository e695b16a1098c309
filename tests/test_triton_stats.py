"""The Triton statistics kernel against torch references.

Run two ways: on CUDA (skipped without a device) and, on any machine with Triton
installed, through Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which
executes the same kernel source with numpy. Tensors over 2**31 bytes are out of scope.
"""
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

from gradguard import _triton_stats as ts

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
# Triton's interpreter must be chosen before Triton is first imported (another test may
# import it through torch), so the "interpret" cases run in a child process that starts
# with TRITON_INTERPRET=1: test_interpreter_cases below.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(params=["interpret", "cuda"])
def device(request):
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    if request.param == "cuda":
        if INTERPRETED or not HAS_CUDA:
            pytest.skip("needs a CUDA device (and no interpreter)")
        return torch.device("cuda")
    if not INTERPRETED:
        pytest.skip("runs in a child process under TRITON_INTERPRET=1 (test_interpreter_cases)")
    return torch.device("cpu")


def test_interpreter_cases(fresh_python):
    """Every "interpret" case of this file, in a child process under Triton's interpreter."""
    if INTERPRETED or not HAS_TRITON:
        pytest.skip("this is the child process, or no Triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the same cases run natively (the interpreter is their CPU stand-in)")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=str(root / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = fresh_python.run_module("pytest", "-q", "-x", "-p", "no:cacheprovider", Path(__file__),
                                   "-k", "interpret and not test_interpreter_cases", env=env, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def reference(grads):
    sumsq = torch.stack([g.double().square().sum() for g in grads]) if grads else torch.zeros(0)
    maxabs = torch.stack([g.float().abs().amax() if g.numel() else torch.zeros((), device=g.device)
                          for g in grads]) if grads else torch.zeros(0)
    return sumsq.double().cpu(), maxabs.float().cpu()


def check(grads, rtol=1e-5):
    s, m = ts.sumsq_maxabs(grads)
    assert s.dtype == torch.float64 and m.dtype == torch.float32
    assert s.shape == m.shape == (len(grads),)
    assert s.device == m.device == grads[0].device
    rs, rm = reference(grads)
    torch.testing.assert_close(s.cpu(), rs, rtol=rtol, atol=0, equal_nan=True)
    torch.testing.assert_close(m.cpu(), rm, rtol=0, atol=0, equal_nan=True)  # max is exact
    return s, m


CHUNK32 = ts._block(torch.float32) * ts._ITERS  # elements one program reads (float32)

SHAPES = {
    "one element": [(1,)],
    "empty among others": [(0,), (5, 3), (0, 7), (1,)],
    "chunk edges": [(CHUNK32 - 1,), (CHUNK32,), (CHUNK32 + 1,), (2 * CHUNK32 + 37,)],
    "many small": [(3,)] * 40 + [(17, 2)],
    "channels-last-sized": [(4, 3, 5, 5), (7,)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(SHAPES))
def test_matches_reference(device, dtype, case):
    g = torch.Generator().manual_seed(0)
    grads = [(torch.randn(s, generator=g) * 3).to(dtype).to(device) for s in SHAPES[case]]
    check(grads)


def test_mixed_dtypes_keep_order(device):
    g = torch.Generator().manual_seed(1)
    dts = [torch.bfloat16, torch.float32, torch.float16, torch.float32, torch.bfloat16]
    grads = [(torch.randn(CHUNK32 + 3 * i, generator=g) * (i + 1)).to(dt).to(device)
             for i, dt in enumerate(dts)]
    s, _ = check(grads)
    assert s.argsort().tolist() == list(range(len(grads)))  # scaled by i+1: order is visible


@pytest.mark.parametrize("where", [0, "last", "second chunk"])
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "nan and inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_propagates(device, dtype, bad, where):
    n = 2 * CHUNK32 + 11
    i = {0: 0, "last": n - 1, "second chunk": CHUNK32 + 5}[where]
    x = torch.randn(n, generator=torch.Generator().manual_seed(2))
    if bad == "nan and inf":
        x[i], x[(i + 3) % n] = math.nan, math.inf
    else:
        x[i] = float(bad)
    clean = torch.randn(300, generator=torch.Generator().manual_seed(3))
    grads = [clean.to(dtype).to(device), x.to(dtype).to(device), torch.zeros(0, dtype=dtype, device=device)]
    s, m = check(grads)
    if "nan" in bad:
        assert math.isnan(s[1]) and math.isnan(m[1])
    else:
        assert s[1] == math.inf and m[1] == math.inf
    assert math.isfinite(s[0]) and math.isfinite(m[0])  # the neighbour is untouched
    assert s[2] == 0 and m[2] == 0  # empty: zeros


def test_deterministic(device):
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(3 * CHUNK32 + 1, generator=g).to(device), torch.randn(9, generator=g).to(device)]
    a, b = ts.sumsq_maxabs(grads), ts.sumsq_maxabs(grads)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_pointer_table_follows_reallocation(device):
    g = torch.Generator().manual_seed(5)
    shapes = [(CHUNK32 + 7,), (33,), (4, 4)]
    grads = [torch.randn(s, generator=g).to(device) for s in shapes]
    check(grads)
    # the same layout, new storage and new values: the cached tables must not be reused
    # with stale pointers
    grads2 = [torch.randn(s, generator=g).mul(10).to(device) for s in shapes]
    keep = grads  # keep the old storage alive so its addresses are not handed out again
    assert [x.data_ptr() for x in grads2] != [x.data_ptr() for x in keep]
    check(grads2)
    # in place: same pointers, new values
    grads2[1].mul_(-3)
    check(grads2)
    # views with an offset into one buffer (data_ptr includes the storage offset)
    flat = torch.randn(CHUNK32 + 7 + 33 + 16, generator=g).to(device)
    views = [flat[:CHUNK32 + 7], flat[CHUNK32 + 7:CHUNK32 + 40], flat[CHUNK32 + 40:].view(4, 4)]
    check(views)


def test_empty_list(device):
    s, m = ts.sumsq_maxabs([])
    assert s.shape == m.shape == (0,)


def test_available_refuses():
    cpu = [torch.randn(3)]
    assert not ts.available([])
    assert not ts.available(cpu)  # CPU tensors: the C kernel's job
    if not HAS_CUDA:
        return
    cuda = [torch.randn(3, device="cuda")]
    assert ts.available(cuda) == HAS_TRITON
    assert not ts.available([torch.randn(3, device="cuda", dtype=torch.float64)])
    assert not ts.available([torch.randn(4, 3, device="cuda").t()])  # not dense
    assert not ts.available(cuda + cpu)  # mixed devices
    assert ts.available([torch.randn(2, 3, 4, 5, device="cuda").to(memory_format=torch.channels_last)]) == HAS_TRITON


def test_env_switch(monkeypatch):
    monkeypatch.setenv("GRADGUARD_NO_TRITON", "1")
    assert not ts.available([torch.randn(3, device="cuda" if HAS_CUDA else "cpu")])


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and Triton")
def test_no_host_sync_on_cuda():
    g = torch.Generator().manual_seed(6)
    shapes = [(CHUNK32 * 2 + 1,), (7, 7), (0,)]
    grads = [torch.randn(s, generator=g).cuda() for s in shapes]
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out1 = ts.sumsq_maxabs(grads)  # a new layout: tables uploaded without a sync
        grads = [x.clone() for x in grads]  # new pointers: the table is re-uploaded
        out2 = ts.sumsq_maxabs(grads)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1], out2[1])
    check(grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_views_at_odd_offsets(device, dtype):
    """Views into one buffer at offsets that are not 16-byte multiples (bucketed DDP
    gradients): the launch must not assume aligned vectors."""
    g = torch.Generator().manual_seed(7)
    flat = torch.randn(3 * CHUNK32 + 50, generator=g).to(dtype).to(device)
    cuts = [1, 4, 4 + 2 * CHUNK32 + 3, 3 * CHUNK32 + 50]
    views = [flat[a:b] for a, b in zip(cuts, cuts[1:])]
    assert any(v.data_ptr() % 16 for v in views)
    check(views)
    lay = ts._layout(views, flat.device)
    assert lay.aligned == [False]
    check([flat[:CHUNK32 * 2], flat[CHUNK32 * 2:]])  # aligned views of the same buffer
    assert ts._layout([flat[:CHUNK32 * 2], flat[CHUNK32 * 2:]], flat.device).aligned == [True]
