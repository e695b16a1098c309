import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.stats import compute_stats

from conftest import no_host_sync

SHAPES = [(1,), (7,), (3, 5), (64, 33), (2, 3, 4, 5), (0,), (70000,), (300, 257)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _named(grads):
    params = []
    for i, g in enumerate(grads):
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g
        params.append((f"p{i}", p))
    return params


def _ref(g):
    d = g.double()
    finite = bool(torch.isfinite(d).all())
    return (d.norm().item(), d.abs().max().item() if g.numel() else 0.0, not finite)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64_reference(stats_path, dtype):
    torch.manual_seed(0)
    grads = [torch.randn(s).to(dtype) * 3 for s in SHAPES]
    s = gg.grad_stats(_named(grads))
    assert s.names == [f"p{i}" for i in range(len(SHAPES))]
    # The kernel accumulates in float64; torch's foreach norm in float32 for fp16/bf16.
    rtol = 1e-6 if stats_path == "kernel" or dtype in (torch.float32, torch.float64) else 2e-5
    for i, g in enumerate(grads):
        n, m, bad = _ref(g)
        assert s.norms[i].item() == pytest.approx(n, rel=rtol, abs=1e-30)
        assert s.max_abs[i].item() == pytest.approx(m, rel=rtol)
        assert bool(s.nonfinite[i]) is bad
    total = math.sqrt(sum(_ref(g)[0] ** 2 for g in grads))
    assert s.global_norm.item() == pytest.approx(total, rel=rtol)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert s.norms.dtype == expected and s.global_norm.dtype == expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e30, 1e-30])
def test_awkward_values(stats_path, dtype, value):
    torch.manual_seed(1)
    grads = [torch.randn(50, 20).to(dtype), torch.randn(300).to(dtype), torch.randn(9).to(dtype)]
    grads[1][17] = value
    s = gg.grad_stats(_named(grads))
    stored = grads[1][17].double().item()  # 1e30 overflows fp16 to inf, 1e-30 flushes to 0
    nonfinite = not math.isfinite(stored)
    assert s.nonfinite.tolist() == [False, nonfinite, False]
    # Neighbours are never affected by the bad tensor.
    for i in (0, 2):
        assert s.norms[i].item() == pytest.approx(grads[i].double().norm().item(), rel=1e-6)
    if math.isnan(stored):
        assert math.isnan(s.max_abs[1].item()) and math.isnan(s.global_norm.item())
    elif math.isinf(stored):
        assert s.max_abs[1].item() == math.inf and s.global_norm.item() == math.inf
    else:
        assert s.max_abs[1].item() == pytest.approx(grads[1].double().abs().max().item(), rel=1e-6)
        assert math.isfinite(s.global_norm.item()) or dtype != torch.float64
    assert bool(s.bad) is (nonfinite or not math.isfinite(s.global_norm.item()))


def test_huge_finite_float32_is_not_flagged(stats_path):
    # 1e30**2 overflows float32.  The kernel accumulates in float64 and gets it
    # right; torch's foreach norm overflows to inf, which `bad` then reports
    # (an overflowing norm is never silently used as a clip divisor).
    g = torch.full((1000,), 1e30)
    s = gg.grad_stats(_named([g]))
    assert not bool(s.nonfinite[0])
    if stats_path == "kernel":
        assert s.norms[0].item() == pytest.approx(1e30 * math.sqrt(1000), rel=1e-6)
        assert not bool(s.bad)
    else:
        assert s.norms[0].item() == math.inf and bool(s.bad)


def test_missing_grads_are_known_by_name():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    m[1](torch.randn(5, 4)).sum().backward()
    s = gg.grad_stats(m)
    assert s.names == ["1.weight", "1.bias"]
    assert s.missing == ["0.weight", "0.bias"]


def test_non_contiguous_and_mixed_dtypes(stats_path):
    a = torch.randn(40, 30).t()  # not contiguous
    b = torch.randn(17).to(torch.bfloat16)
    c = torch.randn(5, 5, dtype=torch.float64)
    s = gg.grad_stats(_named([a, b, c]))
    assert s.norms.dtype == torch.float64
    for i, g in enumerate([a, b, c]):
        assert s.norms[i].item() == pytest.approx(g.double().norm().item(), rel=1e-6)
        assert s.max_abs[i].item() == pytest.approx(g.double().abs().max().item(), rel=1e-6)


def test_subset_recomputes_global_norm():
    grads = [torch.randn(10), torch.randn(20), torch.randn(30)]
    s = gg.grad_stats(_named(grads))
    sub = s.subset([0, 2])
    assert sub.names == ["p0", "p2"]
    want = math.sqrt(grads[0].double().norm() ** 2 + grads[2].double().norm() ** 2)
    assert sub.global_norm.item() == pytest.approx(want, rel=1e-6)


def test_no_host_sync(stats_path):
    grads = [torch.randn(100, 10), torch.randn(10).half()]
    named = _named(grads)
    with no_host_sync():
        s = gg.grad_stats(named)
        _ = s.bad
    assert len(s) == 2


def test_empty_grad_list():
    s = compute_stats([], [])
    assert len(s) == 0 and s.global_norm.item() == 0.0


@pytest.mark.parametrize("bad, exc, match", [
    (torch.zeros(3), TypeError, "model"),
    ([], ValueError, "no parameters"),
    ([("a", torch.zeros(2, dtype=torch.int64))], TypeError, "'a'"),
    ([("a", torch.zeros(2)), ("a", torch.zeros(2))], ValueError, "twice"),
    ([torch.zeros(2)], TypeError, "pairs"),
    (42, TypeError, "model"),
])
def test_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        gg.grad_stats(bad)


def test_sparse_grad_refused():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    p.grad = torch.zeros(4, 3).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        gg.grad_stats([("emb", p)])


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "transposed"])
def test_channels_last_gradients_take_the_kernel(fmt, monkeypatch):
    """Conv weights under channels_last are dense: the kernel reads them (norm and max|g| do not
    depend on the order); a transposed (strided) gradient goes through torch's ops. Same numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    if fmt == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 9, 9)
    model(x).square().mean().backward()
    if fmt == "transposed":
        w = model[0].weight
        w.grad = w.grad.transpose(2, 3).contiguous().transpose(2, 3)  # same values, strided
    if fmt == "channels_last":
        assert not model[0].weight.grad.is_contiguous()
    seen = []  # how many tensors the C kernel read
    real = gg._kernel.cpu_stats_packed
    monkeypatch.setattr(gg._kernel, "cpu_stats_packed", lambda gs, dts: seen.append(len(gs)) or real(gs, dts))
    s = gg.grad_stats(model)
    if gg._kernel.available():
        assert sum(seen) == (3 if fmt == "transposed" else 4)
    grads = [p.grad for p in model.parameters()]
    want = torch.stack([g.double().norm() for g in grads])
    torch.testing.assert_close(s.norms.double(), want, rtol=1e-6, atol=0)
    assert torch.equal(s.max_abs, torch.stack([g.abs().max() for g in grads]))


@pytest.mark.parametrize("backend", ["host", "device"])
def test_stats_keep_the_backend_asked_for(stats_path, backend):
    """The decision runs on the backend the guard chose: numpy for a CPU guard, tensors for
    the device lane (run on CPU too); ``host()`` reads fields on the host backend only."""
    from gradguard.backend import DEVICE, HOST

    xp = HOST if backend == "host" else DEVICE
    s = compute_stats(["a", "b"], [torch.tensor([3.0, -4.0]), torch.tensor([[12.0]])], xp=xp)
    assert s.xp is xp
    if xp is HOST:
        assert s.host("norms").tolist() == [5.0, 12.0] and s.host("max_abs").tolist() == [4.0, 12.0]
    else:
        assert s.host("norms") is None and s.host("max_abs") is None
    assert s.norms.tolist() == [5.0, 12.0] and float(s.global_norm) == 13.0 and not bool(s.bad)


def test_stats_of_no_gradients():
    s = compute_stats([], [])
    assert len(s) == 0 and s.norms.shape == (0,) and s.max_abs.shape == (0,)
    assert float(s.global_norm) == 0.0 and not bool(s.bad)


@pytest.mark.parametrize("missing_index", [0, 1])
def test_prepared_statistics_fall_back_when_a_gradient_is_missing(missing_index):
    """A guard's ``Statistics`` prepares the kernel's dtypes for all its parameters once; on a
    step where one has no gradient, the rest are read with their own dtypes (the general path),
    equal to ``compute_stats`` on the same gradients."""
    from gradguard.backend import HOST
    from gradguard.stats import Statistics

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(7, generator=g, dtype=torch.float32), torch.randn(5, generator=g, dtype=torch.float64)]
    names = ["w", "b"]
    prepared = Statistics(params, HOST)
    keep = [i for i in range(2) if i != missing_index]
    grads = [params[i] * 3 for i in keep]
    got = prepared([names[i] for i in keep], grads, [names[missing_index]])
    ref = compute_stats([names[i] for i in keep], grads, [names[missing_index]], xp=HOST)
    assert got.missing == ref.missing == [names[missing_index]]
    torch.testing.assert_close(torch.as_tensor(got.norms), torch.as_tensor(ref.norms), rtol=0, atol=0)
    torch.testing.assert_close(torch.as_tensor(got.max_abs), torch.as_tensor(ref.max_abs), rtol=0, atol=0)
    assert float(got.total) == float(ref.total)
