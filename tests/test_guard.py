import copy
from functools import partial
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg

from _helpers import assert_bitwise, mlp
from conftest import no_host_sync

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    "sgd_fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, fused=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam_fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5, weight_decay=0.01),
}


_model = partial(mlp, 6, 16, 16, 2)


def _batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)


def _state(model, opt):
    """Everything a skipped step must leave bitwise unchanged."""
    out = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    for i, (p, st) in enumerate(opt.state.items()):
        for k, v in st.items():
            out[f"state:{i}:{k}"] = v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
    return out


_assert_bitwise = assert_bitwise  # integer views: -0.0 != 0.0, NaN payloads count


POISON = {2: "nan_grad", 4: "inf_loss", 5: "neg_inf_grad"}


def _poison(model, step, kind):
    if kind == "nan_grad":
        model[2].weight.grad[1, 3] = math.nan
    elif kind == "neg_inf_grad":
        model[4].bias.grad[0] = -math.inf


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("clip", [None, "global"])
def test_skip_matrix_bitwise(opt_name, clip):
    """good, good, NaN, good, Inf-loss, -Inf, good...: skipped steps change nothing, and the
    good steps match a run that never saw the poisoned batches (the same optimizer)."""
    model = _model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    policy = gg.GlobalNorm(0.5) if clip else None
    guard = gg.Guard(model, opt, clip=policy)

    ref_model = _model()
    ref_opt = OPTIMIZERS[opt_name](ref_model.parameters())
    ref_guard = gg.Guard(ref_model, ref_opt, clip=gg.GlobalNorm(0.5) if clip else None)

    for i in range(8):
        x, y = _batch(i)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        kind = POISON.get(i)
        _poison(model, i, kind)
        if kind == "inf_loss":
            loss = loss * math.inf
        before = _state(model, opt)
        report = guard.step(loss=loss)
        assert report.step == i
        if kind:
            assert report.skipped
            after = _state(model, opt)
            if i == 0:
                continue
            _assert_bitwise(before, after)
        else:
            assert not report.skipped
            ref_opt.zero_grad()
            nn.functional.mse_loss(ref_model(x), y).backward()
            ref_guard.step()
            for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
                assert torch.equal(p, q), (i, n)
    assert guard.skipped_steps == 3
    kinds = [(e.step, e.kind, e.severity) for e in guard.events]
    assert kinds == [(2, "nonfinite", "critical"), (4, "nonfinite", "critical"), (5, "nonfinite", "critical")]
    assert guard.events[0].layers == ["2.weight"]
    assert guard.events[1].layers == [] and "loss" in guard.events[1].message
    assert guard.events[2].layers[0] == "4.bias"


@pytest.mark.parametrize("opt_name", ["sgd", "adamw_foreach", "adamw_fused", "sgd_fused"])
def test_first_step_skipped_then_trajectory_unchanged(opt_name):
    model, ref = _model(), _model()
    opt, ref_opt = OPTIMIZERS[opt_name](model.parameters()), OPTIMIZERS[opt_name](ref.parameters())
    guard = gg.Guard(model, opt)
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    model[0].weight.grad[0, 0] = math.nan
    assert guard.step().skipped
    for i in range(1, 4):
        x, y = _batch(i)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
        guard.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_guard_global_norm_equals_clip_then_step(fused, max_norm):
    model, ref = _model(), _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=fused)
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(max_norm))
    assert guard.fused is fused
    for i in range(5):
        x, y = _batch(i)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
        total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        ref_opt.step()
        report = guard.step()
        assert report.global_norm == pytest.approx(total.item(), rel=1e-6)
        assert report.clip_coef == pytest.approx(min(1.0, max_norm / (total.item() + 1e-6)), rel=1e-6)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_fused_path_has_no_host_sync():
    """The accelerator path (skip through found_inf, clip through grad_scale), run on CPU."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(1.0), flush_every=16, backend="device")
    for i in range(5):
        x, y = _batch(i)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if i == 3:
            model[0].bias.grad[0] = math.nan
        before = _state(model, opt)
        if i == 0:  # the optimizer's state does not exist yet: one host read (see guard.py)
            report = guard.step(loss=loss)
        else:
            with no_host_sync():
                report = guard.step(loss=loss)
        # the device lane ran (the host lane reads numpy: no_host_sync alone cannot tell them apart)
        assert report.stats.xp.on_host is False and torch.is_tensor(report.skipped_t)
        if i == 3:  # skipped through found_inf: nothing moved
            _assert_bitwise(before, _state(model, opt))
    assert guard.skipped_steps == 1 and guard.events[0].step == 3


def test_on_nonfinite_raise_names_layers():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, on_nonfinite="raise")
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    model[2].weight.grad[0, 0] = math.inf
    before = _state(model, opt)
    with pytest.raises(gg.NonFiniteGradientError, match="2.weight") as info:
        guard.step()
    assert info.value.layers == ["2.weight"] and info.value.step == 0
    assert str(info.value) == f"step 0: {info.value.event.message}"  # the message alone, not the args
    _assert_bitwise(before, _state(model, opt))


def test_on_nonfinite_warn_steps_anyway():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, on_nonfinite="warn")
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    model[4].bias.grad[1] = math.nan
    with pytest.warns(RuntimeWarning, match="4.bias"):
        report = guard.step()
    assert not report.skipped
    assert math.isnan(model[4].bias[1].item())  # the user asked for it


def test_nan_origin_named_first():
    """NaN made in the last layer flows back to every earlier layer; the culprit is listed first."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt)
    x, y = _batch(0)
    h = model[:4](x)
    out = model[4](h)
    (out * torch.tensor([math.nan, 1.0])).sum().backward()  # NaN enters at the output layer
    guard.step()
    ev = guard.events[0]
    assert ev.layers[0] in ("4.bias", "4.weight")
    assert set(ev.layers) >= {"0.weight", "2.weight", "4.weight"}


def test_step_report_and_counters():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(1e-3))
    x, y = _batch(0)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    r = guard.step(loss=loss)
    assert r.step == 0 and not r.skipped and r.loss == pytest.approx(loss.item())
    assert r.clip_coef < 1 and r.global_norm > 1e-3
    assert r.stats.names == [n for n, _ in model.named_parameters()]
    assert "StepReport(step=0" in repr(r)
    assert guard.steps == 1 and guard.last_report is r


def test_frozen_parameters_are_known_but_skipped():
    model = _model()
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    guard = gg.Guard(model, opt)
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    r = guard.step()
    assert "0.weight" in r.stats.missing and "0.weight" not in r.stats.names


def test_state_dict_round_trip():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, clip=gg.PerLayer({"4.*": gg.GlobalNorm(5.0)}, default=gg.GlobalNorm(1.0)))
    for i in range(3):
        x, y = _batch(i)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if i == 1:
            model[0].bias.grad[0] = math.nan
        guard.step()
    sd = guard.state_dict()
    other = gg.Guard(model, opt, clip=gg.PerLayer({"4.*": gg.GlobalNorm(5.0)}, default=gg.GlobalNorm(1.0)))
    other.load_state_dict(sd)
    assert other.state_dict() == sd
    assert other.steps == 3 and other.skipped_steps == 1 and other.events[0].step == 1
    # survives torch.save / torch.load (what users do with checkpoints)
    import io
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False) == sd
    opt.zero_grad()
    nn.functional.mse_loss(model(_batch(9)[0]), _batch(9)[1]).backward()
    assert other.step().step == 3


def test_load_state_dict_from_another_model():
    model = _model()
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    other_model = nn.Linear(3, 3)
    other = gg.Guard(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="another model"):
        other.load_state_dict(guard.state_dict())
    with pytest.raises(TypeError, match="state_dict"):
        other.load_state_dict({"step": 1})
    future = dict(guard.state_dict(), version=99)
    with pytest.raises(ValueError, match="upgrade"):
        guard.load_state_dict(future)


def test_errors_name_the_argument():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="on_nonfinite"):
        gg.Guard(model, opt, on_nonfinite="ignore")
    with pytest.raises(TypeError, match="clip"):
        gg.Guard(model, opt, clip=1.0)
    with pytest.raises(TypeError, match="optimizer"):
        gg.Guard(model, "sgd")
    with pytest.raises(ValueError, match="no parameters"):
        gg.Guard([], opt)
    with pytest.raises(ValueError, match="flush_every"):
        gg.Guard(model, opt, flush_every=0)
    stray = nn.Parameter(torch.zeros(3, 2))
    opt2 = torch.optim.SGD(list(model.parameters()) + [stray], lr=0.1)
    with pytest.raises(ValueError, match=r"does not watch .*\(3, 2\)"):
        gg.Guard(model, opt2)


def test_step_misuse():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt)
    with pytest.raises(RuntimeError, match="backward"):
        guard.step()
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    guard.step()
    with pytest.raises(RuntimeError, match="twice"):
        guard.step()
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    guard.step()  # a new backward makes it legal again
    with pytest.raises(ValueError, match="scalar"):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        guard.step(loss=torch.ones(3))


def test_named_parameter_iterable_and_per_layer_guard():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(list(model.named_parameters()), opt, clip=gg.Value(0.01))
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    guard.step()
    assert all(p.grad.abs().max().item() <= 0.01 + 1e-9 for p in model.parameters())


def test_training_converges_like_plain_clipping():
    """A real small regression problem: the guard's run tracks plain clip_grad_norm_ + SGD."""
    torch.manual_seed(0)
    X = torch.randn(256, 6)
    W = torch.randn(6, 2)
    Y = torch.tanh(X @ W)

    def run(use_guard):
        model = _model(seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        guard = gg.Guard(model, opt, clip=gg.GlobalNorm(1.0)) if use_guard else None
        losses = []
        for step in range(150):
            idx = torch.arange(step * 16, step * 16 + 16) % 256
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(X[idx]), Y[idx])
            loss.backward()
            if guard:
                guard.step(loss=loss)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            losses.append(loss.item())
        return model, losses

    m1, l1 = run(True)
    m2, l2 = run(False)
    assert l1[-1] < 0.2 * l1[0]
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_composition(fused):
    """guard.step() replaces scaler.step(optimizer): unscale, clip, skip, step."""
    model, ref = _model(), _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(0.1), scaler=scaler)
    for i in range(4):
        x, y = _batch(i)
        opt.zero_grad()
        ref_opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        ref_scaler.scale(nn.functional.mse_loss(ref(x), y)).backward()
        if i == 2:  # NaN loss with finite grads: the scaler alone would step
            loss = loss * math.nan
        before = _state(model, opt)
        r = guard.step(loss=loss)
        scaler.update()
        if i == 2:
            assert r.skipped
            _assert_bitwise(before, _state(model, opt))
            ref_scaler.update(ref_scaler.get_scale() / 2)  # mirror the back-off our skip caused
            continue
        ref_scaler.unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert [e.kind for e in guard.events] == ["nonfinite"]  # a NaN loss is not a scaler overflow


def test_grad_scaler_overflow_is_an_info_event():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    guard = gg.Guard(model, opt, scaler=scaler)
    x, y = _batch(0)
    loss = nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    model[0].weight.grad[0, 0] = math.inf  # what an fp16 overflow of the scaled gradient leaves
    before = _state(model, opt)
    assert guard.step(loss=loss).skipped
    scaler.update()
    _assert_bitwise(before, _state(model, opt))
    assert scaler.get_scale() < 2.0 ** 16  # the scaler backed off
    (ev,) = guard.events
    assert (ev.kind, ev.severity) == ("amp_overflow", "info")


def test_reused_grad_address_is_not_mistaken_for_a_double_step():
    """zero_grad(set_to_none=True) frees the grads; the next ones may reuse their id()."""
    model = nn.Linear(4, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = gg.Guard(model, opt, detectors=[])
    x = torch.ones(2, 4)
    for _ in range(50):
        opt.zero_grad(set_to_none=True)
        model(x).sum().backward()
        guard.step()  # never raises "called twice"
    assert guard.steps == 50


def test_nonfinite_advice_depends_on_the_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(3, 8, batch_first=True)
            self.out = nn.Linear(8, 1)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt)
    model(torch.randn(4, 5, 3)).sum().backward()
    model.rnn.weight_hh_l0.grad[0, 0] = math.nan
    guard.step()
    (ev,) = [e for e in guard.events if e.kind == "nonfinite"]
    assert ev.layers[0] == "rnn.weight_hh_l0"
    assert any("LSTM" in a for a in ev.advice) and any("tbptt" in a for a in ev.advice)


@pytest.mark.parametrize("clip", [None, gg.GlobalNorm(1e-3), gg.Value(1e-3)])
def test_double_step_detected_after_clipping(clip):
    """Clipping bumps the gradients' version counters; a second step must still be caught."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, clip=clip)
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    guard.step()
    with pytest.raises(RuntimeError, match="twice"):
        guard.step()


_OPTS = {
    "fused-adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
}
_CLIPS = {
    "none": lambda: None,
    "global-clips": lambda: gg.GlobalNorm(0.05),  # below the usual norm: clips most steps
    "global-idle": lambda: gg.GlobalNorm(1e9),
    "per-tensor": lambda: gg.PerTensorNorm(0.1),
    "autoclip": lambda: gg.AutoClip(percentile=50, history=5),
}


class _RowTap:
    """A detector that keeps every row it is given (and finds nothing)."""

    def bind(self, guard):
        self.rows = []

    def update(self, steps, rows, guard):
        self.rows.append(np.array(rows))
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass


@pytest.mark.parametrize("loss_kind", ["tensor", "float"])
@pytest.mark.parametrize("clip", list(_CLIPS))
@pytest.mark.parametrize("opt_name", list(_OPTS))
def test_host_and_device_backends_decide_alike(opt_name, clip, loss_kind):
    """CPU guards decide skip / scale on the host from the kernel's numbers and the step's row;
    the accelerator path keeps them in tensors (found_inf / grad_scale).  Same run, bitwise the
    same weights, optimizer state, reports, events and rows (a NaN gradient, a NaN loss, a x1e3
    spike and a step where one tensor has no gradient included)."""
    torch.set_num_threads(1)  # bitwise comparison of two runs
    runs = []
    for host in (True, False):
        model = _model()
        opt = _OPTS[opt_name](model.parameters())
        tap = _RowTap()
        guard = gg.Guard(model, opt, clip=_CLIPS[clip](), flush_every=4, param_norm_every=3,
                         detectors=[*gg.detect.default_detectors(), tap],
                         backend="host" if host else "device")
        assert guard._xp.on_host == host
        reports = []
        for i in range(12):
            x, y = _batch(i)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if i == 4:
                model[0].weight.grad[0, 0] = math.nan
            if i == 7:
                loss = loss * math.nan
            if i == 9:
                for p in model.parameters():
                    p.grad.mul_(1e3)
            if i == 10:
                model[4].bias.grad = None
            r = guard.step(loss=loss if loss_kind == "tensor" else float(loss.detach()))
            tensors = [r.global_norm_t, r.clip_coef_t, r.skipped_t, r.loss_t]
            reports.append((bool(r.skipped), repr(float(r.global_norm)), float(r.clip_coef), repr(r.loss),
                            [(t.dtype, t.shape, repr(t.item())) for t in tensors]))
        guard.flush()
        rows = np.concatenate(tap.rows)
        runs.append((_state(model, opt), reports, [e.to_dict() for e in guard.events], guard.skipped_steps,
                     rows))
    (s_host, rep_host, ev_host, sk_host, rows_host), (s_dev, rep_dev, ev_dev, sk_dev, rows_dev) = runs
    _assert_bitwise(s_host, s_dev)
    assert rep_host == rep_dev
    assert ev_host == ev_dev and sk_host == sk_dev == 2
    assert rows_host.shape == (12, rows_dev.shape[1])
    np.testing.assert_array_equal(rows_host.view(np.uint32), rows_dev.view(np.uint32))
    assert any(c < 1 for _, _, c, _, _ in rep_host) == (clip not in ("none", "global-idle"))


def test_cpu_default_flush_interval_and_poisoned_steps_flush_at_once(tmp_path):
    """CPU default: rows reach detectors, remedies and the store every 16 steps, except that a
    poisoned step is flushed at once (its remedy acts before the next step)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, log_dir=tmp_path, run_name="r",
                     remedies={"nonfinite": gg.LRBackoff(patience=1)})
    assert guard.flush_every == 16

    def step(i, poison=False):
        x, y = _batch(i)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if poison:
            model[0].bias.grad[0] = math.nan
        guard.step()

    for i in range(3):
        step(i)
    assert len(guard._buffer) == 3 and opt.param_groups[0]["lr"] == 0.1
    step(3, poison=True)
    assert len(guard._buffer) == 0 and opt.param_groups[0]["lr"] == 0.05  # acted at once
    for i in range(4, 19):
        step(i)
    assert len(guard._buffer) == 15
    step(19)  # rows 4..19: a full interval
    assert len(guard._buffer) == 0
    guard.recorder.flush()
    assert gg.RunStore(tmp_path).steps("r")["step"].tolist() == list(range(20))
    guard.close()


def test_guards_of_different_dtypes_alternate():
    """The kernel's per-layout cache never hands one guard's dtype codes to another."""
    models = {dt: nn.Sequential(nn.Linear(6, 16), nn.Linear(16, 2)).to(dt)
              for dt in (torch.float32, torch.bfloat16, torch.float64, torch.float16)}
    guards = {dt: gg.Guard(m, torch.optim.SGD(m.parameters(), lr=0.0)) for dt, m in models.items()}
    for i in range(3):
        for dt, m in models.items():
            x, y = _batch(i)
            m.zero_grad()
            nn.functional.mse_loss(m(x.to(dt)).float(), y).backward()
            want = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in m.parameters()]))
            got = guards[dt].step().global_norm
            assert got == pytest.approx(float(want), rel=1e-6), dt


@pytest.mark.parametrize("backend", ["host", "device"])
@pytest.mark.parametrize("every", [1, 3, 0])
def test_rows_hold_each_parameter_norm_before_the_step(backend, every):
    """The per-tensor parameter-norm block: torch's vector_norm of each parameter as it was
    when the step was taken (before the update), on measuring steps; NaN on the others.  The
    ``param_norm`` column is their L2 total."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    tap = _RowTap()
    guard = gg.Guard(model, opt, detectors=[tap], flush_every=5, param_norm_every=every, backend=backend)
    lay = gg.layout.RowLayout(len(guard.names))
    want = []
    for i in range(7):
        x, y = _batch(i)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        want.append([torch.linalg.vector_norm(p.detach().double()).item() for p in model.parameters()])
        guard.step()
    guard.flush()
    rows = np.concatenate(tap.rows)
    assert rows.shape == (7, lay.width)
    for i, w in enumerate(want):
        got = lay.param_norms(rows[i])
        if every and i % every == 0:
            np.testing.assert_allclose(got, w, rtol=1e-6)
            np.testing.assert_allclose(lay.column(rows[i], "param_norm"), np.linalg.norm(w), rtol=1e-6)
        else:
            assert np.isnan(got).all() and np.isnan(lay.column(rows[i], "param_norm"))


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_overflow_under_warn_is_recorded_as_the_skip_it_is(fused, tmp_path):
    """With on_nonfinite="warn" the guard applies a poisoned step, but a GradScaler skips a step
    whose gradients are non-finite: the report, the row, the event and the scheduler say so
    (the weights do not move, the schedule does not advance)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused or None)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    guard = gg.Guard(model, opt, scaler=scaler, on_nonfinite="warn", scheduler=sched, log_dir=tmp_path,
                     run_name="amp")
    x, y = _batch(0)
    loss = nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    model[0].weight.grad[0, 0] = math.inf  # what an fp16 overflow of the scaled gradient leaves
    before = _state(model, opt)
    report = guard.step(loss=loss)
    scaler.update()
    assert report.skipped and guard.skipped_steps == 1
    _assert_bitwise(before, _state(model, opt))
    assert sched.last_epoch == 0 and scaler.get_scale() < 2.0 ** 16
    (ev,) = guard.events
    assert (ev.kind, ev.severity, ev.data["skipped"]) == ("amp_overflow", "info", True)
    assert ev.message.endswith("step skipped.")
    guard.close()
    from gradguard.record.store import RunStore
    assert RunStore(tmp_path).steps("amp")["skipped"].tolist() == [1]


@pytest.mark.parametrize("fault", ["nan_grad", "scale_overflow"])
def test_under_a_scaler_the_rerun_tells_a_real_nan_from_an_overflow(fault):
    """guard.step(rerun=) re-runs a poisoned step unscaled: an overflow of the scale (float16
    autocast, a scale of 2**30) is finite there and stays the scaler's info event; a NaN made
    in the backward (a hook on 2.weight) is non-finite there too: a critical nonfinite event
    naming its producer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 30 if fault == "scale_overflow" else 2.0 ** 8)
    guard = gg.Guard(model, opt, clip=None, on_nonfinite="warn", scaler=scaler, flush_every=1)
    model[2].weight.register_hook(lambda g: g * math.nan if fault == "nan_grad" and guard.steps == 1 else g)
    g = torch.Generator().manual_seed(0)

    def loss_fn(x, y):
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.functional.cross_entropy(model(x).float(), y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(3):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            opt.zero_grad()
            loss = loss_fn(x, y)
            scaler.scale(loss).backward()
            guard.step(loss, rerun=lambda: loss_fn(x, y))
            scaler.update()
        ev = guard.events[0]
    if fault == "nan_grad":
        assert (ev.step, ev.kind, ev.severity, ev.layers[0]) == (1, "nonfinite", "critical", "2.weight")
        assert ev.data["origin"]["module"] == "2" and "not an overflow of the scale" in ev.message
    else:
        assert (ev.step, ev.kind, ev.severity) == (0, "amp_overflow", "info") and "origin" not in ev.data
