"""Regression tests for defects found in review (one test per defect)."""
from functools import partial
import gc
import math
import threading

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg

from _helpers import mlp


_model = partial(mlp, 4, 8, 2)


def _loss(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)
    return nn.functional.mse_loss(model(x), y)


def test_adagc_does_not_freeze_a_tensor_whose_first_norm_is_zero():
    # LoRA-like: B starts at zero, so A's first gradient is zero.
    A = nn.Parameter(torch.randn(3, 4) * 0.1)
    B = nn.Parameter(torch.zeros(2, 3))
    opt = torch.optim.SGD([A, B], lr=0.1)
    for policy in (gg.AdaGC(), gg.AdaGC(warmup=1)):
        guard = gg.Guard([("A", A), ("B", B)], opt, clip=policy, detectors=[])
        a0 = A.detach().clone()
        for s in range(4):
            opt.zero_grad()
            x = torch.randn(4, 5, generator=torch.Generator().manual_seed(s))
            (B @ A @ x - 1.0).pow(2).sum().backward()  # step 0: A's gradient is exactly 0
            guard.step()
        assert not torch.equal(A, a0), "A never moved: its EMA norm froze at 0"


def test_per_tensor_norm_inf_measures_without_clipping():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, clip=gg.PerTensorNorm(math.inf), detectors=[])
    _loss(model).backward()
    before = [p.grad.clone() for p in model.parameters()]
    r = guard.step()
    assert r.clip_coef == 1.0 and not r.skipped
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_same_tensor_under_two_names_is_refused():
    w = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="'b.weight' is the same tensor as 'a.weight'"):
        gg.grad_stats([("a.weight", w), ("b.weight", w)])


def test_fused_sgd_param_whose_first_grad_is_on_a_skipped_step():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    ref_a, ref_b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1, momentum=0.9, fused=True)
    ref = torch.optim.SGD([{"params": [ref_a]}, {"params": [ref_b]}], lr=0.1, momentum=0.9, fused=True)
    guard = gg.Guard([("a", a), ("b", b)], opt, detectors=[])
    for p, q in ((a, ref_a),):  # step 0: only `a` has a gradient
        p.grad, q.grad = torch.ones(3), torch.ones(3)
    guard.step()
    ref.step()
    a.grad, b.grad = torch.ones(3), torch.full((3,), 12345.0)  # step 1: b's first grad, NaN loss
    assert guard.step(loss=math.nan).skipped
    for p, q in ((a, ref_a), (b, ref_b)):  # step 2: both, fine
        p.grad, q.grad = torch.ones(3), torch.ones(3)
    guard.step()
    ref.step()
    torch.testing.assert_close(a.detach(), ref_a.detach())
    torch.testing.assert_close(b.detach(), ref_b.detach())


def test_raise_mode_records_the_step_and_its_event(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, on_nonfinite="raise", log_dir=tmp_path, run_name="r")
    for s in range(3):
        opt.zero_grad()
        loss = _loss(model, s)
        loss.backward()
        if s == 1:
            with pytest.raises(gg.NonFiniteGradientError):
                guard.step(loss=loss * math.nan)
        else:
            guard.step(loss=loss)
    assert guard.skipped_steps == 1
    guard.close()
    store = gg.RunStore(tmp_path)
    assert store.steps("r")["step"].tolist() == [0, 1, 2]
    assert [(e.step, e.kind) for e in store.events("r") if e.kind == "nonfinite"] == [(1, "nonfinite")]


def test_agc_with_a_zero_size_parameter():
    w, empty = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.zeros(0, 4))
    w.grad, empty.grad = torch.randn(3, 4), torch.zeros(0, 4)
    opt = torch.optim.SGD([w, empty], lr=0.1)
    guard = gg.Guard([("w", w), ("empty", empty)], opt, clip=gg.AGC(0.01), detectors=[])
    assert guard.step().clip_coef <= 1.0


def test_closure_optimizers():
    model = _model()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(1.0), detectors=[])

    def closure():
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        return loss

    first = closure()
    before = [p.detach().clone() for p in model.parameters()]
    guard.step(loss=first, closure=closure)
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_failed_load_state_dict_leaves_the_guard_untouched(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    donor = gg.Guard(model, opt, clip=gg.AutoClip(history=16), detectors=[])
    for s in range(5):
        opt.zero_grad()
        _loss(model, s).backward()
        donor.step()
    sd = donor.state_dict()
    g = gg.Guard(model, opt, clip=gg.AutoClip(history=32), detectors=[], log_dir=tmp_path, run_name="c")
    with pytest.raises(ValueError):
        g.load_state_dict(sd)
    assert g.steps == 0 and g.recorder.run_name == "c"
    g2 = gg.Guard(model, opt, clip=gg.AutoClip(history=16), log_dir=tmp_path, run_name="d")
    with pytest.raises(ValueError, match="detector"):
        g2.load_state_dict(sd)
    assert g2.steps == 0 and (tmp_path / "d").is_dir()
    g.close()
    g2.close()


def test_unclosed_guards_do_not_leak_writer_threads(tmp_path):
    before = threading.active_count()
    for i in range(4):
        model = _model()
        g = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), log_dir=tmp_path, run_name=f"r{i}")
        del g
    gc.collect()
    for _ in range(50):
        if threading.active_count() <= before:
            break
        threading.Event().wait(0.05)
    assert threading.active_count() <= before


def test_close_closes_the_store_even_if_the_last_flush_raises(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, log_dir=tmp_path, run_name="r", flush_every=4,
                     remedies={"nonfinite": gg.Raise()}, backend="device")  # the poisoned row waits
    opt.zero_grad()
    _loss(model).backward()
    guard.step(loss=math.nan)  # pending in the buffer: the Raise remedy fires at flush
    with pytest.raises(gg.GuardAlarm):
        guard.close()
    assert not guard.recorder._thread.is_alive()
    assert gg.RunStore(tmp_path).runs()[0]["status"] != "running"


def test_detectors_argument_is_checked():
    model = _model()
    with pytest.raises(TypeError, match=r"detectors\[0\]"):
        gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), detectors=[object()])


def test_numpy_scalar_thresholds():
    assert gg.Value(np.float32(0.5)).clip_value == 0.5
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert gg.clip_grad_norm_(p, np.float64(1.0)).item() == pytest.approx(math.sqrt(12))
