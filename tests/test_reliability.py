"""Validation at every public entry point: bad input gives a ValueError/TypeError that
names the argument and the accepted range, before anything is changed.

Also the misuse a training loop can make of the guard: parameters that never get a
gradient, sparse gradients, integer/complex parameters, parameters on the meta
device, an optimizer with parameters the guard does not see, ``guard.step`` twice
without a backward, and ``load_state_dict`` from another model or policy.
"""
from functools import partial
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.adaptive import AGC, AdaGC, AutoClip, ZClip
from gradguard.detect import (ExplodingDetector, LossSpikeDetector, OverClippingDetector, SpikeDetector,
                              VanishingDetector, WeightGrowthDetector)
from gradguard.record import RunStore

from _helpers import mlp

NAN, INF = math.nan, math.inf


def _ps():
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    return [p]


# (label, call, exception, regex that must name the argument and the range)
BAD_THRESHOLDS = [
    ("GlobalNorm-neg", lambda: gg.GlobalNorm(-1.0), ValueError, r"max_norm must be a positive number"),
    ("GlobalNorm-zero", lambda: gg.GlobalNorm(0), ValueError, r"max_norm must be a positive"),
    ("GlobalNorm-nan", lambda: gg.GlobalNorm(NAN), ValueError, r"max_norm .*got nan"),
    ("GlobalNorm-ninf", lambda: gg.GlobalNorm(-INF), ValueError, r"max_norm .*got -inf"),
    ("GlobalNorm-nan-tensor", lambda: gg.GlobalNorm(torch.tensor(NAN)), ValueError, r"max_norm"),
    ("GlobalNorm-str", lambda: gg.GlobalNorm("1"), TypeError, r"max_norm must be a positive number"),
    ("GlobalNorm-bool", lambda: gg.GlobalNorm(True), TypeError, r"max_norm"),
    ("GlobalNorm-norm_type", lambda: gg.GlobalNorm(1.0, norm_type=-2), ValueError, r"norm_type must be > 0"),
    ("GlobalNorm-norm_type-nan", lambda: gg.GlobalNorm(1.0, norm_type=NAN), ValueError, r"norm_type"),
    ("PerTensorNorm-nan", lambda: gg.PerTensorNorm(NAN), ValueError, r"max_norm"),
    ("Value-neg", lambda: gg.Value(-0.5), ValueError, r"clip_value must be a positive"),
    ("Value-nan", lambda: gg.Value(NAN), ValueError, r"clip_value"),
    ("clip_grad_norm_-nan", lambda: gg.clip_grad_norm_(_ps(), NAN), ValueError, r"max_norm"),
    ("clip_grad_value_-neg", lambda: gg.clip_grad_value_(_ps(), -1), ValueError, r"clip_value"),
    ("clip_grad_norm_-not-tensors", lambda: gg.clip_grad_norm_([1.0], 1.0), TypeError, r"parameters\[0\]"),
    ("AutoClip-pct-neg", lambda: AutoClip(-0.1), ValueError, r"percentile must be in \[0, 100\]"),
    ("AutoClip-pct-big", lambda: AutoClip(100.01), ValueError, r"percentile must be in \[0, 100\]"),
    ("AutoClip-pct-nan", lambda: AutoClip(NAN), ValueError, r"percentile must be in \[0, 100\]"),
    ("AutoClip-pct-inf", lambda: AutoClip(INF), ValueError, r"percentile must be in \[0, 100\]"),
    ("AutoClip-pct-str", lambda: AutoClip("10"), TypeError, r"percentile"),
    ("AutoClip-history", lambda: AutoClip(history=0), ValueError, r"history must be an int >= 1"),
    ("AutoClip-history-float", lambda: AutoClip(history=2.5), TypeError, r"history must be an int"),
    ("ZClip-alpha-nan", lambda: ZClip(alpha=NAN), ValueError, r"alpha must be in the open interval \(0, 1\)"),
    ("ZClip-alpha-1", lambda: ZClip(alpha=1.0), ValueError, r"alpha .*\(0, 1\)"),
    ("ZClip-z-inf", lambda: ZClip(z_thresh=INF), ValueError, r"z_thresh must be a positive number \(finite\)"),
    ("ZClip-z-neg", lambda: ZClip(z_thresh=-1), ValueError, r"z_thresh"),
    ("ZClip-warmup", lambda: ZClip(warmup=0), ValueError, r"warmup must be an int >= 1"),
    ("ZClip-eps", lambda: ZClip(eps=0), ValueError, r"eps"),
    ("AdaGC-ratio-nan", lambda: AdaGC(ratio=NAN), ValueError, r"ratio"),
    ("AdaGC-beta-0", lambda: AdaGC(beta=0.0), ValueError, r"beta .*\(0, 1\)"),
    ("AdaGC-warmup-neg", lambda: AdaGC(warmup=-1), ValueError, r"warmup must be an int >= 0"),
    ("AdaGC-warmup_max_norm-inf", lambda: AdaGC(warmup_max_norm=INF), ValueError, r"warmup_max_norm"),
    ("AGC-clipping-inf", lambda: AGC(INF), ValueError, r"clipping"),
    ("AGC-clipping-neg", lambda: AGC(-0.01), ValueError, r"clipping"),
    ("AGC-eps-nan", lambda: AGC(eps=NAN), ValueError, r"eps"),
    ("AGC-exclude-type", lambda: AGC(exclude=[3]), TypeError, r"exclude"),
    ("PerLayer-empty", lambda: gg.PerLayer({}), TypeError, r"rules"),
    ("PerLayer-policy", lambda: gg.PerLayer({"a.*": 1.0}), TypeError, r"rules\['a\.\*'\]"),
    ("Spike-z-nan", lambda: SpikeDetector(z=NAN), ValueError, r"z must be a finite number > 0"),
    ("Spike-ratio-lt1", lambda: SpikeDetector(ratio=0.5), ValueError, r"ratio must be >= 1"),
    ("Spike-window", lambda: SpikeDetector(window=1), ValueError, r"window must be an int >= 2"),
    ("Exploding-absurd-inf", lambda: ExplodingDetector(absurd=INF), ValueError, r"absurd"),
    ("Exploding-monotone", lambda: ExplodingDetector(depth_monotone=NAN), ValueError, r"depth_monotone"),
    ("LossSpike-abs_min-neg", lambda: LossSpikeDetector(abs_min=-1), ValueError, r"abs_min must be a finite number >= 0"),
    ("Vanishing-rel-0", lambda: VanishingDetector(rel=0), ValueError, r"rel must be a finite number > 0"),
    ("Vanishing-patience", lambda: VanishingDetector(patience=0), ValueError, r"patience"),
    ("WeightGrowth-growth-nan", lambda: WeightGrowthDetector(growth=NAN), ValueError, r"growth"),
    ("OverClipping-frac", lambda: OverClippingDetector(frac=1.5), ValueError, r"frac must be in \(0, 1\]"),
    ("OverClipping-frac-nan", lambda: OverClippingDetector(frac=NAN), ValueError, r"frac"),
    ("Cooldown-neg", lambda: SpikeDetector(cooldown=-1), ValueError, r"cooldown must be an int >= 0"),
    ("LRBackoff-factor", lambda: gg.LRBackoff(factor=1.5), ValueError, r"factor .*\(0, 1\)"),
    ("LRBackoff-factor-nan", lambda: gg.LRBackoff(factor=NAN), ValueError, r"factor"),
    ("LRBackoff-patience", lambda: gg.LRBackoff(patience=0), ValueError, r"patience must be an int >= 1"),
    ("Rollback-every", lambda: gg.Rollback(every=0), ValueError, r"every must be an int >= 1"),
    ("Rollback-skip", lambda: gg.Rollback(skip_batches=-1), ValueError, r"skip_batches must be an int >= 0"),
    ("FlightRecorder-keep", lambda: gg.FlightRecorder("d", keep=0), ValueError, r"keep must be an int >= 1"),
    ("FlightRecorder-loss_fn", lambda: gg.FlightRecorder("d", loss_fn=3), TypeError, r"loss_fn must be callable"),
    ("RunStore-log_dir", lambda: RunStore(3), TypeError, r"log_dir must be a path"),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD_THRESHOLDS], ids=[b[0] for b in BAD_THRESHOLDS])
def test_bad_arguments_name_the_argument_and_range(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_threshold_leaves_gradients_untouched():
    ps = _ps()
    with pytest.raises(ValueError):
        gg.clip_grad_norm_(ps, -1.0)
    assert torch.equal(ps[0].grad, torch.ones(3))


# ------------------------------------------------------------------ the guard
_model = partial(mlp, 3, 4, 2)


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


def _backward(model, x=None):
    model(torch.randn(5, 3) if x is None else x).pow(2).mean().backward()


GUARD_ARGS = [
    ("on_nonfinite", dict(on_nonfinite="ignore"), ValueError, r"on_nonfinite must be one of"),
    ("clip", dict(clip=1.0), TypeError, r"clip must be a gradguard ClipPolicy"),
    ("flush_every-0", dict(flush_every=0), ValueError, r"flush_every must be an int >= 1"),
    ("flush_every-float", dict(flush_every=2.0), TypeError, r"flush_every"),
    ("param_norm_every", dict(param_norm_every=-1), ValueError, r"param_norm_every must be an int >= 0"),
    ("scaler", dict(scaler=object()), TypeError, r"scaler must be a torch.amp.GradScaler"),
    ("remedies-type", dict(remedies=["lr_backoff"]), TypeError, r"remedies must be a dict"),
    ("remedies-key", dict(remedies={"explode": "lr_backoff"}), ValueError, r"remedies: unknown key 'explode'"),
    ("remedies-action", dict(remedies={"spike": "shrug"}), ValueError, r"remedies\['spike'\]: unknown action"),
    ("remedies-skip", dict(remedies={"spike": "skip"}), ValueError, r"'skip' works only for 'nonfinite'"),
    ("log_rank", dict(log_rank=3), ValueError, r"log_rank must be a rank in \[0, 1\)"),
    ("run_name", dict(log_dir="LOG", run_name="../evil"), ValueError, r"run_name must be"),
    ("PerLayer-typo", dict(clip=gg.PerLayer({"head.*": gg.GlobalNorm(1.0)})), ValueError,
     r"pattern 'head\.\*' matches no parameter"),
    ("AGC-exclude-typo", dict(clip=AGC(exclude="fc.*")), ValueError, r"exclude: pattern 'fc\.\*'"),
]


@pytest.mark.parametrize("kwargs,exc,match", [g[1:] for g in GUARD_ARGS], ids=[g[0] for g in GUARD_ARGS])
def test_guard_arguments(kwargs, exc, match, tmp_path):
    model = _model()
    kwargs = {k: (tmp_path if v == "LOG" else v) for k, v in kwargs.items()}
    with pytest.raises(exc, match=match):
        gg.Guard(model, _sgd(model), **kwargs)
    assert not any(tmp_path.iterdir())  # a refused guard leaves no run behind


def test_log_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    model = _model()
    with pytest.raises(ValueError, match="log_dir must be a directory"):
        gg.Guard(model, _sgd(model), log_dir=f)


@pytest.mark.parametrize("model,exc,match", [
    ([], ValueError, r"model: no parameters to watch"),
    (nn.ReLU(), ValueError, r"model: no parameters to watch"),
    (torch.ones(3), TypeError, r"model: .*single Tensor"),
    (42, TypeError, r"model: expected an nn.Module"),
    ([("w",)], TypeError, r"model: expected .*pairs"),
    ([("w", nn.Parameter(torch.ones(2))), ("w", nn.Parameter(torch.ones(2)))], ValueError, r"'w' appears twice"),
    ([("w", torch.zeros(3, dtype=torch.int64))], TypeError, r"parameter 'w' has dtype torch.int64"),
    ([("c", nn.Parameter(torch.zeros(3, dtype=torch.complex64)))], TypeError,
     r"parameter 'c' has dtype torch.complex64; gradguard watches real floating-point"),
], ids=["empty-list", "no-params", "tensor", "int", "pair-shape", "duplicate", "integer-param", "complex-param"])
def test_guard_model_argument(model, exc, match):
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(exc, match=match):
        gg.Guard(model, opt)


def test_optimizer_holding_unwatched_parameters():
    model = _model()
    stray = nn.Parameter(torch.zeros(7, 2))
    opt = torch.optim.SGD([{"params": model.parameters()}, {"params": [stray], "lr": 1.0}], lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer holds 1 parameter\(s\) the guard does not watch "
                                         r"\(shapes \[\(7, 2\)\]\)"):
        gg.Guard(model, opt)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        gg.Guard(model, [stray])


def test_sparse_gradients_refused_clearly_and_nothing_stepped():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    guard = gg.Guard(emb, opt)
    before = emb.weight.detach().clone()
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"parameter 'weight' has a sparse gradient .*dense gradients only"):
        guard.step()
    assert torch.equal(emb.weight, before)
    with pytest.raises(TypeError, match="sparse"):
        gg.grad_stats(emb)


def test_step_without_backward_and_twice_on_the_same_gradients():
    model = _model()
    opt = _sgd(model)
    guard = gg.Guard(model, opt)
    with pytest.raises(RuntimeError, match=r"no watched parameter has a gradient; call loss.backward\(\)"):
        guard.step()
    _backward(model)
    guard.step()
    after = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="called twice on the same gradients"):
        guard.step()
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters()))  # nothing stepped
    assert guard.steps == 1
    # gradient accumulation without zero_grad: a new backward makes a new step legal
    _backward(model)
    guard.step()
    assert guard.steps == 2


def test_loss_argument():
    model = _model()
    guard = gg.Guard(model, _sgd(model))
    _backward(model)
    with pytest.raises(ValueError, match=r"loss must be a scalar, got shape \(3,\)"):
        guard.step(loss=torch.ones(3))


def test_loss_of_the_wrong_type_names_the_argument():
    model = _model()
    guard = gg.Guard(model, _sgd(model))
    _backward(model)
    with pytest.raises(TypeError, match=r"loss must be a Tensor or a real number"):
        guard.step(loss="x")


def test_frozen_parameters_are_not_an_error():
    model = _model()
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    guard = gg.Guard(model, opt)
    for _ in range(3):
        opt.zero_grad()
        _backward(model)
        r = guard.step()
        assert r.stats.missing == ["0.weight"] and not r.skipped
    assert not [e for e in guard.events if "0.weight" in e.layers]


def test_parameters_that_never_get_gradients_are_reported_once():
    from gradguard.detect import UnusedDetector

    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, detectors=[UnusedDetector(patience=5)])
    for _ in range(12):
        opt.zero_grad()
        model["used"](torch.randn(4, 3)).sum().backward()
        guard.step()
    (ev,) = [e for e in guard.events if e.kind == "unused"]
    assert ev.severity == "warning" and ev.step == 4
    assert sorted(ev.layers) == ["unused.bias", "unused.weight"]
    assert "no gradient" in ev.message


def test_meta_device_parameters_refused_clearly():
    # Mixed real devices cannot be tested on a CPU-only machine; the meta device is the
    # nearest case: a model built with torch.device("meta") and not yet materialised.
    a = nn.Parameter(torch.ones(3))
    b = nn.Parameter(torch.ones(3, device="meta"))
    with pytest.raises(ValueError, match=r"parameter 'b' is on the meta device"):
        gg.Guard([("a", a), ("b", b)], torch.optim.SGD([a, b], lr=0.1))


# ------------------------------------------------------------- load_state_dict
def _trained_guard(clip=None, model=None):
    model = model or _model()
    opt = _sgd(model)
    guard = gg.Guard(model, opt, clip=clip)
    for _ in range(3):
        opt.zero_grad()
        _backward(model)
        guard.step()
    return guard


def test_load_state_dict_from_another_model():
    sd = _trained_guard().state_dict()
    lin = nn.Linear(3, 3)
    other = gg.Guard(lin, _sgd(lin))
    with pytest.raises(ValueError, match=r"saved for another model \(parameter names differ"):
        other.load_state_dict(sd)
    assert other.steps == 0  # nothing half-loaded
    for bad in ({"step": 1}, [1, 2], None, "state"):
        with pytest.raises(TypeError, match="state_dict must be a dict made by Guard.state_dict"):
            other.load_state_dict(bad)
    with pytest.raises(ValueError, match="upgrade gradguard"):
        _trained_guard().load_state_dict(dict(sd, version=99))


def test_load_state_dict_with_other_detectors():
    sd = _trained_guard().state_dict()
    model = _model()
    other = gg.Guard(model, _sgd(model), detectors=[])
    with pytest.raises(ValueError, match=r"\d+ detector states, the guard has 0 detectors"):
        other.load_state_dict(sd)


@pytest.mark.parametrize("saved,now", [("autoclip", "zclip"), ("autoclip", None), ("zclip", "global")])
def test_load_state_dict_from_another_clip_policy(saved, now):
    make = {"autoclip": lambda: AutoClip(), "zclip": lambda: ZClip(), "global": lambda: gg.GlobalNorm(1.0),
            None: lambda: None}
    sd = _trained_guard(make[saved]()).state_dict()
    model = _model()
    other = gg.Guard(model, _sgd(model), clip=make[now]())
    with pytest.raises(ValueError, match=r"state_dict was saved with clip="):
        other.load_state_dict(sd)
