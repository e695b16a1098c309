"""Property tests (hypothesis) for the clipping invariants."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradguard as gg

_BIG = float(np.float32(1e30))
finite = st.floats(min_value=-_BIG, max_value=_BIG, allow_nan=False, allow_infinity=False, width=32)
awkward = st.one_of(finite, st.sampled_from([0.0, 1e-30, -1e-30, 1e30, -1e30, 1e-45]))
arrays = st.lists(hnp.arrays(np.float32, st.integers(1, 40), elements=awkward), min_size=1, max_size=5)
thresholds = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False)


def _params(arrs):
    ps = []
    for a in arrs:
        p = torch.nn.Parameter(torch.zeros(len(a)))
        p.grad = torch.from_numpy(a.copy())
        ps.append(p)
    return ps


def _total(ps):
    return math.sqrt(sum(float(p.grad.double().norm()) ** 2 for p in ps))


def _clip(policy, ps):
    names = [f"p{i}" for i in range(len(ps))]
    policy.bind(names)
    stats = gg.grad_stats(list(zip(names, ps)))
    return policy.clip_(ps, [p.grad for p in ps], stats)


@settings(max_examples=150, deadline=None)
@given(arrays, thresholds)
def test_global_norm_bounded_direction_kept_idempotent(arrs, max_norm):
    ps = _params(arrs)
    before = [p.grad.double().clone() for p in ps]
    _clip(gg.GlobalNorm(max_norm), ps)
    after = [p.grad.double().clone() for p in ps]
    assert _total(ps) <= max_norm * (1 + 1e-6) + 1e-30
    flat_b, flat_a = torch.cat(before), torch.cat(after)
    if flat_b.norm() > 0 and flat_a.norm() > 0:
        cos = float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm()))
        assert cos == pytest.approx(1.0, abs=1e-5)  # same direction
        assert (torch.sign(flat_a) == torch.sign(flat_b))[flat_a != 0].all()
    # Clipping twice: the second clip is torch's clip_grad_norm_ of the once-clipped grads
    # (its coefficient max_norm / (t + 1e-6) is below 1 by up to 1e-6 / max_norm: at
    # max_norm = 1e-6 a second clip halves the gradient, so "idempotent" holds only where
    # torch's epsilon is negligible, and is asserted only there).
    ref = [torch.nn.Parameter(torch.zeros(len(a))) for a in after]
    for q, a in zip(ref, after):
        q.grad = a.float().clone()
    t_ref = float(torch.nn.utils.clip_grad_norm_(ref, max_norm))
    _clip(gg.GlobalNorm(max_norm), ps)
    if math.isfinite(t_ref):  # torch's float32 total overflows past ~1.8e19 per element
        for p, q in zip(ps, ref):
            torch.testing.assert_close(p.grad, q.grad, rtol=2e-6, atol=1e-37)
    if max_norm >= 1e-2:
        for p, a in zip(ps, after):
            torch.testing.assert_close(p.grad.double(), a, rtol=2e-6 + 1.01e-6 / max_norm, atol=1e-37)


@settings(max_examples=150, deadline=None)
@given(arrays, thresholds)
def test_per_tensor_norm_bounded_each(arrs, max_norm):
    ps = _params(arrs)
    _clip(gg.PerTensorNorm(max_norm), ps)
    for p in ps:
        assert float(p.grad.double().norm()) <= max_norm * (1 + 1e-6) + 1e-30
    once = [p.grad.clone() for p in ps]
    _clip(gg.PerTensorNorm(max_norm), ps)
    for p, a in zip(ps, once):
        torch.testing.assert_close(p.grad, a, rtol=2e-6, atol=1e-30)


@settings(max_examples=150, deadline=None)
@given(arrays, thresholds)
def test_value_bounded_and_idempotent(arrs, v):
    ps = _params(arrs)
    _clip(gg.Value(v), ps)
    vf = float(torch.tensor(v, dtype=torch.float32))
    for p in ps:
        assert float(p.grad.abs().max()) <= vf
    once = [p.grad.clone() for p in ps]
    _clip(gg.Value(v), ps)
    assert all(torch.equal(p.grad, a) for p, a in zip(ps, once))


@settings(max_examples=100, deadline=None)
@given(arrays, st.sampled_from([math.nan, math.inf, -math.inf]), st.data())
def test_nonfinite_never_touched(arrs, bad, data):
    ps = _params(arrs)
    k = data.draw(st.integers(0, len(ps) - 1))
    j = data.draw(st.integers(0, ps[k].grad.numel() - 1))
    ps[k].grad[j] = bad
    before = [p.grad.clone() for p in ps]
    for policy in (gg.GlobalNorm(1.0), gg.PerTensorNorm(1.0), gg.Value(0.5)):
        coefs = _clip(policy, ps)
        assert torch.equal(coefs, torch.ones_like(coefs))
        for p, b in zip(ps, before):
            assert torch.equal(p.grad.nan_to_num(), b.nan_to_num())
