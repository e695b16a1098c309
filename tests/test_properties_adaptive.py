"""Property tests (hypothesis) for the adaptive policies and the detectors.

Whatever sequence of gradients (NaN, +-Inf, 1e30, 1e-30, zeros, huge finite):
- no NaN ever enters a policy's or a detector's state;
- a step with NaN/Inf leaves the gradients untouched and the state unchanged;
- after clipping, the norm the policy bounds is within its threshold (1 + 1e-6);
- clipping only rescales: the direction (of the whole gradient for AutoClip /
  ZClip, of each tensor for AdaGC, of each unit for AGC) is preserved.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

import gradguard as gg
from gradguard.adaptive import AGC, AdaGC, AutoClip, ZClip
from gradguard.detect import default_detectors
from gradguard.guard import GLOBAL_COLS
from gradguard.layout import RowLayout

_BIG = float(np.float32(1e30))
finite = st.floats(min_value=-_BIG, max_value=_BIG, allow_nan=False, allow_infinity=False, width=32)
awkward = st.one_of(finite, st.sampled_from([0.0, 1e-30, -1e-30, 1e30, -1e30, 1e-45, 3e38, -3e38]))
poison = st.sampled_from([math.nan, math.inf, -math.inf])
SHAPES = [(3, 2), (4,), (2, 2)]
NAMES = ["a", "b", "c"]
SETTINGS = dict(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def step_grads(draw):
    """One step: a gradient per tensor, sometimes poisoned, sometimes scaled to a spike."""
    scale = draw(st.sampled_from([1.0, 1.0, 1e-20, 1e3, 1e20]))
    grads = []
    for shape in SHAPES:
        a = draw(hnp.arrays(np.float32, shape, elements=awkward)).astype(np.float64) * scale
        with np.errstate(over="ignore"):  # a scaled 1e30 becomes +-inf: one more poison
            grads.append(a.astype(np.float32))
    if draw(st.booleans()) and draw(st.booleans()):  # ~1 step in 4 poisoned
        t = draw(st.integers(0, len(SHAPES) - 1))
        grads[t].reshape(-1)[draw(st.integers(0, grads[t].size - 1))] = draw(poison)
    return grads


sequences = st.lists(step_grads(), min_size=1, max_size=12)


def _state_tensors(policy):
    sd = policy.state_dict()
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}


def _assert_no_nan(policy, where):
    for k, v in _state_tensors(policy).items():
        assert not torch.isnan(v).any(), f"{where}: NaN in {type(policy).__name__}.{k}"
    if isinstance(policy, ZClip) and policy.mean is not None:
        assert torch.isfinite(policy.mean) and torch.isfinite(policy.var) and policy.var >= 0, where


POLICIES = {
    "autoclip": lambda: AutoClip(percentile=30, history=5),
    "zclip": lambda: ZClip(warmup=2, z_thresh=1.0),
    "adagc": lambda: AdaGC(ratio=1.05, beta=0.9),
    "adagc_warm": lambda: AdaGC(warmup=2, warmup_max_norm=1.0),
    "agc": lambda: AGC(0.05),
}


def _run_policy(policy, seq, weights):
    params = [nn.Parameter(torch.from_numpy(w.copy())) for w in weights]
    policy.bind(NAMES)
    for i, grads in enumerate(seq):
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g.copy())
        stats = gg.grad_stats(list(zip(NAMES, params)))
        bad = bool(stats.bad)
        before = [p.grad.clone() for p in params]
        state_before = {k: v.clone() for k, v in _state_tensors(policy).items()}
        thr = _threshold_before(policy)
        coefs = policy.clip_(params, [p.grad for p in params], stats)
        where = f"step {i}"
        _assert_no_nan(policy, where)
        assert not torch.isnan(coefs).any() and (coefs >= 0).all() and (coefs <= 1).all(), where
        if bad:
            for p, b in zip(params, before):  # untouched, bitwise
                assert torch.equal(p.grad.nan_to_num(), b.nan_to_num()), where
            after = _state_tensors(policy)
            for k, v in state_before.items():
                if k in after and after[k].shape == v.shape:
                    assert torch.equal(after[k], v), f"{where}: {k} changed on a NaN step"
            continue
        _check_bounded_and_direction(policy, params, before, thr, where)
        if not isinstance(policy, AGC):  # AGC's coefficient is per unit, not per tensor
            for i, (p, b) in enumerate(zip(params, before)):  # exactly g * coef, in float32
                assert torch.equal(p.grad.view(torch.int32), (b * coefs[i].to(b.dtype)).view(torch.int32)), \
                    (where, NAMES[i])


def _threshold_before(policy):
    if isinstance(policy, ZClip):
        return None if policy.mean is None else (policy.mean.clone(), policy.var.clone(), policy._count.clone())
    if isinstance(policy, AdaGC):
        return {n: g.clone() for n, g in policy.gamma.items()}, (
            None if policy._count is None else int(policy._count))
    return None


def _cos(a, b):
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0 or not torch.isfinite(na * nb):
        return 1.0
    return float(a @ b / (na * nb))


TINY = float(torch.finfo(torch.float32).tiny)


def _normal(t) -> bool:
    """Every non-zero element is a normal float32: a rescale of it keeps 24 bits, so the
    direction survives to ~1e-7.  Subnormal elements (|x| < 1.2e-38) have fewer bits and a
    rescale rounds them to a multiple of 1.4e-45 (a gradient of 1e-45s scaled by 0.13 turns
    by cos 0.98), whatever the coefficient: that is float32, not the policy."""
    nz = t[t != 0].abs()
    return bool((nz >= TINY).all()) and bool((t * 0 == 0).all()) and \
        (nz.numel() == 0 or bool((nz.min() * 1e-7 >= TINY)))


def _within(norm_after, bound, norm_before):
    """norm_after <= bound (1 + 1e-6), unless the coefficient bound / norm_before is below
    float32's normal range (< 1.2e-38: a 1e44 spike against a 1e-6 threshold): the
    float32 coefficient is then subnormal and only approximately right."""
    if norm_before > 0 and bound / norm_before < TINY:
        return True
    return norm_after <= bound * (1 + 1e-6) + 1e-30


def _check_bounded_and_direction(policy, params, before, thr, where):
    after = [p.grad for p in params]
    total_before = math.sqrt(sum(float(b.double().norm()) ** 2 for b in before))
    for a, b in zip(after, before):  # a rescale never flips a sign nor creates a value
        assert ((torch.sign(a) == torch.sign(b)) | (a == 0)).all(), where
        assert torch.isfinite(a).all(), where
    total = math.sqrt(sum(float(a.double().norm()) ** 2 for a in after))
    if isinstance(policy, AutoClip):
        t = float(policy.threshold())
        assert math.isinf(t) or _within(total, t, total_before), (where, total, t)
        assert _cos(torch.cat([a.reshape(-1) for a in after]), torch.cat([b.reshape(-1) for b in before])) \
            == pytest.approx(1.0, abs=1e-5)
    elif isinstance(policy, ZClip):
        if thr is not None and int(thr[2]) >= policy.warmup:
            mean, var = float(thr[0]), float(thr[1])
            g = math.sqrt(sum(float(b.double().norm()) ** 2 for b in before))
            z = (g - mean) / (math.sqrt(var) + policy.eps)
            if z > policy.z_thresh:
                bound = mean + policy.z_thresh * math.sqrt(var) / (z / policy.z_thresh)
                assert _within(total, bound, total_before), (where, total, bound)
        assert _cos(torch.cat([a.reshape(-1) for a in after]), torch.cat([b.reshape(-1) for b in before])) \
            == pytest.approx(1.0, abs=1e-5)
    elif isinstance(policy, AdaGC):
        gammas, count = thr
        for n, a, b in zip(NAMES, after, before):
            if _normal(b) and _normal(a):
                assert _cos(a, b) == pytest.approx(1.0, abs=1e-5), (where, n)
            in_warmup = count is not None and count < policy.warmup or count is None and policy.warmup > 0
            gam = float(gammas.get(n, torch.tensor(math.inf)))
            if not in_warmup and math.isfinite(gam):
                assert _within(float(a.double().norm()), policy.ratio * gam, float(b.double().norm())), (where, n)
        if count is None and policy.warmup > 0 or count is not None and count < policy.warmup:
            assert _within(total, policy.warmup_max_norm, total_before), where
    elif isinstance(policy, AGC):
        for p, a, b in zip(params, after, before):
            rows_a = a.double().reshape(a.shape[0], -1) if a.ndim > 1 else a.double().reshape(1, -1)
            rows_b = b.double().reshape(b.shape[0], -1) if b.ndim > 1 else b.double().reshape(1, -1)
            w = p.detach().double()
            w = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
            limit = policy.clipping * w.norm(dim=1).clamp(min=policy.eps)
            # float32 rounding of the rescaled elements: a relative 1e-6 margin
            assert (rows_a.norm(dim=1) <= limit * (1 + 1e-6) + 1e-30).all() | \
                (rows_a.norm(dim=1) <= rows_b.norm(dim=1)).all(), where
            assert (rows_a.norm(dim=1) <= torch.maximum(limit, rows_b.norm(dim=1)) * (1 + 1e-6)).all(), where
            for ra, rb in zip(rows_a, rows_b):
                assert _cos(ra, rb) == pytest.approx(1.0, abs=1e-5), where


weights = st.tuples(*[hnp.arrays(np.float32, s, elements=st.floats(-10, 10, width=32)) for s in SHAPES])


@pytest.mark.parametrize("name", list(POLICIES))
@settings(**SETTINGS)
@given(seq=sequences, w=weights)
def test_adaptive_policy_invariants(name, seq, w):
    _run_policy(POLICIES[name](), seq, w)


# ----------------------------------------------------------------- detectors
def _guard():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    return gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), detectors=[])


row_value = st.one_of(st.floats(min_value=0, max_value=_BIG, width=32),
                      st.sampled_from([0.0, 1e-30, 1e30, math.nan, math.inf, -math.inf, 3e38]))


@st.composite
def rows(draw, n_layers):
    steps = draw(st.integers(1, 30))
    out = np.empty((steps, RowLayout(n_layers).width), np.float32)
    for i in range(steps):
        vals = [draw(row_value) for _ in range(out.shape[1])]
        out[i] = vals
        bad = draw(st.booleans()) and draw(st.booleans())
        out[i, GLOBAL_COLS.index("bad")] = float(bad)
        out[i, GLOBAL_COLS.index("skipped")] = float(bad)
        out[i, GLOBAL_COLS.index("loss_bad")] = float(draw(st.booleans()) and draw(st.booleans()))
        out[i, GLOBAL_COLS.index("clip_coef")] = draw(st.sampled_from([1.0, 0.5, 1e-5, math.nan]))
        if draw(st.booleans()):  # steady stretches, so baselines form and rules can fire
            out[i] = out[i - 1] if i else out[i]
        # the guard's contract: "bad" is set whenever the global norm or a max |g| is non-finite
        g = len(GLOBAL_COLS)
        if not np.isfinite(out[i, GLOBAL_COLS.index("global_norm")]) or \
                not np.isfinite(out[i, g + n_layers:]).all():
            out[i, GLOBAL_COLS.index("bad")] = out[i, GLOBAL_COLS.index("skipped")] = 1.0
    return out


def _numbers(x, path=""):
    """Every float in a (nested) state, with its path."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(x, (float, np.floating)):
        yield path, float(x)


# Baselines that must only hold finite numbers (per-layer rings keep None/NaN for a
# missing layer by design: they are nan-medians over finite log norms).
FINITE_KEYS = ("hist", "recent", "coefs", "gnorms")


@settings(**SETTINGS)
@given(data=st.data())
def test_detector_state_never_absorbs_nan(data):
    guard = _guard()
    dets = default_detectors()
    for d in dets:
        d.bind(guard.run)
    batch = data.draw(rows(len(guard.names)))
    steps = list(range(len(batch)))
    for d in dets:
        d.update(steps, batch, guard.run)
        sd = d.state_dict()
        for key in FINITE_KEYS:
            if key not in sd:
                continue
            for path, v in _numbers(sd[key], key):
                if key == "recent" and path.endswith("]") and path.count("[") > 2:
                    continue  # per-layer log norms inside "recent": NaN = layer without gradient
                assert math.isfinite(v), f"{type(d).__name__}.{path} = {v}"
        # and the state round-trips (what resume relies on)
        fresh = type(d)()
        fresh.bind(guard.run)
        fresh.load_state_dict(sd)
        assert _canon(fresh.state_dict()) == _canon(sd)


def _canon(x):
    if isinstance(x, dict):
        return {k: _canon(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_canon(v) for v in x]
    if isinstance(x, (float, np.floating)) and math.isnan(x):
        return "nan"
    return x


def test_over_clipping_detector_guards_its_own_baseline():
    guard = _guard()
    det = next(d for d in default_detectors() if type(d).__name__ == "OverClippingDetector")
    det.bind(guard.run)
    row = np.zeros((1, RowLayout(len(guard.names)).width), np.float32)
    row[0, GLOBAL_COLS.index("global_norm")] = math.nan
    row[0, GLOBAL_COLS.index("clip_coef")] = 1.0
    det.update([0], row, guard.run)
    assert all(math.isfinite(v) for v in det.state_dict()["gnorms"])


def test_adagc_zero_then_subnormal_gradients():
    """The counter-example hypothesis found (a tensor's gradient zero, then tiny): AdaGC's
    coefficient is its formula, and the clipped gradient is exactly ``g * h`` in float32;
    only the subnormal rounding of that product turns the direction (cos 0.98), which is
    why the direction property is asserted on normal floats only."""
    policy = AdaGC(ratio=1.05, beta=0.9)
    tiny = np.array([1e-45, 3e-45, 0, 0, 0, 0], np.float32).reshape(3, 2)
    seq = [[np.zeros(s, np.float32) for s in SHAPES],
           [tiny, np.ones(4, np.float32), np.ones((2, 2), np.float32)],
           [tiny * 8, np.ones(4, np.float32), np.ones((2, 2), np.float32)]]
    params = [nn.Parameter(torch.zeros(s)) for s in SHAPES]
    policy.bind(NAMES)
    coefs, norms, gammas = [], [], []
    for grads in seq:
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g.copy())
        stats = gg.grad_stats(list(zip(NAMES, params)))
        norms.append(stats.norms[0].clone())
        before = params[0].grad.clone()
        coefs.append(policy.clip_(params, [p.grad for p in params], stats))
        gammas.append(policy.gamma["a"].clone())
        assert torch.equal(params[0].grad.view(torch.int32), (before * coefs[-1][0]).view(torch.int32))
    # step 0 (zero): unseen, untouched, gamma 0 (= not seen); step 1: gamma initialised to
    # the norm, untouched; step 2: h = min(1, ratio * gamma / norm), the docstring's formula
    # on the float32 numbers the statistics report (subnormal: few bits, hence not 1.05/8)
    assert coefs[0].tolist() == [1.0, 1.0, 1.0] and coefs[1].tolist() == [1.0, 1.0, 1.0]
    assert float(gammas[0]) == 0.0 and torch.equal(gammas[1], norms[1]) and float(norms[1]) > 0
    n2 = norms[2].to(gammas[1].dtype)  # the state's dtype (float64 on CPU)
    want = torch.clamp(1.05 * gammas[1] / n2, max=1.0)
    assert torch.equal(coefs[2][0], want.to(coefs[2].dtype)) and 0 < float(want) < 1.05 / 8 * 1.2
    assert float(coefs[2][1]) == 1.0 and float(coefs[2][2]) == 1.0
    assert float(gammas[2]) == pytest.approx(0.9 * float(gammas[1]) + 0.1 * float(want) * float(n2), rel=1e-12)
