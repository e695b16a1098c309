"""Detectors: scripted failure scenarios, healthy runs, awkward values, state round trips."""
import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import gradguard as gg
from gradguard import detect as D
from gradguard.layout import COL, GLOBAL_COLS, RunInfo


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

    # nonfinite_budget=None: the test forces the growth on past the NaN (the budget would stop it)
    guard, first_bad = train(model, opt, lambda i: adding_problem(16, 50, torch.Generator().manual_seed(i)),
                             120, before_step=grow, nonfinite_budget=None)
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
    assert len(guard.detectors) == 10


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


def row(gnorm=1.0, layers=(0.5, 0.5, 0.5, 0.1), loss=1.0, bad=0.0, coef=1.0, param_norm=math.nan,
        param_norms=None):
    head = dict(bad=bad, skipped=bad, loss=loss, loss_bad=float(not math.isfinite(loss)), global_norm=gnorm,
                clip_coef=coef, lr=0.1, param_norm=param_norm)
    r = [head[c] for c in GLOBAL_COLS] + list(layers) + [abs(x) for x in layers]
    r += list(param_norms) if param_norms is not None else [math.nan] * len(layers)
    return np.asarray(r, np.float32)


def feed(det, guard, rows, start=0):
    return det.update(list(range(start, start + len(rows))), np.stack(rows), guard.run)


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
    lambda: D.VanishingDetector(patience=3), lambda: D.WeightGrowthDetector(cooldown=0),
    lambda: D.OverClippingDetector(window=5, tiny_steps=3), lambda: D.UnusedDetector(patience=30),
    lambda: D.DivergenceDetector(cooldown=0), lambda: D.PoisonedRunDetector(patience=1)])
def test_state_dict_round_trip(make, tmp_path):
    a = make()
    guard_a = bound(a)
    rows = noisy_rows(40)
    rows += [row(gnorm=math.nan, bad=1.0, loss=math.nan), row(gnorm=1e30), row(gnorm=1e-30, loss=1e-30)]
    rows += [row(gnorm=1.0, layers=(1e-12, 1e-12, 1.0, 1.0), coef=1e-5, param_norm=3.0,
                 param_norms=(1.7, 1.7, 1.7, 0.1))] * 4
    feed(a, guard_a, rows)
    sd = a.state_dict()
    torch.save(sd, tmp_path / "d.pt")
    b = make()
    guard_b = bound(b)
    b.load_state_dict(torch.load(tmp_path / "d.pt", weights_only=False))
    assert b.state_dict() == sd
    # b.weight x20 since the saved state's last measurement: only a restored "prev" sees the jump
    more = [row(gnorm=1.0, layers=(1e-12, 1e-12, 1.0, 1.0), coef=1e-5, param_norm=3.0,
                param_norms=(1.7, 34.0, 1.7, 0.1))] * 6
    more += [row(gnorm=500.0, loss=80.0)] + noisy_rows(10, seed=5)
    ea = [e.to_dict() for e in feed(a, guard_a, more, start=100)]
    eb = [e.to_dict() for e in feed(b, guard_b, more, start=100)]
    assert ea == eb
    if isinstance(a, D.WeightGrowthDetector):
        assert (ea[0]["step"], ea[0]["severity"], ea[0]["layers"][0]) == (100, "warning", "b.weight")


def test_guard_state_dict_round_trips_default_detectors():
    model, opt = healthy_resmlp(0)
    guard, _ = train(model, opt, regression(8), 25)
    sd = guard.state_dict()
    other = gg.Guard(model, opt)
    other.load_state_dict(sd)
    assert other.state_dict() == sd


def test_guard_state_saved_with_the_seven_old_defaults_loads():
    """A guard state from before DivergenceDetector and PoisonedRunDetector joined the
    defaults (7 detector states) loads: the 7 keep their state, the 2 new ones start fresh."""
    model, opt = healthy_resmlp(0)
    guard, _ = train(model, opt, regression(8), 25)
    sd = guard.state_dict()
    fresh = [d.state_dict() for d in gg.Guard(model, opt).detectors[7:]]
    sd["detectors"] = sd["detectors"][:7]
    other = gg.Guard(model, opt)
    other.load_state_dict(sd)
    assert [d.state_dict() for d in other.detectors] == sd["detectors"] + fresh


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
def _scripted_rows(n_steps=770, seed=0):
    """Rows of a 6-layer MLP guard: a noisy healthy run with every kind of trouble in it."""
    torch.manual_seed(seed)  # the weights are WeightGrowthDetector's reference
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), detectors=[])
    n, G = len(guard.names), len(GLOBAL_COLS)
    col = {c: i for i, c in enumerate(GLOBAL_COLS)}
    rng = np.random.default_rng(seed)
    rows = np.zeros((n_steps, G + 3 * n), np.float32)
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
    norms[610:612] = 1e7                       # absurd norms
    loss[700:730] *= 1.15 ** np.arange(30)     # the loss leaving its range, slowly
    norms[740:770] = np.nan                    # a dead run: poisoned on every step
    rows[:, G:G + n] = norms
    rows[:, G + n:G + 2 * n] = norms / 3
    rows[:, col["global_norm"]] = np.sqrt(np.nansum(norms ** 2, 1))
    rows[:, col["loss"]] = loss
    rows[:, col["loss_bad"]] = ~np.isfinite(loss)
    rows[:, col["bad"]] = ~np.isfinite(norms).all(1) | ~np.isfinite(loss)
    rows[:, col["clip_coef"]] = 1.0
    coef = np.ones(n_steps)
    coef[40:60] = 0.5                          # clipped often
    coef[620:650] = 1e-5                       # clipped to almost nothing
    rows[:, col["clip_coef"]] = coef
    rows[:, col["lr"]] = 0.1
    pn = np.full(n_steps, np.nan)
    pn[::10] = 30.0
    pn[630::10] = 30.0 * 1.5 ** np.arange(len(pn[630::10]))  # weights growing
    pn[660] = np.inf                           # non-finite weights
    rows[:, col["param_norm"]] = pn
    pnorms = np.repeat(pn[:, None] / np.sqrt(n), n, 1)
    pnorms[580:, 2] *= 30                      # one weight corrupted (x30) at step 580
    rows[:, G + 2 * n:] = pnorms
    return guard, list(range(n_steps)), rows



def _small_detectors():
    """Short windows, no cooldown: every rule fires often, so chunk boundaries fall everywhere."""
    return [D.SpikeDetector(window=10, warmup=5, cooldown=0),
            D.ExplodingDetector(history=10, warmup=5, cooldown=0, trend_window=3, level_steps=1, depth_every=3),
            D.LossSpikeDetector(window=8, warmup=3, cooldown=0, z=3),
            D.VanishingDetector(patience=3, cooldown=0),
            D.WeightGrowthDetector(window=30, growth=2.0, cooldown=0),
            D.OverClippingDetector(window=10, tiny_steps=3, frac=0.5, cooldown=0),
            D.UnusedDetector(patience=3),
            D.DivergenceDetector(ref_steps=2, persist=2, cooldown=0),
            D.PoisonedRunDetector(patience=3)]


_DETECTOR_SETS = {"default": D.default_detectors, "small": _small_detectors}
_REFERENCE: dict = {}


def _one_row_at_a_time(which, seed):
    """Events and every detector's state after each row, feeding the rows one by one."""
    if (which, seed) not in _REFERENCE:
        guard, steps, rows = _scripted_rows(seed=seed)
        dets = _DETECTOR_SETS[which]()
        for d in dets:
            d.bind(guard.run)
        events, states = [], []
        for i in range(len(steps)):
            for d in dets:
                events += [e.to_dict() for e in d.update(steps[i:i + 1], rows[i:i + 1], guard.run)]
            states.append([d.state_dict() for d in dets])
        _REFERENCE[which, seed] = (events, states)
    return _REFERENCE[which, seed]


@pytest.mark.parametrize("which", list(_DETECTOR_SETS))
def test_scripted_rows_bite(which):
    """The script below triggers every rule family (else the chunking property proves little)."""
    events, _ = _one_row_at_a_time(which, 0)
    kinds = {e["kind"] for e in events}
    want = {"spike", "loss_spike", "exploding", "vanishing", "over_clipping", "weight_growth", "diverging"}
    assert want <= kinds, kinds
    assert [e["data"]["first_step"] for e in events if e["kind"] == "nonfinite"][-1] == 740  # the dead stretch
    if which == "small":
        assert {e["data"]["rule"] for e in events if e["kind"] == "exploding"} >= {"absurd", "trend", "level", "depth"}
        assert "unused" not in kinds  # every layer has a gradient in the script


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(list(_DETECTOR_SETS)), seed=st.sampled_from([0, 1]),
       chunks=st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_any_chunking_gives_the_same_events_and_state(which, seed, chunks):
    """Rows fed in any chunking (the guard flushes 1, 16, 32 or any number of rows at once)
    give exactly the events and the state dicts of feeding them one at a time."""
    ref_events, ref_states = _one_row_at_a_time(which, seed)
    guard, steps, rows = _scripted_rows(seed=seed)
    dets = _DETECTOR_SETS[which]()
    for d in dets:
        d.bind(guard.run)
    events, a, c = [], 0, 0
    while a < len(steps):
        b = min(a + chunks[c % len(chunks)], len(steps))
        for d in dets:
            events += [e.to_dict() for e in d.update(steps[a:b], rows[a:b], guard.run)]
        assert [d.state_dict() for d in dets] == ref_states[b - 1], f"state after step {b - 1}"
        a, c = b, c + 1
    key = lambda e: (e["step"], e["kind"])  # noqa: E731  (within a chunk, events come detector by detector)
    assert sorted(events, key=key) == sorted(ref_events, key=key)


def test_quiet_batches_are_scanned_once(monkeypatch):
    """A warm detector absorbs a flush of healthy rows with one evaluation of its rule."""
    guard, steps, rows = _scripted_rows()
    dets = D.default_detectors()
    for d in dets:
        d.bind(guard.run)
        d.update(steps[:120], rows[:120], guard.run)
    calls = []
    for d in dets:
        orig = d._scan
        monkeypatch.setattr(d, "_scan", lambda st_, r, orig=orig, d=d: calls.append(type(d).__name__) or orig(st_, r))
        assert d.update(steps[120:136], rows[120:136], guard.run) == []
    assert sorted(calls) == sorted(type(d).__name__ for d in dets)


def test_states_saved_by_the_previous_version_load():
    """State dicts written by the single-module detect.py (tests/data) load, keep their keys,
    and give the events that version gave on the next rows."""
    saved = json.loads((Path(__file__).parent / "data" / "detector_states_v0.json").read_text())
    shapes = [(3, 3), (3, 3), (3, 3), (3,)]
    params = [torch.ones(s) for s in shapes]
    run = RunInfo.describe(saved["names"], params, init_layer_norms=np.array([3.0, 6.0, 3.0, 3 ** 0.5]))
    rows = np.asarray(saved["rows"], np.float32)
    # that version's rows had no per-tensor parameter norms: that block is NaN (not measured)
    rows = np.concatenate([rows, np.full((len(rows), len(shapes)), np.nan, np.float32)], 1)
    for name, entry in saved["detectors"].items():
        det = getattr(D, name)(**entry["kwargs"])
        det.bind(run)
        det.load_state_dict(entry["state_after_40"])
        sd = det.state_dict()
        assert {k: sd[k] for k in entry["state_after_40"]} == entry["state_after_40"], name
        events = [e.to_dict() for e in det.update(list(range(40, 60)), rows[40:], run)]
        # Severity now follows consequences (docs/detection.md): a spike or a one-batch loss
        # jump is info.  Everything else about the events is what that version gave.
        want = [dict(e, severity="info") if e["kind"] in ("spike", "loss_spike") and e["severity"] == "warning"
                else e for e in entry["events_after"]]
        assert events == want, name
    assert saved["detectors"]["SpikeDetector"]["events_after"]  # the comparison covers an event


class _NamesOnly:
    """A user detector written against the documented protocol: bind(x), update(steps, rows, x)."""

    def bind(self, run):
        self.bound = run

    def update(self, steps, rows, run):
        self.seen = (list(steps), rows.shape, list(run.names))
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass


def test_custom_detectors_receive_the_run_info():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    det = _NamesOnly()
    guard = gg.Guard(model, opt, detectors=[det], flush_every=2)
    assert isinstance(det.bound, RunInfo) and list(det.bound.names) == guard.names
    assert det.bound.owner["0.weight"] == "Linear" and det.bound.trainable == (True,) * 4
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(2, 3)).sum().backward()
        guard.step()
    assert det.seen == ([0, 1], (2, len(GLOBAL_COLS) + 3 * 4), guard.names)


def _run(names=("a.weight", "b.weight", "c.bias"), shapes=((4, 4), (4, 4), (4,)), init=None, every=10):
    return RunInfo.describe(list(names), [torch.zeros(s) for s in shapes], param_norm_every=every,
                            init_layer_norms=init)


def _rows(n, norms, param_norm, every=10):
    n_layers = norms.shape[1]
    r = np.zeros((n, len(GLOBAL_COLS) + 3 * n_layers), np.float32)
    r[:, len(GLOBAL_COLS):len(GLOBAL_COLS) + n_layers] = norms
    r[:, len(GLOBAL_COLS) + 2 * n_layers:] = np.nan  # per-tensor parameter norms: not recorded
    r[:, COL["global_norm"]] = np.linalg.norm(norms, axis=1)
    r[:, COL["clip_coef"]] = 1.0
    r[:, COL["param_norm"]] = np.nan
    r[::every, COL["param_norm"]] = param_norm[::every]
    return r


@pytest.mark.parametrize("init", [np.array([1.0, 100.0, 1.0]), None])
def test_weight_growth_culprits_from_the_run_not_the_parameters(init):
    """WeightGrowthDetector holds no parameter: its reference is RunInfo.init_layer_norms, or
    without it the gradient norms of the first measured row."""
    run = _run(init=init)
    det = D.WeightGrowthDetector(window=50)
    det.bind(run)
    assert not any(isinstance(v, torch.Tensor) for v in vars(det).values())
    pn = np.geomspace(1.0, 1e3, 60)
    # fires at step 20 (10x in 20 steps); b.weight's gradient is the largest there, but a.weight's is
    # the largest relative to its initial weight norm (2/1 vs 5/100) and to the first row (2/1 vs 5/5)
    norms = np.tile([1.0, 5.0, 0.01], (60, 1))
    norms[15:, 0] = 2.0
    ev = det.update(list(range(60)), _rows(60, norms, pn), run)
    assert [(e.step, e.kind, e.severity) for e in ev] == [(20, "weight_growth", "warning")]
    assert ev[0].layers[0] == "a.weight", ev[0].layers
    # only tensors within 10x of the top score: b (0.05) and c (0.01) are far below a's 2
    assert ev[0].layers == (["a.weight"] if init is not None else ["a.weight", "b.weight", "c.bias"])
    assert ev[0].data["culprit_scores"][0] == 2.0
    assert det.state_dict()["ref"] == ("weights" if init is not None else "gradients")
    np.testing.assert_array_equal(det._init, init if init is not None else np.float32([1.0, 5.0, 0.01]))


@pytest.mark.parametrize("pn", [math.nan, math.inf])
def test_weight_growth_nonfinite_weights_on_a_measuring_step(pn):
    run = _run()
    det = D.WeightGrowthDetector()
    det.bind(run)
    rows = _rows(12, np.tile([1.0, 1.0, 1.0], (12, 1)), np.full(12, 3.0))
    rows[10, COL["param_norm"]] = pn
    rows[10, len(GLOBAL_COLS) + 3 + 1] = math.nan  # b.weight's max |g|
    ev = det.update(list(range(12)), rows, run)
    assert [(e.step, e.severity, e.layers) for e in ev] == [(10, "critical", ["b.weight"])]
    assert ev[0].data["param_norm"] == ("NaN" if math.isnan(pn) else "Inf")
    assert "1 tensors have non-finite gradients (b.weight)" in ev[0].message  # no per-tensor norms
    # with per-tensor parameter norms the culprit is the tensor whose weights are non-finite
    det3 = D.WeightGrowthDetector()
    det3.bind(run)
    rows3 = rows.copy()
    rows3[::10, len(GLOBAL_COLS) + 6:] = [4.0, 4.0, 2.0]
    rows3[10, len(GLOBAL_COLS) + 6] = pn
    ev = det3.update(list(range(12)), rows3, run)
    assert [(e.step, e.severity, e.layers) for e in ev] == [(10, "critical", ["a.weight"])]
    assert "1 tensors hold NaN/Inf (a.weight)" in ev[0].message
    rows[10, COL["param_norm"]] = math.nan
    det2 = D.WeightGrowthDetector()
    det2.bind(_run(every=0))  # nothing is measured: a NaN param_norm is never a verdict
    assert det2.update(list(range(12)), rows, run) == []


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("loss", [1.0, math.nan])
def test_nonfinite_event_from_a_row(amp, loss):
    run = RunInfo.describe(["rnn.weight_hh_l0", "out.weight", "out.bias"],
                           [torch.zeros(4, 4), torch.zeros(1, 4), torch.zeros(1)], model=None)
    run = RunInfo(run.names, run.shapes, run.trainable, {"rnn.weight_hh_l0": "RNN"}, frozenset({"RNN"}))
    r = np.zeros(len(GLOBAL_COLS) + 6, np.float32)
    r[COL["bad"]] = r[COL["skipped"]] = 1.0
    r[COL["loss"]], r[COL["loss_bad"]] = loss, float(math.isnan(loss))
    r[COL["global_norm"]] = math.inf
    r[len(GLOBAL_COLS) + 3:] = [math.nan, math.inf, 0.5]  # max |g|
    ev = D.nonfinite_event(7, run, r, amp=amp)
    assert ev.step == 7 and ev.layers == ["out.weight", "rnn.weight_hh_l0"]  # output side first
    assert ev.data == {"loss": 1.0 if loss == 1.0 else "NaN", "global_norm": "Inf", "skipped": True}
    if amp and loss == 1.0:
        assert ev.kind == "amp_overflow" and ev.severity == "info"
    else:
        assert ev.kind == "nonfinite" and ev.severity == "critical" and "NaN/Inf in the gradients" in ev.message
        assert ev.advice[0] == D.RNN_ADVICE and ev.advice[2:] == D.NONFINITE_ADVICE


def _gradguard_imports(path: Path, package: str) -> set[str]:
    """gradguard modules a source file imports (absolute or relative)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                out |= {mod} if node.module else {f"{mod}.{a.name}" for a in node.names}
            elif node.module and node.module.startswith("gradguard"):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gradguard")}
    return out


def test_detect_and_advice_never_import_the_guard():
    """gradguard.detect and gradguard.advice (and everything they import, transitively) stay
    below the orchestrator: no import of gradguard.guard, at any depth, in any function."""
    src = Path(D.__file__).resolve().parent.parent
    todo, seen = ["gradguard.detect", "gradguard.advice"], set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        rel = Path(*mod.split(".")[1:])
        path = src / rel / "__init__.py" if (src / rel).is_dir() else src / rel.with_suffix(".py")
        if not path.exists():
            continue  # "from . import _window" names a module: listed under its full name below
        files = [path] + (sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [])
        for f in files:
            pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
            todo += sorted(_gradguard_imports(f, pkg))
    assert "gradguard.detect.base" in seen and "gradguard.layout" in seen  # the walk follows imports
    assert not {m for m in seen if m == "gradguard.guard" or m.startswith("gradguard.guard.")}, seen


# ------------------------------------------------- the run's own start; consequences; a dead run
def _loss_rows(losses, gnorms=None, bad=None):
    """Rows of the 4-tensor run of ``bound`` with these losses (global norm 1 unless given)."""
    gnorms = np.ones(len(losses)) if gnorms is None else np.asarray(gnorms, float)
    out = []
    for i, (l, g) in enumerate(zip(losses, gnorms)):
        b = 1.0 if (bad is not None and bad[i]) else 0.0
        out.append(row(gnorm=float(g), layers=(g / 2, g / 2, g / 2, g / 2), loss=float(l), bad=b))
    return out


@pytest.mark.parametrize("growth", [1.05, 1.1, 1.25, 1.5])
def test_divergence_inside_the_first_steps_is_caught(growth):
    """A loss growing from step 0 (inside every baseline detector's warm-up) is reported as
    diverging: before it reaches 3x its start (the corpus's divergence label) when the growth
    is gradual, within 2 steps of it when it is fast; the message quotes the start."""
    det = D.DivergenceDetector()
    guard = bound(det)
    losses = 2.3 * growth ** np.arange(60)
    events = feed(det, guard, _loss_rows(losses, gnorms=0.5 * growth ** np.arange(60)))
    assert events and events[0].kind == "diverging"
    label = int(np.argmax(losses > 3 * 2.3))
    first = events[0].step
    assert first < label if growth <= 1.1 else first <= label + 2, (first, label)
    assert "at the start (2.3)" in events[0].message


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gap", [3, 7, 50])
def test_divergence_ignores_heavy_tailed_batches(seed, gap):
    """Isolated batches 300x the typical loss (one outlier sample; two in a row at most)
    never make a warning, however low the loss has gone."""
    rng = np.random.default_rng(seed)
    losses = 2.0 * rng.lognormal(0, 0.1, 3000) * np.geomspace(1, 0.01, 3000)
    hits = np.arange(10 + seed, 3000, gap)
    losses[hits] *= 300
    losses[hits[::5] + 1] *= 300  # and a pair now and then
    det = D.DivergenceDetector()
    guard = bound(det)
    assert feed(det, guard, _loss_rows(losses)) == []


def test_divergence_gradient_growth_alone_is_not_divergence():
    """Gradients growing 40x while the loss keeps falling (healthy LSTMs do this): no event."""
    det = D.DivergenceDetector()
    guard = bound(det)
    n = 300
    events = feed(det, guard, _loss_rows(np.geomspace(2.3, 0.05, n), gnorms=np.geomspace(0.1, 4.0, n)))
    assert events == []


def test_spike_that_the_run_ignores_is_info_and_a_huge_one_critical():
    det = D.SpikeDetector()
    guard = bound(det)
    rows = noisy_rows(40) + [row(gnorm=30.0)] + noisy_rows(20, seed=3) + [row(gnorm=1e5)]
    events = feed(det, guard, rows)
    assert [(e.step, e.severity) for e in events] == [(40, "info"), (61, "critical")]


def test_exploding_trend_near_zero_loss_is_info():
    """A gradient norm jumping 40x at a loss 1e-3 of its start is info; at the start's loss, a warning."""
    for loss, sev in ((2.3e-3, "info"), (2.3, "warning")):
        det = D.ExplodingDetector()
        guard = bound(det)
        rows = _loss_rows([2.3] * 5 + [loss] * 60)
        rows += _loss_rows([loss] * 6, gnorms=2.2 ** np.arange(6))
        events = feed(det, guard, rows)
        assert [(e.data["rule"], e.severity) for e in events][:1] == [("trend", sev)], events


def _fed_in_chunks(make, rows, chunk, resume=False):
    """The events of a detector ``make()`` fed ``rows`` ``chunk`` at a time; with ``resume``, a
    new detector loaded from the old one's JSON-round-tripped ``state_dict()`` after each chunk."""
    det = make()
    guard, rows = bound(det), np.stack(rows)
    events = []
    for a in range(0, len(rows), chunk):
        events += det.update(np.arange(a, min(a + chunk, len(rows))), rows[a:a + chunk], guard.run)
        if resume:
            state = json.loads(json.dumps(det.state_dict()))
            det = make()
            det.bind(guard.run)
            det.load_state_dict(state)
    return events


@pytest.mark.parametrize("chunk,resume", [(1, False), (4, True), (70, False), (70, True)])
@pytest.mark.parametrize("high", [1, 2, 3, 4])
def test_exploding_trend_severity_reads_the_losses_of_its_window(high, chunk, resume):
    """Near zero loss, a batch of 4 with one misclassified example has a loss near the start's
    and a gradient norm 1000x the last ones (a healthy run, measured: batch-4 SGD on digits).
    The trend's severity reads the median loss over its 6-step window: 1 or 2 such losses in
    it are info; 3 of 6 are a warning (the median of 0.002, 0.002, 0.002, 2.3, 2.3, 2.3 is
    1.15, above 0.25 x 2.3).  The same in any chunking and across a state_dict round trip
    between flushes."""
    losses = [2.3] * 5 + [2.3e-3] * 59 + [2.3e-3] * (6 - high) + [2.3] * high  # steps 0-69
    g = [1.0] * 5 + [1e-3] * 60 + list(4.0 ** np.arange(5) * 1e-3)  # 256x in 5 steps: fires at 69
    events = _fed_in_chunks(D.ExplodingDetector, _loss_rows(losses, gnorms=g), chunk, resume)
    trend = [(e.step, e.severity) for e in events if e.data["rule"] == "trend"]
    assert trend[:1] == [(69, "warning" if high >= 3 else "info")], events


def test_divergence_state_without_a_pending_shock_loads_as_none():
    """A state saved before the shock rule waited for the next loss has no "shock" key: it
    loads with no shock pending, so a next loss of 1.5x the start (above ``respond``, below
    ``ratio``) is nothing."""
    det = D.DivergenceDetector()
    guard = bound(det)
    feed(det, guard, _loss_rows([1.0] * 10))
    state = json.loads(json.dumps(det.state_dict()))
    del state["shock"]
    det = D.DivergenceDetector()
    det.bind(guard.run)
    det.load_state_dict(state)
    assert feed(det, guard, _loss_rows([1.5]), start=10) == []


NAN = math.nan


@pytest.mark.parametrize("start,window,severity", [
    ([4.0] * 5, [1.0] * 6, "warning"),            # the window's median exactly respond x L0: not below
    ([0.5] * 5, [1e-3] * 6, "info"),               # a start loss below 1 is a start loss like any
    ([2.0] * 5, [0.3] * 6, "info"),                # 0.3 < 0.25 x 2 (and above 0.25 / 2)
    ([0.0] * 5, [-1.0] * 6, "warning"),            # L0 <= 0: the rule needs positive losses, so it warns
    ([2.3, 1e-3] + [NAN] * 3, [NAN] * 5 + [1e-3], "warning"),  # two finite losses: no reference yet
])
def test_exploding_trend_severity_boundaries(start, window, severity):
    """The respond rule at its edges: ``median(window) < respond * L0`` with ``L0 > 0`` and a
    complete reference (the first 3 finite losses) makes a trend info; anything else warns."""
    losses = start + [window[0]] * 59 + window  # steps 0-69 (NaN: no finite loss in between)
    g = [1.0] * 5 + [1e-3] * 60 + list(4.0 ** np.arange(5) * 1e-3)  # the trend fires at 69
    det = D.ExplodingDetector()
    events = feed(det, bound(det), _loss_rows(losses, gnorms=g))
    trend = [(e.step, e.severity) for e in events if e.data["rule"] == "trend"]
    assert trend[:1] == [(69, severity)], events


@pytest.mark.parametrize("x,after,fires", [
    (10.0, 1.25, True),                         # both exactly at their thresholds: a shock
    (float(np.nextafter(np.float32(10), np.float32(0))), 1.25, False),
    (10.0, float(np.nextafter(np.float32(1.25), np.float32(0))), False),
])
def test_divergence_shock_thresholds_are_inclusive(x, after, fires):
    """A shock is a loss at least ``critical`` x the start (10 x 1.0) with the gradient 20x,
    then a loss at least ``respond`` x the start (1.25): both bounds inclusive, to the float."""
    det = D.DivergenceDetector(respond=1.25)
    losses = [1.0] * 10 + [x, after] + [1.0] * 8
    g = [1.0] * 10 + [20.0] + [1.0] * 9
    events = feed(det, bound(det), _loss_rows(losses, gnorms=g))
    # dated at the shock's own step, raised on the next
    assert [(e.step, e.data.get("seen_at"), e.severity) for e in events] == ([(10, 11, "critical")] if fires else [])


@pytest.mark.parametrize("patience", [1, 5, 20])
def test_a_dead_run_gives_one_critical_event_per_streak(patience):
    det = D.PoisonedRunDetector(patience=patience)
    guard = bound(det)
    bad = [False] * 10 + [True] * 50 + [False] + [True] * 30
    events = feed(det, guard, _loss_rows([math.nan if b else 1.0 for b in bad], bad=bad))
    assert [(e.step, e.severity, e.data["count"]) for e in events] == [
        (10 + patience - 1, "critical", patience), (61 + patience - 1, "critical", patience)]
    assert "since step 10" in events[0].message


def test_default_detectors_on_the_demo_explosion_name_it_before_step_30():
    """The demo's unguarded run (tanh RNN, SGD lr 1): 'diverging' names it, early."""
    from gradguard.tools.tasks.digits import SequenceClassifier, load_digits

    torch.manual_seed(0)
    x, y = load_digits("train")
    model = SequenceClassifier(8, 64, 10, "rnn")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    guard = gg.Guard(model, opt, clip=None, on_nonfinite="warn")
    g = torch.Generator().manual_seed(1000)
    for _ in range(30):
        i = torch.randint(0, len(y), (32,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        loss.backward()
        guard.step(loss)
    guard.flush()
    first = [e for e in guard.events if e.severity in ("warning", "critical")]
    assert first and first[0].kind == "diverging" and first[0].step < 30, [str(e) for e in guard.events]
    assert first[0].layers


def _nonfinite_script():
    """Rows with a 1-step NaN, a 12-step identical streak, a streak whose culprits change, a clean end."""
    guard = bound(D.SpikeDetector())
    kinds = [None] * 5 + ["a"] + [None] * 3 + ["b"] * 12 + [None] * 2 + ["a", "a", "b", "b"] + [None] * 3
    rows = []
    for k in kinds:
        if k is None:
            rows.append(row())
        else:
            r = row(gnorm=math.nan, bad=1.0, loss=math.nan)
            n = guard.run.n
            r[len(GLOBAL_COLS) + n:] = 0.5  # max |g|: finite, except the culprit
            r[len(GLOBAL_COLS) + n + (0 if k == "a" else 1)] = math.nan
            rows.append(r)
    return guard, rows


@pytest.mark.parametrize("chunk", [1, 2, 5, 7, 40])
def test_nonfinite_repeats_fold_into_one_count_in_any_chunking(chunk):
    guard, rows = _nonfinite_script()
    rep = D.NonfiniteRepeats()
    events = []
    for a in range(0, len(rows), chunk):
        events += rep.update(np.arange(a, min(a + chunk, len(rows))), np.stack(rows[a:a + chunk]), guard.run)
    got = sorted((e.step, e.severity, e.layers[0], e.data.get("count", 1)) for e in events)
    # step 5 alone; 9..20 one critical then an info count of 12; 23-24, 25-26: two streaks of two
    assert got == [(5, "critical", "a.weight", 1), (9, "critical", "b.weight", 1), (20, "info", "b.weight", 12),
                   (23, "critical", "a.weight", 1), (24, "info", "a.weight", 2), (25, "critical", "b.weight", 1),
                   (26, "info", "b.weight", 2)]
    sd = rep.state_dict()
    other = D.NonfiniteRepeats()
    other.load_state_dict(json.loads(json.dumps(sd)))
    assert other.state_dict() == sd


def test_nonfinite_event_names_the_producer_first():
    """With NanOrigin's finding, the producer leads the culprits (not the output-side propagator)."""
    guard = bound(D.SpikeDetector())
    r = row(gnorm=math.nan, bad=1.0, loss=math.nan)
    r[len(GLOBAL_COLS) + guard.run.n:] = math.nan  # every gradient NaN: the row alone blames c.bias
    plain = D.nonfinite_event(7, guard.run, r)
    assert plain.layers[0] == "c.bias"
    ev = D.nonfinite_event(7, guard.run, r, origin={"module": "a", "type": "Linear", "where": "forward",
                                                      "param": "a.weight"})
    assert ev.layers[0] == "a.weight" and sorted(ev.layers) == sorted(plain.layers)
    assert ev.message.startswith("made in a (Linear, forward): ") and ev.data["origin"]["where"] == "forward"
    # a NaN already in the batch, with "input" as a string built at run time (as one read back
    # from JSON is): compared by value
    where = "".join(["in", "put"])
    ev = D.nonfinite_event(7, guard.run, r, origin={"module": None, "type": None, "where": where, "param": None})
    assert ev.message.startswith("the input batch already held NaN/Inf (check the data): ")


@pytest.mark.parametrize("case,severity", [("doubled", "warning"), ("x30", "critical"), ("shock", "critical")])
def test_divergence_severity_follows_the_rise(case, severity):
    """2.5x the start for good: a warning; 30x for good: critical; one step at 30x with the
    gradient norm 20x its start, and the next loss still above 1.2x (the shock rule, the last
    3 losses not yet all high): critical.  Each raised when the rule holds (the third high loss,
    the confirming step) and dated where the loss left its range (the first high loss)."""
    start = [2.0] * 10
    if case == "doubled":
        losses, g = start + [5.0] * 10, [1.0] * 20
    elif case == "x30":
        losses, g = start + [60.0] * 10, [1.0] * 20
    else:
        losses, g = start + [60.0, 2.5] + [2.0] * 8, [1.0] * 10 + [20.0] + [1.0] * 9
    det = D.DivergenceDetector()
    events = feed(det, bound(det), _loss_rows(losses, gnorms=g))
    assert [(e.kind, e.step, e.data["seen_at"], e.severity) for e in events][:1] == [
        ("diverging", 10, 11 if case == "shock" else 12, severity)]
    assert ("loss 60 at step 10 was" if case == "shock" else "(lowest of steps 10-12)") in events[0].message


@pytest.mark.parametrize("chunk,resume", [(1, False), (11, False), (11, True), (64, False)])
@pytest.mark.parametrize("case, dated, seen", [
    ("level", 10, 12),        # three losses at 2.5x from step 10: raised at 12, dated 10
    ("nan_inside", 10, 13),   # a NaN loss among them is no loss of the stretch: 10, 12, 13
    ("persist1", 10, None),   # persist=1: the one loss is the stretch, raised where it is
    ("shock_persist1", 10, None),  # persist=1: the level rule holds on the shock's own step
    ("trend", 16, None),      # 1.6x (under 2x) from 10: the CUSUM, +0.247 a step from 12, reaches 1 at 16: not dated
])
def test_divergence_is_dated_where_the_loss_left_its_range(case, dated, seen, chunk, resume):
    """``diverging`` says since when: the event is dated at the first of the losses that stayed
    high (``data["seen_at"]``: the step that raised it, absent when the same), across any
    chunking and a resume from the state."""
    persist = 1 if case.endswith("persist1") else 3
    losses = [2.0] * 10 + {"level": [5.0] * 10, "nan_inside": [5.0, NAN] + [5.0] * 8,
                           "persist1": [5.0] * 10, "shock_persist1": [60.0, 2.5] + [2.0] * 8,
                           "trend": [3.2] * 10}[case]
    g = [1.0] * 10 + ([20.0] if case == "shock_persist1" else [1.0]) + [1.0] * 9
    events = _fed_in_chunks(lambda: D.DivergenceDetector(persist=persist), _loss_rows(losses, gnorms=g), chunk, resume)
    assert [(e.step, e.data.get("seen_at")) for e in events][:1] == [(dated, seen)]
    assert events[0].seen_at == (dated if seen is None else seen)  # the step that raised it, either way


def test_divergence_cooldown_counts_between_the_steps_events_are_dated_at():
    """cooldown=10, a first stretch dated 10: a second stretch from step 19 is raised at 22, dated
    20, the first of its windows whose date clears the cooldown (raised at 21 it would be dated
    19, nine steps after the first)."""
    losses = [2.0] * 10 + [5.0] * 3 + [2.0] * 6 + [5.0] * 6
    det = D.DivergenceDetector(cooldown=10)
    events = feed(det, bound(det), _loss_rows(losses))
    assert [(e.step, e.data.get("seen_at")) for e in events] == [(10, 12), (20, 22)]


def test_divergence_level_is_inclusive_and_an_undated_event_says_so():
    """Three losses exactly ``ratio`` (2) x the start: the level rule holds (inclusive), dated at
    the first of them.  With ``persist=1`` the one loss is raised where it is: not dated, and
    the message reads "the last 1"."""
    losses = [2.0] * 10 + [4.0] * 5
    det = D.DivergenceDetector()
    (ev,) = feed(det, bound(det), _loss_rows(losses))
    assert (ev.step, ev.data["seen_at"]) == (10, 12) and "(lowest of steps 10-12)" in ev.message
    det = D.DivergenceDetector(persist=1)
    (ev,) = feed(det, bound(det), _loss_rows(losses))
    assert ev.step == 10 and "seen_at" not in ev.data and "(lowest of the last 1)" in ev.message


@pytest.mark.parametrize("chunk", [1, 64])
def test_divergence_cusum_held_back_by_the_cooldown_keeps_its_sum(chunk):
    """cooldown=10, a first event dated 10; then the loss at 1.6x (under the level's 2x): the CUSUM
    passes ``h`` at 16, inside the cooldown, and is neither reported nor reset there; it is
    reported at 20, the first step out of the cooldown (reset at 16, it would be 21)."""
    losses = [2.0] * 10 + [5.0] * 3 + [3.2] * 17
    events = _fed_in_chunks(lambda: D.DivergenceDetector(cooldown=10), _loss_rows(losses), chunk)
    assert [(e.step, e.data.get("seen_at")) for e in events] == [(10, 12), (20, None)]


def test_divergence_shock_pending_in_a_state_without_loss_steps():
    """A state saved between a shock and its confirmation by a version that kept no loss steps:
    the shock's step is unknown, so the event stays at the confirming step (not dated at 0)."""
    losses = [2.0] * 10 + [60.0, 2.5] + [2.0] * 8
    rows = _loss_rows(losses, gnorms=[1.0] * 10 + [20.0] + [1.0] * 9)
    det = D.DivergenceDetector()
    guard = bound(det)
    assert det.update(np.arange(11), np.stack(rows[:11]), guard.run) == []
    state = json.loads(json.dumps(det.state_dict()))
    del state["recent_steps"]
    det = D.DivergenceDetector()
    det.bind(guard.run)
    det.load_state_dict(state)
    (ev,) = det.update(np.arange(11, 20), np.stack(rows[11:]), guard.run)
    assert ev.step == 11 and "seen_at" not in ev.data
    assert ev.message.startswith("loss 60 on the step before was 30.0x")


def test_divergence_state_without_loss_steps_dates_from_the_steps_it_knows():
    """A state saved before events were dated holds the last losses, not their steps: a stretch
    that began before the resume is dated at its first step seen after it."""
    rows = _loss_rows([2.0] * 10 + [5.0] * 10)
    det = D.DivergenceDetector()
    guard = bound(det)
    assert det.update(np.arange(11), np.stack(rows[:11]), guard.run) == []
    state = json.loads(json.dumps(det.state_dict()))
    assert state["recent_steps"] == [9, 10]
    del state["recent_steps"]
    det = D.DivergenceDetector()
    det.bind(guard.run)
    det.load_state_dict(state)
    (ev,) = det.update(np.arange(11, 20), np.stack(rows[11:]), guard.run)
    assert (ev.step, ev.data["seen_at"]) == (11, 12) and "(lowest of steps 11-12)" in ev.message


@pytest.mark.parametrize("after", [2.0, 2.39, 2.41, math.nan])
@pytest.mark.parametrize("chunk,resume", [(1, False), (11, False), (11, True), (64, False)])
def test_divergence_shock_needs_the_next_loss_to_stay_high(after, chunk, resume):
    """One batch 30x the start with the gradient 20x (a heavy-tailed batch, or a wrecking
    update): the next finite loss decides.  Back below ``respond`` x the start (1.2 x 2.0):
    nothing; still above: critical, raised on that step and dated at the shock's, naming both
    losses.  A NaN loss in between is not a step the rule reads (the next finite one decides);
    any chunking gives the same, and so does a detector rebuilt from ``state_dict()`` between
    the shock (the 11th row) and the next."""
    nxt = [after, 2.0] if math.isnan(after) else [after]
    losses = [2.0] * 10 + [60.0] + nxt + [2.0] * (9 - len(nxt))
    g = [1.0] * 10 + [20.0] + [1.0] * 9
    events = _fed_in_chunks(D.DivergenceDetector, _loss_rows(losses, gnorms=g), chunk, resume)
    if after > 2.4:
        (ev,) = events
        assert (ev.step, ev.data["seen_at"], ev.severity) == (10, 11, "critical")
        assert ev.message.startswith("loss 60 at step 10 was 30.0x its value at the start (2)")
        assert f"and {after:.4g} at step 11" in ev.message
    else:
        assert events == []


@pytest.mark.parametrize("patience", [1, 3])
def test_poisoned_streak_from_the_first_step_fires_on_its_patience_th_step(patience):
    """A run poisoned from step 0: the event comes on step patience-1 (not one step early)
    and names step 0 as the streak's first."""
    det = D.PoisonedRunDetector(patience=patience)
    events = feed(det, bound(det), _loss_rows([1.0] * 8, bad=[True] * 8))
    assert [(e.step, e.data["first_step"], e.data["count"]) for e in events] == [(patience - 1, 0, patience)]


def test_vanishing_through_depth_with_four_weight_layers_names_the_starved_ones():
    """Gradient norms shrinking 10-20x per layer from the output back (2,000x over 4 weight
    layers, the smallest not 'tiny'): the depth rule fires after ``patience`` steps and names
    the layers below the largest / sqrt(depth_ratio), earliest first."""
    names = [f"l{i}.weight" for i in range(4)]
    params = [nn.Parameter(torch.ones(3, 3)) for _ in names]
    det = D.VanishingDetector(rel=1e-4, patience=5)
    guard = gg.Guard(list(zip(names, params)), torch.optim.SGD(params, lr=0.1), detectors=[det])
    norms = (5e-5, 1e-3, 1e-2, 1e-1)
    head = dict(bad=0.0, skipped=0.0, loss=1.0, loss_bad=0.0, global_norm=0.1, clip_coef=1.0, lr=0.1,
                param_norm=math.nan)
    r = np.asarray([head[c] for c in GLOBAL_COLS] + list(norms) + list(norms), np.float32)
    events = det.update(list(range(8)), np.stack([r] * 8), guard.run)
    assert [(e.step, e.data["rule"]) for e in events] == [(4, "depth")]
    assert events[0].layers == ["l0.weight", "l1.weight"]


def test_exploding_trend_rate_is_the_least_squares_slope():
    """The trend event's per-step rate is exp of the least-squares slope of the log norm over
    the window (numpy's polyfit as the reference), not just any rising measure."""
    det = D.ExplodingDetector()
    guard = bound(det)
    rng = np.random.default_rng(1)
    grow = [row(gnorm=float(3.0 ** k * np.exp(rng.normal(0, 0.2))), layers=(0.5, 3.0 ** k, 0.5, 0.1))
            for k in range(10)]
    rows = noisy_rows(30) + grow
    ev = [e for e in feed(det, guard, rows) if e.data.get("rule") == "trend"]
    assert ev
    n, k = det.trend_window, ev[0].step
    g = np.stack(rows)[:, GLOBAL_COLS.index("global_norm")].astype(np.float64)
    slope = np.polyfit(np.arange(n), np.log(g[k - n + 1:k + 1]), 1)[0]
    assert ev[0].data["rate"] == pytest.approx(math.exp(slope), rel=1e-6)


@pytest.mark.parametrize("first", [1, 3, 8, 12])
def test_rolling_robust_matches_numpy_in_warm_up_and_full_windows(first):
    """The (median, MAD x 1.4826) of the window before each position, short warm-up windows
    included, against numpy on each window."""
    from gradguard.detect._window import rolling_robust

    cat = np.random.default_rng(first).lognormal(0, 1, 20)
    size = 8
    med, sd = rolling_robust(cat, first, size)
    for p in range(first, len(cat)):
        w = cat[max(0, p - size):p]
        assert med[p - first] == np.median(w)
        assert sd[p - first] == pytest.approx(1.4826 * np.median(np.abs(w - np.median(w))), rel=1e-12)


def test_names_list_counts_the_rest():
    from gradguard.detect._window import names_list

    assert names_list(["a", "b", "c", "d", "e"]) == "a, b, c and 2 more"
    assert names_list(["a", "b"]) == "a, b"
    assert names_list(list("abcdefgh"), k=2) == "a, b and 6 more"


def test_poisoned_streak_survives_a_flush_that_ends_on_the_firing_row():
    """The firing row is the last of its flush (at an odd index): the streak carried to the
    next flush is the full one, so the next flush's rows do not fire again."""
    det = D.PoisonedRunDetector(patience=2)
    guard = bound(det)
    assert [e.step for e in feed(det, guard, _loss_rows([1.0] * 2, bad=[True] * 2))] == [1]
    assert det.state_dict()["streak"] == 2
    assert feed(det, guard, _loss_rows([1.0] * 3, bad=[True] * 3), start=2) == []


def test_vanishing_stuck_layer_is_reported_again_after_the_cooldown():
    """A layer that stays tiny: reported at ``patience`` steps and again once the cooldown has
    passed (its count keeps growing past ``patience``)."""
    det = D.VanishingDetector(patience=3, cooldown=5)
    guard = bound(det)
    rows = [row(layers=(1e-9, 0.5, 0.5, 0.1)) for _ in range(12)]
    assert [e.step for e in feed(det, guard, rows)] == [2, 7]


class _LoRA(nn.Module):
    """A base layer plus a low-rank update whose B starts at zero, a head initialised tiny, and
    an embedding table that holds most of the parameter norm (as in a language model)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4096, 32)
        self.base = nn.Linear(8, 32)
        self.a = nn.Linear(8, 4, bias=False)
        self.b = nn.Linear(4, 32, bias=False)
        nn.init.zeros_(self.b.weight)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 4)
        nn.init.normal_(self.head.weight, std=1e-4)

    def forward(self, x):
        tok = (x[:, 0].abs() * 1000).long() % 4096
        return self.head(self.norm(torch.relu(self.base(x) + self.b(self.a(x))) + self.emb(tok)))


def _train(model, steps, every, corrupt=None, lr=1e-2):
    torch.manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    guard = gg.Guard(model, opt, detectors=[D.WeightGrowthDetector()], param_norm_every=every, flush_every=8)
    w = torch.randn(8, 4)
    for i in range(steps):
        x = torch.randn(16, 8)
        y = (x @ w).argmax(1)
        if corrupt is not None and i == corrupt[1]:
            with torch.no_grad():
                corrupt[0].mul_(30.0)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        guard.step(loss)
    guard.flush()
    return [e for e in guard.events if e.kind == "weight_growth"]


@pytest.mark.parametrize("every", [1, 5])
def test_a_corrupted_weight_is_named_at_the_next_measurement(every):
    """x30 on one weight matrix behind a LayerNorm: the loss barely moves and the total parameter
    norm grows a few percent; the per-tensor parameter norms name it at the first measuring step
    that sees it (35 when measured every 5), and the event is dated 33: behind the LayerNorm the
    tensor's gradient norm fell about 30x on that step."""
    torch.manual_seed(0)
    model = _LoRA()
    ev = _train(model, 60, every, corrupt=(model.base.weight, 33))
    assert [(e.step, e.severity, e.layers[0], e.data["seen_at"]) for e in ev] == [
        (33, "warning", "base.weight", 33 if every == 1 else 35)]
    assert "base.weight grew" in ev[0].message and ev[0].data["culprit_scores"][0] > 25


def test_zero_and_tiny_initialised_weights_growing_are_not_a_jump():
    """LoRA's B (zero at the start) and a head initialised at 1e-4 grow by large factors in a
    healthy run; measured every step, they are judged only once above the floor."""
    torch.manual_seed(0)
    model = _LoRA()
    assert _train(model, 300, 1) == []
    assert model.b.weight.norm() > 0.1 and model.head.weight.norm() > 100 * 1e-4 * 32 ** 0.5 * 2


def test_a_zero_size_weight_does_not_blind_the_jump_rule():
    """A weight tensor with no elements (norm 0 on every measurement) is never judged, and the
    others still are: b.weight x20 is named."""
    run = _run(names=("a.weight", "empty.weight", "b.weight"), shapes=((4, 4), (0, 4), (4, 4)), every=1)
    det = D.WeightGrowthDetector()
    det.bind(run)
    pn = np.tile([2.0, 0.0, 2.0], (12, 1))
    pn[10:, 2] = 40.0
    rows = _rows(12, np.ones((12, 3)), np.linalg.norm(pn, axis=1), every=1)
    rows[:, len(GLOBAL_COLS) + 6:] = pn
    ev = det.update(list(range(12)), rows, run)
    assert [(e.step, e.layers[:1]) for e in ev] == [(10, ["b.weight"])]


def _jump_rows(pn, every=1):
    """Rows whose per-tensor parameter norms are ``pn`` (steps x tensors), measured every step."""
    rows = _rows(len(pn), np.ones(pn.shape), np.linalg.norm(pn, axis=1), every=every)
    rows[:, len(GLOBAL_COLS) + 2 * pn.shape[1]:] = pn
    return rows


@pytest.mark.parametrize("case", ["large_total", "total_grew"])
def test_the_jump_floor_is_relative_to_the_total_rms_now(case):
    """A small tensor (RMS 0.5) jumping 20x is below the floor (0.01 x the total RMS) when the
    total RMS is ~100: because the model is large, or because it grew there since the window began."""
    run = _run(names=("big.weight", "small.weight"), shapes=((100, 100), (4, 4)), every=1)
    det = D.WeightGrowthDetector(growth=1e9)  # only the jump rule
    det.bind(run)
    big = np.full(30, 100.0 * 100)
    if case == "total_grew":  # RMS 1 -> 100 over steps 0-20 (the window still holds step 0)
        big[:21] = np.geomspace(100, 100 * 100, 21)
    pn = np.stack([big, np.full(30, 0.5 * 4)], 1)  # norms: RMS x sqrt(numel)
    pn[25:, 1] *= 20
    assert det.update(list(range(30)), _jump_rows(pn), run) == []
    det2 = D.WeightGrowthDetector(growth=1e9, layer_floor=1e-4)  # a lower floor judges it
    det2.bind(run)
    assert [(e.step, e.layers[0]) for e in det2.update(list(range(30)), _jump_rows(pn), run)] == [(25, "small.weight")]


def test_a_zero_tensor_is_never_judged_even_without_a_floor():
    """layer_floor=0 judges every tensor with a previous norm above 0; one that starts at 0
    (LoRA's B) has no ratio: the jump named is the other one's."""
    run = _run(names=("b.weight", "head.weight"), shapes=((4, 4), (4, 4)), every=1)
    det = D.WeightGrowthDetector(layer_floor=0.0)
    det.bind(run)
    pn = np.array([[0.0, 1.0]] * 4 + [[5.0, 30.0]] * 4)
    ev = det.update(list(range(8)), _jump_rows(pn), run)
    assert [(e.step, e.layers) for e in ev] == [(4, ["head.weight"])]


@pytest.mark.parametrize("factor, fires", [(10.0, True), (9.99, False)])
def test_a_jump_of_exactly_layer_jump_fires(factor, fires):
    """>= layer_jump fires; culprits are the judged tensors within 10x of the top ratio (a.weight's
    1.0 is, at exactly 10x; d.weight's 0.5 is not), never one that was not judged (c.weight: zero
    before)."""
    run = _run(names=("a.weight", "b.weight", "c.weight", "d.weight"), shapes=((4, 4),) * 4, every=1)
    det = D.WeightGrowthDetector(growth=1e9)
    det.bind(run)
    pn = np.array([[4.0, 4.0, 0.0, 4.0]] * 3 + [[4.0, 4.0 * factor, 0.0, 2.0]] * 2)
    ev = det.update(list(range(5)), _jump_rows(pn), run)
    assert [e.layers for e in ev] == ([["b.weight", "a.weight"]] if fires else [])


def test_no_weight_tensors_no_jump_whatever_the_threshold():
    """Biases only (no tensor of 2+ dimensions): the jump rule has nothing to judge."""
    run = _run(names=("a.bias", "b.bias"), shapes=((4,), (4,)), every=1)
    det = D.WeightGrowthDetector(growth=1e9, layer_jump=0.5)
    det.bind(run)
    pn = np.array([[1.0, 1.0]] * 3 + [[1.0, 30.0]] * 2)
    assert det.update(list(range(5)), _jump_rows(pn), run) == []
    det2 = D.WeightGrowthDetector(layer_jump=0.5)  # the total rule fires: culprits from the gradients
    det2.bind(run)
    ev = det2.update(list(range(5)), _jump_rows(pn), run)
    assert [(e.step, e.message.split(" in the last")[0]) for e in ev] == [(3, "RMS weight grew 21.2x")]
    assert "since the last measurement" not in ev[0].message


@pytest.mark.parametrize("chunk", [1, 2, 8])
def test_a_measurement_without_per_tensor_norms_keeps_the_previous_one(chunk):
    """A measuring row whose per-tensor block is NaN (recorded before it existed) is skipped by
    the jump rule: the next row is compared with the last complete one, in any chunking."""
    run = _run(names=("a.weight", "b.weight"), shapes=((4, 4), (4, 4)), every=1)
    det = D.WeightGrowthDetector(growth=1e9)
    det.bind(run)
    pn = np.array([[4.0, 4.0]] * 4 + [[4.0, 80.0]] * 2)
    rows = _jump_rows(pn)
    rows[3, len(GLOBAL_COLS) + 4:] = np.nan
    ev = []
    for a in range(0, 6, chunk):
        ev += det.update(list(range(a, min(6, a + chunk))), rows[a:a + chunk], run)
    assert [(e.step, e.layers[0]) for e in ev] == [(4, "b.weight")]


def test_total_growth_of_exactly_growth_and_a_jump_after_zero_weights():
    """The total rule fires at exactly ``growth``x (and says so); a jump after an all-zero start
    (a zero-initialised linear model: the window's minimum RMS is 0) is reported as a jump."""
    run = _run(names=("w.weight",), shapes=((4, 4),), every=1)
    det = D.WeightGrowthDetector()
    det.bind(run)
    ev = det.update(list(range(4)), _jump_rows(np.array([[4.0], [4.0], [40.0], [40.0]])), run)
    assert [(e.step, e.message.split(" in the last")[0]) for e in ev] == [(2, "RMS weight grew 10.0x")]
    assert "; w.weight grew 10x since the last measurement" in ev[0].message  # a jump too, at exactly 10x
    run2 = _run(names=("a.weight", "b.weight"), shapes=((4, 4), (4, 4)), every=1)
    det2 = D.WeightGrowthDetector(growth=1e9)
    det2.bind(run2)
    pn = np.array([[0.0, 0.0], [4.0, 4.0], [4.0, 4.0], [80.0, 4.0]])
    ev = det2.update(list(range(4)), _jump_rows(pn), run2)
    assert [(e.step, e.layers[0], e.data["growth"]) for e in ev] == [(3, "a.weight", "Inf")]
    assert ev[0].message.startswith("the weights of a.weight grew 20x")


def test_total_growth_culprits_are_the_tensors_that_grew_most_since_the_start():
    """With per-tensor parameter norms, a total-growth event names the weight tensors by their
    own growth since the guard was built (a 20x, c 10x, b 6x), not by their gradients (b's is
    largest); c (RMS 0.05) and e (0.01) start small but above the floor (0.01 x the total RMS
    then, 0.0091), d below it (RMS 0.007): d's 15x is not ranked."""
    run = _run(names=("a.weight", "b.weight", "c.weight", "d.weight", "e.weight"), shapes=((4, 4), (8, 8)) + ((4, 4),) * 3,
               init=np.array([4.0, 8.0, 0.2, 0.028, 0.04]), every=1)
    det = D.WeightGrowthDetector()
    det.bind(run)
    t = np.linspace(0, 1, 9)[:, None]
    pn = np.array([4.0, 8.0, 0.2, 0.028, 0.04]) * np.array([20.0, 6.0, 10.0, 15.0, 12.0]) ** t  # RMS 1 -> 20, ...
    rows = _rows(9, np.tile([0.1, 5.0, 0.1, 0.1, 0.1], (9, 1)), np.linalg.norm(pn, axis=1), every=1)
    rows[:, len(GLOBAL_COLS) + 10:] = pn
    ev = det.update(list(range(9)), rows, run)
    assert [(e.step, e.layers) for e in ev] == [(8, ["a.weight", "e.weight", "c.weight", "b.weight"])]
    np.testing.assert_allclose(ev[0].data["culprit_scores"], [20.0, 12.0, 10.0, 6.0], rtol=1e-6)  # float32 rows
    assert "grew most since the guard was built: a.weight (20x its initial norm)" in ev[0].message


def test_from_zero_weights_the_culprits_come_from_the_gradients():
    """A model initialised at zero (every tensor's initial norm 0) has no growth since the start
    to rank: a critical RMS names the tensor with the largest gradient."""
    run = _run(names=("a.weight", "b.weight"), shapes=((4, 4), (4, 4)), init=np.zeros(2), every=1)
    det = D.WeightGrowthDetector()
    det.bind(run)
    pn = np.array([[0.0, 0.0], [500.0, 500.0]])  # RMS 0 -> 125: above the max_rms limit (100)
    rows = _rows(2, np.tile([0.1, 5.0], (2, 1)), np.linalg.norm(pn, axis=1), every=1)
    rows[:, len(GLOBAL_COLS) + 4:] = pn
    ev = det.update([0, 1], rows, run)
    assert [(e.step, e.severity, e.layers) for e in ev] == [(1, "critical", ["b.weight"])]


def test_a_tensor_exactly_at_the_floor_is_judged():
    """The floor is inclusive: four tensors of RMS 1 make a total RMS of exactly 1, and with
    layer_floor=1 each is at the floor, judged: b.weight's 20x jump is named."""
    run = _run(names=("a.weight", "b.weight", "c.weight", "d.weight"), shapes=((4, 4),) * 4, every=1)
    det = D.WeightGrowthDetector(growth=1e9, layer_floor=1.0)
    det.bind(run)
    pn = np.array([[4.0] * 4] * 3 + [[4.0, 80.0, 4.0, 4.0]] * 2)
    assert [(e.step, e.layers[0]) for e in det.update(list(range(5)), _jump_rows(pn), run)] == [(3, "b.weight")]


def test_without_initial_norms_total_growth_culprits_come_from_the_gradients():
    """A RunInfo without init_layer_norms (rows replayed from elsewhere): the reference is the
    gradient norms of the first measured row, even where per-tensor parameter norms exist."""
    run = _run(names=("a.weight", "b.weight"), shapes=((4, 4), (4, 4)), init=None, every=1)
    det = D.WeightGrowthDetector()
    det.bind(run)
    t = np.linspace(0, 1, 9)[:, None]
    pn = np.array([4.0, 4.0]) * np.array([20.0, 2.0]) ** t
    norms = np.tile([1.0, 1.0], (9, 1))
    norms[8] = [1.0, 3.0]  # b's gradient tripled since the first row, a's did not
    rows = _rows(9, norms, np.linalg.norm(pn, axis=1), every=1)
    rows[:, len(GLOBAL_COLS) + 4:] = pn
    ev = det.update(list(range(9)), rows, run)
    assert [(e.step, e.layers[0]) for e in ev] == [(8, "b.weight")]
    assert "largest gradient relative to the first measured step: b.weight (3x)" in ev[0].message


def test_a_tensor_exactly_at_the_init_floor_is_ranked():
    """Four tensors of initial RMS 1 (total exactly 1) with layer_floor=1: each is at the floor,
    so each is ranked by its growth since the start (a 20x first), not by its gradient (d's)."""
    run = _run(names=("a.weight", "b.weight", "c.weight", "d.weight"), shapes=((4, 4),) * 4,
               init=np.full(4, 4.0), every=1)
    det = D.WeightGrowthDetector(layer_floor=1.0)
    det.bind(run)
    t = np.linspace(0, 1, 9)[:, None]
    pn = np.full(4, 4.0) * np.array([20.0, 12.0, 10.0, 8.0]) ** t
    rows = _rows(9, np.tile([0.1, 0.1, 0.1, 5.0], (9, 1)), np.linalg.norm(pn, axis=1), every=1)
    rows[:, len(GLOBAL_COLS) + 8:] = pn
    ev = det.update(list(range(9)), rows, run)
    assert [(e.step, e.layers[0]) for e in ev] == [(8, "a.weight")]


def test_regrowth_after_a_shrink_still_ranks_by_growth_since_the_start():
    """Weights that shrank 20x and grew back 12x (the total rule fires) are still ranked by their
    own size against the start (a 0.9x, b 0.6x), even though no tensor is above its start."""
    run = _run(names=("a.weight", "b.weight"), shapes=((4, 4), (4, 4)), init=np.full(2, 4.0), every=1)
    det = D.WeightGrowthDetector()
    det.bind(run)
    down = np.geomspace(1, 1 / 20, 6)[:, None] * np.array([[1.5, 1.0]])
    up = down[-1] * np.geomspace(1, 12, 6)[1:, None]
    pn = 4.0 * np.concatenate([down, up])
    rows = _rows(len(pn), np.tile([0.1, 5.0], (len(pn), 1)), np.linalg.norm(pn, axis=1), every=1)
    rows[:, len(GLOBAL_COLS) + 4:] = pn
    ev = det.update(list(range(len(pn))), rows, run)
    assert [(e.step, e.layers) for e in ev] == [(10, ["a.weight", "b.weight"])]
    np.testing.assert_allclose(ev[0].data["culprit_scores"], [0.9, 0.6], rtol=1e-6)


def _jump_between_measurements(at, factor, gap=None, gap_at=25, n=40, loss=None):
    """``n`` steps, parameter norms measured every 10; from step ``at`` on, NAMES[1]'s weights are
    x30 (seen at the next measuring step) and its gradient norm is /``factor``; the other
    gradients wander by up to 2x a step; ``loss``: the loss of each step (default 1).  Row ``gap_at`` holds no usable gradient for NAMES[1]:
    ``gap`` "bad" (poisoned, NaN gradients), "bad-finite" (poisoned by its loss, its gradient
    norms finite but NAMES[1]'s 100x off), "missing" (a NaN norm, the row fine) or "zero"."""
    rng = np.random.default_rng(0)
    rows = []
    for t in range(n):
        g = 0.5 * np.exp(rng.uniform(-0.35, 0.35, 3))
        if t >= at:
            g[1] /= factor
        pn = [3.0, 90.0 if t >= at else 3.0, 3.0, 3 ** 0.5]
        measured = t % 10 == 0
        rows.append(row(gnorm=float(np.linalg.norm(g)), layers=(*g, 0.1), loss=1.0 if loss is None else loss[t],
                        param_norm=float(np.linalg.norm(pn)) if measured else math.nan,
                        param_norms=pn if measured else None))
        if t == gap_at and gap == "bad":
            rows[-1] = row(gnorm=math.nan, layers=(math.nan,) * 4, bad=1.0)
        if t == gap_at and gap == "bad-finite":
            rows[-1] = row(gnorm=math.inf, layers=(g[0], 100 * g[1], g[2], 0.1), bad=1.0, loss=math.inf)
        if t == gap_at and gap in ("missing", "zero"):
            rows[-1][len(GLOBAL_COLS) + 1] = math.nan if gap == "missing" else 0.0
    return rows


@pytest.mark.parametrize("chunk,resume", [(1, False), (7, True), (40, False)])
@pytest.mark.parametrize("at,factor,dated,gap", [
    (23, 30.0, 23, None), (23, 4.0, 23, None), (21, 30.0, 21, None), (30, 30.0, 30, None),
    *[(26, f, d, gap) for gap in ("bad", "bad-finite", "missing", "zero") for f, d in ((30.0, 26), (2.0, 30))]])
def test_a_jump_between_measurements_is_dated_by_its_gradient(at, factor, dated, gap, chunk, resume):
    """A weight x30 between two measurements is seen at the next one (step 30); its gradient norm
    falling 30x at once dates it, as does a 4x fall (out of twice the range of the 20 steps
    before, where it wandered 2x); 2x, inside that range, does not (nor across a gap), also on the first
    step after a measurement, on the measuring step itself, and across a row without that
    gradient (25: poisoned, or the tensor's gradient missing or zero: the change at 26 is
    measured against 24, and the gap itself is no change).  Any chunking, with or without a
    resume, agrees."""
    make = lambda: D.WeightGrowthDetector(growth=1e9)  # noqa: E731  only the jump rule
    events = _fed_in_chunks(make, _jump_between_measurements(at, factor, gap), chunk, resume)
    assert [(e.step, e.layers[0], e.data["seen_at"]) for e in events] == [(dated, NAMES[1], 30)]
    assert ("when the jump most likely happened" in events[0].message) == (factor > 2)


@pytest.mark.parametrize("chunk,resume", [(1, False), (7, True), (40, False)])
def test_a_jump_is_dated_by_the_first_step_out_of_range_not_the_largest_change(chunk, resume):
    """Logits x30 into a softmax (measured: a CNN's conv x30, a batch-2 MLP's output layer): the
    loss jumps on the first step (23) while the tensor's gradient barely moves, so its gradient
    per unit of loss falls 27x; the saturated steps after swing its gradient norm 1e6x (26).
    The largest one-step change would date the jump 3 steps late; the first step out of the
    range before the interval dates it."""
    loss = [1.0] * 40
    loss[23] = 27.0
    rows = _jump_between_measurements(23, 1.0, loss=loss)
    rows[26][len(GLOBAL_COLS) + 1] *= 1e-6
    make = lambda: D.WeightGrowthDetector(growth=1e9)  # noqa: E731
    events = _fed_in_chunks(make, rows, chunk, resume)
    assert [(e.step, e.data["seen_at"]) for e in events] == [(23, 30)]
    assert "at step 23 its gradient norm per unit of loss left 2x the range" in events[0].message
    rows[23][GLOBAL_COLS.index("loss")] = 1.0  # without the loss: the largest change dates it
    assert [e.step for e in _fed_in_chunks(make, rows, chunk, resume)] == [26]


@pytest.mark.parametrize("loss_too, dated", [(True, 25), (False, 22)])
def test_an_easy_batch_is_not_a_jump(loss_too, dated):
    """An easy batch at step 22 lowers the gradient norm 5x, out of its range, and the loss
    with it: its gradient per unit of loss is where it was, so the 30x fall at 25 dates the jump.
    The same fall of the gradient with the loss unchanged is the first step out of range."""
    loss = [1.0] * 40
    loss[22] = 0.2 if loss_too else 1.0
    rows = _jump_between_measurements(25, 30.0, loss=loss)
    rows[22][len(GLOBAL_COLS) + 1] /= 5.0
    det = D.WeightGrowthDetector(growth=1e9)
    ev = feed(det, bound(det), rows)
    assert [(e.step, e.data["seen_at"]) for e in ev] == [(dated, 30)]


@pytest.mark.parametrize("loss_at_23, dated", [(0.0, 23), (math.nan, 26), (-1.0, 26)])
def test_a_gradient_at_a_loss_of_zero_is_out_of_range(loss_at_23, dated):
    """A finite gradient at a loss of exactly 0 (a softmax saturated by the jump) is out of any
    range; a NaN or negative loss is no evidence (the largest change dates the jump, 26)."""
    loss = [1.0] * 40
    loss[23] = loss_at_23
    rows = _jump_between_measurements(23, 1.0, loss=loss)
    rows[26][len(GLOBAL_COLS) + 1] *= 1e-6
    det = D.WeightGrowthDetector(growth=1e9)
    assert [e.step for e in feed(det, bound(det), rows)] == [dated]


@pytest.mark.parametrize("factor", [30.0, 5.5])
def test_negative_losses_give_no_range(factor):
    """A negative log-likelihood: no gradient-per-loss ratio on any step, so no range; the
    largest change of the tensor's gradient dates the jump (5.5x: just over ``onset_break``)."""
    rows = _jump_between_measurements(23, factor, loss=[-1.0] * 40)
    det = D.WeightGrowthDetector(growth=1e9)
    ev = feed(det, bound(det), rows)
    assert [e.step for e in ev] == [23] and "changed" in ev[0].message and "per unit of loss" not in ev[0].message


def test_a_tensor_without_a_ratio_in_the_context_has_no_range():
    """Negative losses until step 20, positive after: the interval 21-30 has no range to leave
    (not an empty one that every value leaves); the largest change dates the jump at 25."""
    rows = _jump_between_measurements(25, 30.0, loss=[-1.0] * 21 + [1.0] * 19)
    det = D.WeightGrowthDetector(growth=1e9)
    ev = feed(det, bound(det), rows)
    assert [e.step for e in ev] == [25] and "changed" in ev[0].message


@pytest.mark.parametrize("chunk,resume", [(1, False), (7, True)])
def test_a_rise_out_of_range_is_dated_across_a_resume(chunk, resume):
    """The gradient 5x up at 23 (above the range; the range is taken at 20 and saved with the
    state), then a 1e6x fall at 26: dated 23."""
    rows = _jump_between_measurements(23, 0.2)
    rows[26][len(GLOBAL_COLS) + 1] *= 1e-6
    events = _fed_in_chunks(lambda: D.WeightGrowthDetector(growth=1e9), rows, chunk, resume)
    assert [e.step for e in events] == [23]


def test_a_poisoned_row_is_no_evidence_of_a_jump():
    """A row flagged bad (its global norm overflowed) with a finite loss and that tensor's
    gradient 100x: no evidence; the jump at 26 is dated there."""
    rows = _jump_between_measurements(26, 30.0)
    rows[24][len(GLOBAL_COLS) + 1] *= 100.0
    rows[24][GLOBAL_COLS.index("bad")] = 1.0
    det = D.WeightGrowthDetector(growth=1e9)
    assert [e.step for e in feed(det, bound(det), rows)] == [26]


@pytest.mark.parametrize("onset_range, dated", [(2.0, 23), (100.0, 26)])
def test_onset_range_sets_how_far_out_a_step_must_be(onset_range, dated):
    """The loss 27x at the jump's first step: out of twice the range, inside 100x of it (the
    largest change dates it then)."""
    loss = [1.0] * 40
    loss[23] = 27.0
    rows = _jump_between_measurements(23, 1.0, loss=loss)
    rows[26][len(GLOBAL_COLS) + 1] *= 1e-6
    det = D.WeightGrowthDetector(growth=1e9, onset_range=onset_range)
    assert [e.step for e in feed(det, bound(det), rows)] == [dated]


@pytest.mark.parametrize("kw, match", [({"onset_range": 0.5}, "onset_range"), ({"onset_range": math.nan}, "onset_range"),
                                       ({"onset_context": 0}, "onset_context"), ({"onset_context": 2.5}, "onset_context")])
def test_bad_dating_arguments_are_named(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        D.WeightGrowthDetector(**kw)
    assert D.WeightGrowthDetector(onset_range=1.0, onset_context=1).onset_range == 1.0  # the bounds hold


@pytest.mark.parametrize("factor, dated", [(30.0, 26), (4.0, 30)])
def test_a_state_saved_before_jump_dating_resumes_mid_interval(factor, dated):
    """A state without the dating fields (saved by an older version) loaded at step 23: the
    interval's first row has no earlier gradient, so it is no change, and there is no range
    before it; a 30x change at 26 dates the jump, a 4x one does not."""
    rows = np.stack(_jump_between_measurements(26, factor))
    old = D.WeightGrowthDetector(growth=1e9)
    guard = bound(old)
    assert old.update(np.arange(23), rows[:23], guard.run) == []
    state = json.loads(json.dumps(old.state_dict()))
    for key in ("glast", "gbest", "gat", "ctx", "lo", "hi", "gfirst"):
        del state[key]
    det = D.WeightGrowthDetector(growth=1e9)
    det.bind(guard.run)
    det.load_state_dict(state)
    ev = det.update(np.arange(23, 40), rows[23:], guard.run)
    assert [(e.step, e.data["seen_at"]) for e in ev] == [(dated, 30)]


@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_a_change_on_a_measuring_step_belongs_to_the_interval_it_ends(chunk):
    """The weights measured at step 30 were fine, so a jump seen at 40 happened after 30: the
    tensor's gradient norm rising 100x at step 30 (and staying there) is no candidate, its 30x
    fall at 33 dates the jump."""
    rows = _jump_between_measurements(33, 30.0, n=41)
    for t in range(30, 41):
        rows[t][len(GLOBAL_COLS) + 1] *= 100.0
    events = _fed_in_chunks(lambda: D.WeightGrowthDetector(growth=1e9), rows, chunk)
    assert [(e.step, e.data["seen_at"]) for e in events] == [(33, 40)]


def test_onset_break_of_one_dates_at_the_largest_change_inclusive():
    """onset_break=1 (the smallest allowed) dates a jump at the interval's largest one-step change
    of the tensor's gradient norm, however small: a 4x fall at 23 among changes of at most 2x;
    with constant gradients every change is exactly 1x, and the first (step 21, against the
    measurement at 20) is the one kept."""
    make = lambda: D.WeightGrowthDetector(growth=1e9, onset_break=1.0)  # noqa: E731
    ev = _fed_in_chunks(make, _jump_between_measurements(23, 4.0), 40)
    assert [(e.step, e.data["seen_at"]) for e in ev] == [(23, 30)]
    flat = []
    for t in range(40):  # the same weights, gradients that never change
        pn = [3.0, 90.0 if t >= 23 else 3.0, 3.0, 3 ** 0.5]
        measured = t % 10 == 0
        flat.append(row(gnorm=1.0, layers=(0.5, 0.5, 0.5, 0.1), param_norm=float(np.linalg.norm(pn)) if measured
                        else math.nan, param_norms=pn if measured else None))
    ev = _fed_in_chunks(make, flat, 40)
    assert [(e.step, e.data["seen_at"]) for e in ev] == [(21, 30)]


@pytest.mark.parametrize("bad", [0.0, 0.5, 0.999, -1.0, math.nan, math.inf, "5"])
def test_onset_break_is_checked(bad):
    with pytest.raises(ValueError, match="onset_break"):
        D.WeightGrowthDetector(onset_break=bad)


@pytest.mark.parametrize("flush_every", [16, 64])
def test_a_jump_is_read_before_the_loss_spike_it_caused(flush_every, tmp_path):
    """A ReLU MLP's third weight x30 at step 47 (between two measurements): the loss jumps on that
    step and the loss-spike warning names the layer downstream (the largest gradient jump); the
    weight jump, dated 47 and found at step 50, names the tensor itself.  Within the step the
    guard lists the weights first (cause before consequence), whatever the detectors' order,
    and also when the jump is found a flush after the loss spike was reported (flushes of 16)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, opt, clip=None, detectors=[D.LossSpikeDetector(critical=10.0),
                                                       D.WeightGrowthDetector(growth=1e9)],
                     flush_every=flush_every, log_dir=tmp_path, run_name="jump")
    g = torch.Generator().manual_seed(0)
    for i in range(64):
        x = torch.randn(64, 16, generator=g)
        if i == 47:
            with torch.no_grad():
                model[4].weight.mul_(30.0)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), x[:, :4].sum(1, keepdim=True))
        loss.backward()
        guard.step(loss)
    guard.flush()
    at47 = [(e.kind, e.severity, e.layers[0]) for e in guard.events if e.step == 47]
    assert at47[0] == ("weight_growth", "warning", "4.weight")
    assert ("loss_spike", "warning") in [k[:2] for k in at47[1:]] and all(k[2] != "4.weight" for k in at47[1:])
    from gradguard.events import event_order
    assert guard.events == sorted(guard.events, key=event_order)
    guard.close()
    from gradguard._json import json_safe
    from gradguard.record.store import RunStore
    assert [e.to_dict() for e in RunStore(tmp_path).events("jump")] == json_safe([e.to_dict() for e in guard.events])


def test_event_order_is_step_then_cause_to_consequence():
    """Ties keep their order; kinds outside the list (a custom detector's) come last in their step."""
    from gradguard.events import event_order
    kinds = ["diverging", "mine", "loss_spike", "spike", "exploding", "nonfinite", "weight_growth", "mine2"]
    evs = [gg.Event(5, k, "info", [], k) for k in kinds] + [gg.Event(4, "diverging", "info", [], "early")]
    assert [(e.step, e.kind) for e in sorted(evs, key=event_order)] == [
        (4, "diverging"), (5, "weight_growth"), (5, "nonfinite"), (5, "spike"), (5, "exploding"),
        (5, "loss_spike"), (5, "diverging"), (5, "mine"), (5, "mine2")]


def test_add_events_puts_a_back_dated_event_in_its_place():
    """A late finding goes before the consequences of its step and after the causes already
    there; one that ties with an event already listed goes after it; later ones are appended."""
    from gradguard.events import add_events
    ev = lambda step, kind, msg="": gg.Event(step, kind, "info", [], msg or kind)  # noqa: E731
    events = [ev(5, "loss_spike", "a"), ev(6, "spike")]
    add_events(events, [ev(7, "diverging"), ev(5, "loss_spike", "b"), ev(5, "weight_growth")])
    assert [(e.step, e.message) for e in events] == [(5, "weight_growth"), (5, "a"), (5, "b"), (6, "spike"),
                                                      (7, "diverging")]
    add_events(events, [])
    assert len(events) == 5


def test_weight_growth_state_keeps_a_gradient_reference():
    """Bound to a run without initial norms, the reference is the first measured row's gradients
    ("gradients"); a state saved then loads with that reference, not the constructor's default."""
    run = _run(names=("a.weight", "b.weight"), shapes=((4, 4), (4, 4)), init=None, every=1)
    det = D.WeightGrowthDetector()
    det.bind(run)
    det.update(list(range(3)), _jump_rows(np.array([[4.0, 4.0]] * 3)), run)
    sd = json.loads(json.dumps(det.state_dict()))
    assert sd["ref"] == "gradients"
    det2 = D.WeightGrowthDetector()
    det2.bind(run)
    det2.load_state_dict(sd)
    assert det2.state_dict() == sd


@pytest.mark.parametrize("first, start, ref", [
    ([6.67, 11.9, 11.66, 9.67, 8.7], 10.5, 9.67),   # a lucky first batch: the median
    ([12.0, 9.0, 10.5, 11.0, 8.0], 10.5, 10.5),     # an unlucky one: the median too
    ([2.3, 2.4, 2.5, 2.6, 2.7], None, 2.3),          # growing step by step: the first
    ([2.0, 2.0, 2.2, 2.4, 2.6], None, 2.0),          # non-decreasing (a tie counts): the first
    ([0.29, 0.045, 1.6, 0.039, 0.13], None, 0.29),  # one loss >= 2x the first: the first
    ([2.0, 3.99, 1.0, 1.5, 1.2], None, 1.5),         # just under 2x, not monotone: the median
    ([2.0, 4.0, 1.0, 1.5, 1.2], None, 2.0),          # exactly 2x: the first
])
def test_divergence_start_reference(first, start, ref):
    """L0 is the median of the first 5 losses unless they grow (non-decreasing, or one >= ratio
    x the first); the message quotes it.  A heavy-tailed run whose first batch was lucky, then
    held at its true start level (a learning-rate warm-up) with batches up to 4x that, is not
    diverging."""
    det = D.DivergenceDetector()
    guard = bound(det)
    rng = np.random.default_rng(0)
    rest = 2.1 * ref * np.ones(3) if start is None else start * np.exp(rng.normal(0, 0.25, 300))
    if start is not None:
        rest[37:40] = [15.4, 43.2, 14.6]  # heavy-tailed batches, the lowest of the three 1.4x the start
    events = feed(det, guard, _loss_rows(list(first) + list(rest)))
    if start is None:  # three losses at 2.1x the reference: the level rule names it
        assert [(e.step, e.data["seen_at"]) for e in events] == [(5, 7)]
        assert f"at the start ({ref:.4g})" in events[0].message
    else:
        assert events == []
