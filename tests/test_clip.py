import copy
import math

import numpy as np

import pytest
import torch

import gradguard as gg

SHAPES = [[(5,)], [(3, 4), (4,)], [(64, 33), (33,), (7, 7, 3)], [(1,)] * 20, [(300, 200), (200,)]]
NORM_TYPES = [1.0, 2.0, math.inf, 3.0]


def _params(shapes, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.zeros(s, dtype=dtype))
        p.grad = (torch.randn(s, generator=g) * scale).to(dtype)
        ps.append(p)
    return ps


def _clone(ps):
    out = []
    for p in ps:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


CASES = dict(argnames="shapes, dtype, scale, max_norm",
             argvalues=[(sh, dt, sc, mn) for sh in SHAPES for dt in (torch.float32, torch.float64)
                        for sc, mn in [(1.0, 1.0), (10.0, 0.5), (1e-3, 1.0), (5.0, math.inf)]])


# p = 2 and inf read the statistics (kernel or torch path: both run); other p-norms are one
# torch.linalg pass whatever the statistics path, so they run once (not twice, identically)
@pytest.mark.parametrize(**CASES)
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_clip_grad_norm_matches_torch(stats_path, shapes, norm_type, dtype, scale, max_norm):
    _check_clip_grad_norm(shapes, norm_type, dtype, scale, max_norm)


@pytest.mark.parametrize(**CASES)
@pytest.mark.parametrize("norm_type", [1.0, 3.0])
def test_clip_grad_norm_other_p_matches_torch(shapes, norm_type, dtype, scale, max_norm):
    _check_clip_grad_norm(shapes, norm_type, dtype, scale, max_norm)


def _check_clip_grad_norm(shapes, norm_type, dtype, scale, max_norm):
    ours = _params(shapes, dtype, scale)
    ref = _clone(ours)
    n_ours = gg.clip_grad_norm_(ours, max_norm, norm_type)
    n_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    assert n_ours.item() == pytest.approx(n_ref.item(), rel=1e-6)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_low_precision(dtype, norm_type):
    # torch computes fp16/bf16 norms in the grad dtype; gradguard in float32.
    # Reference: torch on float32 copies, then rounded to the grad dtype.
    ours = _params([(64, 33), (33,), (100,)], dtype, 4.0)
    ref32 = [torch.nn.Parameter(p.detach().float()) for p in ours]
    for q, p in zip(ref32, ours):
        q.grad = p.grad.float()
    n_ours = gg.clip_grad_norm_(ours, 1.0, norm_type)
    n_ref = torch.nn.utils.clip_grad_norm_(ref32, 1.0, norm_type)
    assert n_ours.item() == pytest.approx(n_ref.item(), rel=1e-6)
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for a, b in zip(ours, ref32):
        torch.testing.assert_close(a.grad.float(), b.grad.to(dtype).float(), rtol=tol, atol=1e-4)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_clip_grad_norm_leaves_nonfinite_grads_untouched(stats_path, value):
    ps = _params([(10, 10), (10,)], scale=5.0)
    ps[1].grad[3] = value
    before = [p.grad.clone() for p in ps]
    total = gg.clip_grad_norm_(ps, 1.0)
    assert not math.isfinite(total.item())
    for p, b in zip(ps, before):
        assert torch.equal(p.grad.nan_to_num(), b.nan_to_num())
        assert torch.equal(p.grad.isnan(), b.isnan())
    # What torch does instead (the incumbent's behaviour, methods.md §1).
    ref = _params([(10, 10), (10,)], scale=5.0)
    ref[1].grad[3] = value
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert not torch.isfinite(ref[0].grad).all() or (ref[0].grad == 0).all()


def test_clip_grad_norm_error_if_nonfinite():
    ps = _params([(4,)])
    ps[0].grad[0] = math.nan
    with pytest.raises(RuntimeError, match="non-finite"):
        gg.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)


def test_clip_grad_norm_single_tensor_and_no_grads():
    p = torch.nn.Parameter(torch.zeros(3))
    assert gg.clip_grad_norm_(p, 1.0).item() == 0.0
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert gg.clip_grad_norm_(p, 1.0).item() == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("clip_value", [0.5, 1e-3, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_clip_grad_value_matches_torch(shapes, clip_value, dtype):
    ours = _params(shapes, dtype, 3.0)
    ref = _clone(ours)
    total = gg.clip_grad_value_(ours, clip_value)
    torch.nn.utils.clip_grad_value_(ref, clip_value)
    for a, b in zip(ours, ref):
        assert torch.equal(a.grad, b.grad)
    want = math.sqrt(sum(p.grad.double().norm().item() ** 2 for p in _params(shapes, dtype, 3.0)))
    assert total.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_clip_grad_value_leaves_nonfinite_untouched(value):
    ps = _params([(10, 10), (10,)], scale=5.0)
    ps[0].grad[2, 2] = value
    before = [p.grad.clone() for p in ps]
    total = gg.clip_grad_value_(ps, 0.5)
    assert not math.isfinite(total.item())
    for p, b in zip(ps, before):
        assert torch.equal(p.grad.nan_to_num(), b.nan_to_num())


def _apply(policy, ps, names=None):
    names = names or [f"p{i}" for i in range(len(ps))]
    policy.bind(names)
    stats = gg.grad_stats(list(zip(names, ps)))
    return policy.clip_(ps, [p.grad for p in ps], stats)


def test_per_tensor_norm_formula(stats_path):
    ps = _params([(10, 10), (5,), (3, 3)], scale=1.0)
    ps[1].grad.mul_(0.01)  # below the threshold: untouched
    before = [p.grad.double().clone() for p in ps]
    c = 0.7
    coefs = _apply(gg.PerTensorNorm(c), ps)
    for p, b, k in zip(ps, before, coefs):
        want = b * c / max(b.norm().item(), c)  # Keras clipnorm
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-6, atol=1e-12)
        assert k.item() == pytest.approx(c / max(b.norm().item(), c), rel=1e-6)
        assert p.grad.norm().item() <= c * (1 + 1e-6)


@pytest.mark.parametrize("norm_type", NORM_TYPES + [4.0, 0.5])
def test_global_norm_policy_equals_torch(stats_path, norm_type):
    ps = _params([(10, 10), (5,)], scale=3.0)
    ref = _clone(ps)
    coefs = _apply(gg.GlobalNorm(1.0, norm_type), ps)
    total = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type)
    assert coefs[0].item() == pytest.approx(1.0 / (total.item() + 1e-6), rel=1e-6)
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["host", "device"])
@pytest.mark.parametrize("norm_type", [1.0, 3.0, math.inf, "inf"])
@pytest.mark.parametrize("fused", [False, True])
def test_guard_global_norm_other_p_is_torchs(backend, norm_type, fused):
    """A guard with ``GlobalNorm(max_norm, p)`` clips with the p-norm, on every stepping path:
    its updates equal torch's clip_grad_norm_(p) + step (the L2 shortcut must not be taken)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    ref = copy.deepcopy(model)
    kw = dict(lr=0.5, fused=True) if fused else dict(lr=0.5)
    opt, ref_opt = torch.optim.SGD(model.parameters(), **kw), torch.optim.SGD(ref.parameters(), **kw)
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(0.1, norm_type), backend=backend, detectors=[])
    p = float(norm_type)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1, p)
        ref_opt.step()
        report = guard.step()
        assert want.item() > 0.1  # the threshold binds: the test can tell p-norms apart
        assert report.clip_coef == pytest.approx(0.1 / (want.item() + 1e-6), rel=1e-5)
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_value_policy_coefs():
    ps = _params([(4,), (4,)])
    ps[0].grad.copy_(torch.tensor([0.1, -2.0, 0.3, 0.0]))
    ps[1].grad.copy_(torch.tensor([0.1, 0.2, 0.0, 0.0]))
    coefs = _apply(gg.Value(0.5), ps)
    assert ps[0].grad.tolist() == pytest.approx([0.1, -0.5, 0.3, 0.0])
    assert coefs.tolist() == pytest.approx([0.25, 1.0])


def test_per_layer_wider_range_for_output_layer(stats_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    names = [n for n, _ in model.named_parameters()]
    ps = [p for _, p in model.named_parameters()]
    g = torch.Generator().manual_seed(3)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 10
    before = {n: p.grad.double().clone() for n, p in zip(names, ps)}
    policy = gg.PerLayer({"2.*": gg.GlobalNorm(5.0)}, default=gg.GlobalNorm(1.0))
    coefs = _apply(policy, ps, names)
    hidden = ["0.weight", "0.bias"]
    out = ["2.weight", "2.bias"]
    for group, c in ((hidden, 1.0), (out, 5.0)):
        total = math.sqrt(sum(before[n].norm().item() ** 2 for n in group))
        for n in group:
            p = ps[names.index(n)]
            torch.testing.assert_close(p.grad.double(), before[n] * (c / (total + 1e-6)), rtol=1e-6, atol=0)
            # the coefficient each tensor got is reported (the guard records the smallest)
            assert coefs[names.index(n)].item() == pytest.approx(c / (total + 1e-6), rel=1e-6)


def test_per_layer_default_none_leaves_rest_untouched():
    ps = _params([(3,), (3,)], scale=10.0)
    before = ps[1].grad.clone()
    coefs = _apply(gg.PerLayer({"p0": gg.Value(0.1)}), ps)
    assert torch.equal(ps[1].grad, before)
    assert coefs[1].item() == 1.0
    assert ps[0].grad.abs().max().item() == pytest.approx(0.1, rel=1e-7)


def test_per_layer_unknown_pattern_is_an_error():
    with pytest.raises(ValueError, match="'head.*'"):
        gg.PerLayer({"head.*": gg.GlobalNorm(1.0)}).bind(["body.weight", "body.bias"])


@pytest.mark.parametrize("make, match", [
    (lambda: gg.GlobalNorm(-1.0), "max_norm"),
    (lambda: gg.GlobalNorm(0.0), "max_norm"),
    (lambda: gg.GlobalNorm(math.nan), "max_norm"),
    (lambda: gg.GlobalNorm("1"), "max_norm"),
    (lambda: gg.GlobalNorm(True), "max_norm"),
    (lambda: gg.GlobalNorm(1.0, norm_type=0), "norm_type"),
    (lambda: gg.GlobalNorm(1.0, norm_type=math.nan), "norm_type"),
    (lambda: gg.GlobalNorm(1.0, norm_type=True), "norm_type"),
    (lambda: gg.GlobalNorm(1.0, norm_type="2"), "norm_type"),
    (lambda: gg.GlobalNorm(1.0, norm_type=-math.inf), "norm_type"),
    (lambda: gg.PerTensorNorm(-0.5), "max_norm"),
    (lambda: gg.Value(0), "clip_value"),
    (lambda: gg.Value(-math.inf), "clip_value"),
    (lambda: gg.PerLayer({}), "rules"),
    (lambda: gg.PerLayer({"a": 1.0}), "rules"),
    (lambda: gg.PerLayer({"a": gg.Value(1.0)}, default=3), "default"),
    (lambda: gg.clip_grad_norm_([], -1.0), "max_norm"),
    (lambda: gg.clip_grad_value_([], math.nan), "clip_value"),
    (lambda: gg.clip_grad_norm_([1.0], 1.0), "parameters"),
])
def test_invalid_arguments_name_the_argument(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_norm_type_inf_string_is_accepted():
    assert gg.GlobalNorm(1.0, norm_type="inf").norm_type == math.inf


def test_policy_state_dict_round_trip():
    pol = gg.PerLayer({"a*": gg.GlobalNorm(2.0)}, default=gg.Value(1.0))
    sd = pol.state_dict()
    other = gg.PerLayer({"a*": gg.GlobalNorm(2.0)}, default=gg.Value(1.0))
    other.load_state_dict(sd)
    assert other.state_dict() == sd
    with pytest.raises(ValueError, match="rules"):
        gg.PerLayer({"b*": gg.GlobalNorm(2.0)}).load_state_dict(sd)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("max_norm", [1.0, 0.05, 3.7, 1e9, math.inf])
def test_norm_coefficient_is_bitwise_the_same_on_both_backends(dtype, max_norm):
    """One formula, two array backends: numpy scalars (CPU guards) and tensors must agree
    bit for bit, and equal torch's clip_grad_norm_ coefficient where the total is finite."""
    from gradguard.backend import DEVICE, HOST, norm_coefficient

    rng = np.random.default_rng(0)
    with np.errstate(over="ignore"):  # 1e300 is meant to become inf in float32
        totals = np.concatenate([rng.lognormal(0, 8, 3000),
                                 [0, 1e-30, 1e-6, 0.999999, 1, 1e30, 3e38, 1e300, math.inf, math.nan]]).astype(dtype)
    want = norm_coefficient(max_norm, torch.from_numpy(totals), DEVICE).numpy()
    got = np.array([norm_coefficient(max_norm, np.asarray(t, dtype), HOST) for t in totals], dtype)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"))
    t = torch.from_numpy(totals)
    ref = torch.clamp(max_norm / (t + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_
    fin = torch.isfinite(t)
    np.testing.assert_array_equal(want[fin.numpy()], ref[fin].numpy())
    assert (want[~fin.numpy()] == 1).all()  # non-finite totals: never scaled (the step is skipped)


def test_policy_repr_and_config():
    assert repr(gg.GlobalNorm(1.5, "inf")) == "GlobalNorm(max_norm=1.5, norm_type=inf)"
    assert repr(gg.Value(0.5)) == "Value(clip_value=0.5)"
    assert gg.PerTensorNorm(2.0).config() == {"policy": "PerTensorNorm", "max_norm": 2.0}
    rules = {"a*": gg.Value(1.0)}
    assert gg.PerLayer(rules).config() == {"policy": "PerLayer", "rules": {"a*": gg.Value(1.0).config()},
                                           "default": None}
    assert gg.PerLayer(rules, default=gg.GlobalNorm(2.0)).config()["default"] == gg.GlobalNorm(2.0).config()


def test_scale_helper_scales_every_dtype_group():
    grads = [torch.tensor([1.0, -2.0]), torch.tensor([4.0], dtype=torch.float64), torch.tensor([8.0])]
    gg.ClipPolicy.scale_(grads, torch.tensor(0.25))
    assert [g.tolist() for g in grads] == [[0.25, -0.5], [1.0], [2.0]]
    assert grads[1].dtype == torch.float64
