"""Detectors: scripted failure scenarios, healthy runs, awkward values, state round trips."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import detect as D
from gradguard.guard import GLOBAL_COLS

from conftest import assert_same

WARN = ("warning", "critical")


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: extra threads only fight the other test processes for the 2 cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train(model, opt, batches, steps, *, loss_fn=nn.functional.mse_loss, before_step=None, stop_at_bad=False,
          **kw):
    """Run a guarded loop; return (guard, first step whose loss or gradient was non-finite)."""
    guard = gg.Guard(model, opt, **kw)
    first_bad = None
    for i in range(steps):
        x, y = batches(i)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if before_step is not None:
            before_step(i, model)
        grads_ok = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        if first_bad is None and not (math.isfinite(loss.item()) and grads_ok):
            first_bad = i
        guard.step(loss)
        if stop_at_bad and first_bad is not None:
            break
    guard.flush()
    return guard, first_bad


def regression(width, seed_shift=0):
    def batches(i):
        g = torch.Generator().manual_seed(i + seed_shift)
        x = torch.randn(32, width, generator=g)
        return x, torch.sin(x[:, :1]) + 0.1 * x[:, 1:2]
    return batches


def of(guard, kind):
    return [e for e in guard.events if e.kind == kind]


def serious(guard):
    return [e for e in guard.events if e.severity in WARN]


# ------------------------------------------------------------------ scenarios
def test_deep_tanh_mlp_large_init_explodes_through_depth_at_step_0():
    torch.manual_seed(0)
    layers = []
    for _ in range(20):
        lin = nn.Linear(32, 32)
        nn.init.normal_(lin.weight, 0, 8.0 / math.sqrt(32))
        layers += [lin, nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard, _ = train(model, opt, regression(32), 12)
    ev = of(guard, "exploding")
    assert ev and ev[0].step == 0 and ev[0].data["rule"] == "depth"
    assert ev[0].layers[0] == "0.weight"  # the input end holds the largest norms
    # per-layer growth factor in the message matches the recorded norms
    assert ev[0].data["ratio"] > 1e3 and "per layer" in ev[0].message
    assert any("Xavier" in a for a in ev[0].advice) and any("LayerNorm" in a for a in ev[0].advice)


def test_deep_sigmoid_mlp_small_init_vanishes_first_layers_named():
    torch.manual_seed(0)
    layers = []
    for _ in range(10):
        lin = nn.Linear(32, 32)
        nn.init.normal_(lin.weight, 0, 0.1)
        layers += [lin, nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard, _ = train(model, opt, regression(32), 40)
    ev = of(guard, "vanishing")
    assert ev and ev[0].step == 19  # patience 20: steps 0..19
    assert ev[0].layers[:2] == ["0.weight", "2.weight"]
    assert "20.weight" not in ev[0].layers  # the output layer is fine
    assert any("ReLU" in a for a in ev[0].advice)


def adding_problem(batch, length, gen):
    """Pascanu et al. 2013 addition task (methods.md §5), fixed length."""
    x = torch.zeros(batch, length, 2)
    x[:, :, 0] = torch.rand(batch, length, generator=gen)
    p0 = torch.randint(0, length // 10, (batch,), generator=gen)
    p1 = torch.randint(length // 10, length // 2, (batch,), generator=gen)
    rows = torch.arange(batch)
    x[rows, p0, 1] = 1.0
    x[rows, p1, 1] = 1.0
    return x, ((x[rows, p0, 0] + x[rows, p1, 0]) / 2).unsqueeze(1)


def test_adding_problem_generator_matches_definition():
    x, y = adding_problem(64, 50, torch.Generator().manual_seed(0))
    marks = x[:, :, 1]
    assert torch.all(marks.sum(1) == 2)
    pos = marks.nonzero()[:, 1].view(64, 2)
    assert torch.all(pos[:, 0] < 5) and torch.all((pos[:, 1] >= 5) & (pos[:, 1] < 25))
    ref = torch.stack([x[i, pos[i], 0].sum() / 2 for i in range(64)]).unsqueeze(1)
    assert torch.allclose(y, ref)


class IRNN(nn.Module):
    """Le et al. 2015: ReLU RNN, identity recurrent weight, zero biases."""

    def __init__(self, hidden=32, scale=1.0):
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="relu", batch_first=True)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(torch.eye(hidden) * scale)
            self.rnn.bias_hh_l0.zero_()
            self.rnn.bias_ih_l0.zero_()
            nn.init.normal_(self.rnn.weight_ih_l0, 0, 0.1)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


def test_irnn_adding_problem_explodes_early_recurrent_weight_named():
    torch.manual_seed(0)
    model = IRNN()
    opt = torch.optim.SGD(model.parameters(), lr=1e-8)

    def grow(i, m):  # the recurrent weight's spectral radius creeps up 2% a step (as a too-high lr does)
        with torch.no_grad():
            m.rnn.weight_hh_l0.mul_(1.02)

    guard, first_bad = train(model, opt, lambda i: adding_problem(16, 50, torch.Generator().manual_seed(i)),
                             120, before_step=grow)
    assert first_bad is not None, "the scenario must actually blow up"
    ev = of(guard, "exploding")
    assert ev, [str(e) for e in guard.events]
    assert ev[0].step <= first_bad - 5, (ev[0].step, first_bad)
    assert ev[0].layers[0] == "rnn.weight_hh_l0"
    assert any("LSTM" in a for a in ev[0].advice) and any("truncated BPTT" in a for a in ev[0].advice)


def test_nan_injected_into_one_layer_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def poison(i, m):
        if i == 7:
            m[2].weight.grad[3, 4] = math.nan

    guard, _ = train(model, opt, regression(8), 12, before_step=poison)
    ev = of(guard, "nonfinite")
    assert [e.step for e in ev] == [7]
    assert ev[0].layers == ["2.weight"]
    assert guard.skipped_steps == 1


def healthy_resmlp(steps, seed=0, **kw):
    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

        def forward(self, x):
            return x + self.fc(torch.relu(self.ln(x)))

    model = nn.Sequential(nn.Linear(8, 32), *[Block(32) for _ in range(4)], nn.LayerNorm(32), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def test_loss_spike_from_one_corrupted_batch():
    model, opt = healthy_resmlp(0)
    clean = regression(8)

    def batches(i):
        x, y = clean(i)
        return (x, y * 100.0) if i == 150 else (x, y)  # labels from the wrong scale

    guard, _ = train(model, opt, batches, 170)
    ev = of(guard, "loss_spike")
    assert [e.step for e in ev] == [150]
    assert ev[0].data["loss"] > 10 * ev[0].data["median_loss"]
    assert "jumped" in ev[0].message and ev[0].advice
    # the corrupted update may echo later (a grad-norm spike through Adam), never before
    assert all(e.step >= 150 for e in serious(guard)), [str(e) for e in serious(guard)]


def test_weights_blown_up_by_high_lr_weight_growth_before_nan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    guard, first_bad = train(model, opt, lambda i: (3 * regression(16)(i)[0], regression(16)(i)[1]), 200,
                             detectors=[D.WeightGrowthDetector()], param_norm_every=2, stop_at_bad=True)
    assert first_bad is not None
    ev = of(guard, "weight_growth")
    assert ev and ev[0].step < first_bad, (ev[0].step, first_bad)
    assert ev[0].layers and any("penalty" in a for a in ev[0].advice)


def test_clip_threshold_far_too_low_over_clipping():
    model, opt = healthy_resmlp(0)
    guard, _ = train(model, opt, regression(8), 30, clip=gg.GlobalNorm(1e-6))
    ev = of(guard, "over_clipping")
    assert ev and ev[0].severity == "critical" and ev[0].step == 9  # 10 consecutive tiny coefficients
    assert ev[0].data["clip_coef"] < 1e-3
    assert any("Raise the clip threshold" in a for a in ev[0].advice)


def test_clipping_on_every_step_warns():
    model, opt = healthy_resmlp(0)
    det = D.OverClippingDetector(window=50, tiny=1e-12)
    guard, _ = train(model, opt, regression(8), 60, clip=gg.GlobalNorm(0.05), detectors=[det])
    ev = of(guard, "over_clipping")
    assert ev and ev[0].severity == "warning" and ev[0].step == 49 and ev[0].data["rate"] >= 0.95


# ------------------------------------------------------------- healthy runs
def test_healthy_residual_mlp_1500_steps_no_warnings():
    model, opt = healthy_resmlp(0)
    guard, first_bad = train(model, opt, regression(8), 1500)
    assert first_bad is None
    assert serious(guard) == [], [str(e) for e in serious(guard)]
    assert len(guard.detectors) == 7


def test_healthy_small_cnn_no_warnings():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def batches(i):
        g = torch.Generator().manual_seed(i)
        y = torch.randint(0, 4, (16,), generator=g)
        x = torch.randn(16, 1, 8, 8, generator=g) * 0.5
        x[torch.arange(16), 0, y, y] += 3.0  # a learnable pattern
        return x, y

    guard, _ = train(model, opt, batches, 300, loss_fn=nn.functional.cross_entropy)
    assert serious(guard) == [], [str(e) for e in serious(guard)]


def test_healthy_lstm_no_warnings():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(2, 16, batch_first=True)
            self.out = nn.Linear(16, 1)

        def forward(self, x):
            return self.out(self.lstm(x)[0][:, -1])

    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    guard, _ = train(model, opt, lambda i: adding_problem(16, 20, torch.Generator().manual_seed(i)), 300,
                     clip=gg.GlobalNorm(5.0))
    assert serious(guard) == [], [str(e) for e in serious(guard)]


# ------------------------------------------------------- synthetic rows
NAMES = ["a.weight", "b.weight", "c.weight", "c.bias"]


def bound(det):
    params = [nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3, 3)),
              nn.Parameter(torch.ones(3))]
    pairs = list(zip(NAMES, params))
    guard = gg.Guard(pairs, torch.optim.SGD(params, lr=0.1), detectors=[det])
    return guard


def row(gnorm=1.0, layers=(0.5, 0.5, 0.5, 0.1), loss=1.0, bad=0.0, coef=1.0, param_norm=math.nan):
    head = dict(bad=bad, skipped=bad, loss=loss, loss_bad=float(not math.isfinite(loss)), global_norm=gnorm,
                clip_coef=coef, lr=0.1, param_norm=param_norm)
    r = [head[c] for c in GLOBAL_COLS] + list(layers) + [abs(x) for x in layers]
    return np.asarray(r, np.float32)


def feed(det, guard, rows, start=0):
    return det.update(list(range(start, start + len(rows))), np.stack(rows), guard)


def noisy_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        f = float(np.exp(rng.normal(0, 0.3)))
        out.append(row(gnorm=f, layers=(0.5 * f, 0.5 * f, 0.6 * f, 0.1 * f), loss=1.0 + 0.1 * rng.normal()))
    return out


@pytest.mark.parametrize("awkward", [math.nan, math.inf, -math.inf, 1e30, 1e-30])
def test_spike_baseline_never_absorbs_nonfinite(awkward):
    det = D.SpikeDetector()
    guard = bound(det)
    rows = noisy_rows(40)
    bad = row(gnorm=awkward, layers=(awkward, 0.5, 0.5, 0.1), bad=float(not math.isfinite(awkward)),
              loss=awkward)
    evs = feed(det, guard, rows[:30] + [bad] * 3 + rows[30:])
    if awkward == 1e30:  # a finite absurd value is a spike, once (cooldown), then clipped into the baseline
        assert [e.step for e in evs] == [30] and evs[0].layers == ["a.weight"]
    else:
        assert evs == []
    assert all(math.isfinite(h) for h in det._hist)
    spike = row(gnorm=50.0, layers=(0.5, 49.0, 0.6, 0.1))
    ev = feed(det, guard, [spike], start=100)
    assert len(ev) == 1 and ev[0].kind == "spike" and ev[0].layers[0] == "b.weight"
    assert ev[0].data["shares"][0] > 0.9 and "of the jump from b.weight" in ev[0].message


def test_spike_warmup_and_ratio():
    det = D.SpikeDetector(warmup=20)
    guard = bound(det)
    assert feed(det, guard, noisy_rows(5) + [row(gnorm=1e3)]) == []  # no verdict during warm-up
    det = D.SpikeDetector(ratio=1e4)
    guard = bound(det)
    assert feed(det, guard, noisy_rows(30) + [row(gnorm=1e3)]) == []  # below the ratio floor


@pytest.mark.parametrize("awkward", [math.nan, math.inf, 1e-30])
def test_loss_spike_ignores_nonfinite_losses(awkward):
    det = D.LossSpikeDetector()
    guard = bound(det)
    rows = noisy_rows(30) + [row(loss=awkward)] * 3 + [row(loss=40.0)]
    evs = feed(det, guard, rows)
    assert [e.step for e in evs] == [33] and evs[0].kind == "loss_spike"
    assert all(math.isfinite(h) for h in det._hist)


def test_exploding_absurd_norm_at_step_0_is_critical():
    det = D.ExplodingDetector()
    guard = bound(det)
    ev = feed(det, guard, [row(gnorm=7e6, layers=(1.0, 7e6, 1.0, 1.0))])
    assert len(ev) == 1 and ev[0].severity == "critical" and ev[0].layers == ["b.weight"]
    assert "7e+06" in ev[0].message


def test_exploding_trend_fires_on_geometric_growth_only():
    det = D.ExplodingDetector()
    guard = bound(det)
    grow = [row(gnorm=3.0 ** k, layers=(0.5, 3.0 ** k, 0.5, 0.1)) for k in range(10)]
    ev = feed(det, guard, noisy_rows(30) + grow)
    assert ev and ev[0].data["rule"] == "trend" and ev[0].layers[0] == "b.weight"
    assert 30 <= ev[0].step <= 35
    det2 = D.ExplodingDetector()
    guard2 = bound(det2)
    assert feed(det2, guard2, noisy_rows(300, seed=3)) == []


@pytest.mark.parametrize("make", [
    lambda: D.SpikeDetector(), lambda: D.ExplodingDetector(), lambda: D.LossSpikeDetector(),
    lambda: D.VanishingDetector(patience=3), lambda: D.WeightGrowthDetector(),
    lambda: D.OverClippingDetector(window=5, tiny_steps=3)])
def test_state_dict_round_trip(make, tmp_path):
    a = make()
    guard_a = bound(a)
    rows = noisy_rows(40)
    rows += [row(gnorm=math.nan, bad=1.0, loss=math.nan), row(gnorm=1e30), row(gnorm=1e-30, loss=1e-30)]
    rows += [row(gnorm=1.0, layers=(1e-12, 1e-12, 1.0, 1.0), coef=1e-5, param_norm=3.0)] * 4
    feed(a, guard_a, rows)
    sd = a.state_dict()
    torch.save(sd, tmp_path / "d.pt")
    b = make()
    guard_b = bound(b)
    b.load_state_dict(torch.load(tmp_path / "d.pt", weights_only=False))
    assert b.state_dict() == sd
    more = [row(gnorm=1.0, layers=(1e-12, 1e-12, 1.0, 1.0), coef=1e-5, param_norm=300.0)] * 6
    more += [row(gnorm=500.0, loss=80.0)] + noisy_rows(10, seed=5)
    ea = [e.to_dict() for e in feed(a, guard_a, more, start=100)]
    eb = [e.to_dict() for e in feed(b, guard_b, more, start=100)]
    assert ea == eb


def test_guard_state_dict_round_trips_default_detectors():
    model, opt = healthy_resmlp(0)
    guard, _ = train(model, opt, regression(8), 25)
    sd = guard.state_dict()
    other = gg.Guard(model, opt)
    other.load_state_dict(sd)
    assert other.state_dict() == sd


@pytest.mark.parametrize("bad", [dict(window=0), dict(z=-1.0), dict(z=math.nan), dict(ratio=0.5),
                                 dict(cooldown=-1), dict(warmup=True)])
def test_bad_thresholds_raise_naming_the_argument(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        D.SpikeDetector(**bad)


def test_detectors_empty_list_disables():
    model, opt = healthy_resmlp(0)
    guard = gg.Guard(model, opt, detectors=[])
    assert guard.detectors == []


def test_advice_depends_on_module_type():
    rnn = D.advice_for("exploding", ["rnn.weight_hh_l0"], {"rnn.weight_hh_l0": "RNN"}, {"RNN", "Linear"})
    mlp = D.advice_for("exploding", ["0.weight"], {"0.weight": "Linear"}, {"Linear", "Tanh"})
    assert D.RNN_ADVICE == rnn[0] and D.RNN_ADVICE not in mlp
    assert D.ACT_ADVICE in D.advice_for("vanishing", ["0.weight"], {"0.weight": "Linear"}, {"Sigmoid"})
    assert D.ACT_ADVICE not in D.advice_for("vanishing", ["0.weight"], {"0.weight": "Linear"}, {"ReLU"})


# ------------------------------------------------- batches of rows == one row at a time
def _scripted_rows(n_steps=700, seed=0):
    """Rows of a 6-layer MLP guard: a noisy healthy run with every kind of trouble in it."""
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), detectors=[])
    n, G = len(guard.names), len(GLOBAL_COLS)
    col = {c: i for i, c in enumerate(GLOBAL_COLS)}
    rng = np.random.default_rng(seed)
    rows = np.zeros((n_steps, G + 2 * n), np.float32)
    norms = rng.lognormal(0, 0.2, (n_steps, n))
    loss = 2.0 * rng.lognormal(0, 0.05, n_steps)
    norms[150] *= 1e3                          # a spike
    loss[200] *= 5                              # a loss spike
    norms[260:270] *= np.exp(np.arange(10))[:, None] * 1.0   # a trend
    norms[300:330] *= 200                      # a level shift
    norms[400:440, :4] *= 1e-5                 # early layers vanish
    depth = np.geomspace(1e4, 1, n)            # exploding through depth
    norms[470:480] *= depth
    norms[520] = np.nan                        # a poisoned row
    loss[530] = np.nan
    loss[560:600] = -loss[560:600]             # non-positive losses (raw-value space)
    rows[:, G:G + n] = norms
    rows[:, G + n:] = norms / 3
    rows[:, col["global_norm"]] = np.sqrt(np.nansum(norms ** 2, 1))
    rows[:, col["loss"]] = loss
    rows[:, col["loss_bad"]] = ~np.isfinite(loss)
    rows[:, col["bad"]] = ~np.isfinite(norms).all(1) | ~np.isfinite(loss)
    rows[:, col["clip_coef"]] = 1.0
    rows[:, col["param_norm"]] = np.nan
    rows[::10, col["param_norm"]] = 30.0
    return guard, list(range(n_steps)), rows


@pytest.mark.parametrize("batch", [2, 7, 16, 32, 100])
def test_batches_equal_rows(batch):
    """A flush of many rows (the CPU default is 16) gives bitwise the events and the state
    that feeding the rows one at a time gives: the quiet-batch fast paths are exact."""
    guard, steps, rows = _scripted_rows()
    ref, fast = D.default_detectors(), D.default_detectors()
    for d in ref + fast:
        d.bind(guard)
    ev_ref, ev_fast = [], []
    for a in range(0, len(steps), batch):
        for d1, d2 in zip(ref, fast):
            for i in range(a, min(a + batch, len(steps))):
                ev_ref += [e.to_dict() for e in d1.update(steps[i:i + 1], rows[i:i + 1], guard)]
            ev_fast += [e.to_dict() for e in d2.update(steps[a:a + batch], rows[a:a + batch], guard)]
            assert_same(d2.state_dict(), d1.state_dict(), f"{type(d1).__name__} after step {a + batch - 1}")
    kinds = {e["kind"] for e in ev_ref}
    assert {"spike", "loss_spike", "exploding", "vanishing"} <= kinds, kinds  # the script bites
    assert ev_fast == ev_ref


def test_quiet_batches_take_the_fast_path(monkeypatch):
    """The fast path is used (not only correct): healthy rows never reach _row once warm."""
    guard, steps, rows = _scripted_rows()
    dets = [D.SpikeDetector(), D.ExplodingDetector(), D.LossSpikeDetector(), D.VanishingDetector()]
    for d in dets:
        d.bind(guard)
        d.update(steps[:120], rows[:120], guard)  # warm, one row at a time inside
    calls = []
    for d in dets:
        orig = d._row
        monkeypatch.setattr(d, "_row", lambda step, row, orig=orig: calls.append(step) or orig(step, row))
        assert d.update(steps[120:136], rows[120:136], guard) == []
    assert calls == []
