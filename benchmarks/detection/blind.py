"""Blind checks of the detectors: runs written after the defaults were chosen, never used to tune.

    python benchmarks/detection/blind.py            # replay set 1's stored runs (seconds)
    python benchmarks/detection/blind.py --set 2    # set 2
    python benchmarks/detection/blind.py --rebuild  # train them again first (~1-2 min on 2 cores)

The corpus (``corpus.py``) holds a seed-1 half that no threshold was tuned on, but its
configurations are the ones the detectors were designed against.  Set 1 (28 configurations,
seeds 2 and 3): other optimizers (RMSprop, AdamW at lr 1), widths, a 4-layer tanh MLP, a wider
LM, batches of 4 and 8, dropout, a warm-up + cosine schedule, and faults *between* the guard's
parameter-norm measurements (steps 180-241).  Set 2 (25 configurations, seeds 4 and 5): new
tasks (the adding problem, an autoencoder, two spirals, a noisy sine), residual networks,
a 1-D CNN, Nesterov, Adagrad, NAdam, RAdam, a one-cycle schedule, label smoothing.  Each set
was written before any of its runs was replayed.  Labels come from ``corpus.label_run`` (the
corpus's rules, unchanged); runs are stored under ``benchmarks/results/detection/blind*/`` and
scored by ``metrics.py``.  docs/detection.md reports what they showed.
"""
import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import corpus as C  # noqa: E402
import metrics  # noqa: E402
from corpus import (CNN, Config, Digits, HeavyTailed, Markov, TinyLM, adam, adamw, lm_loss, mlp,  # noqa: E402
                    seq_model, sgd)

OUT = metrics.RESULTS / "blind"
SEEDS = (2, 3)
OUT2 = metrics.RESULTS / "blind2"
SEEDS2 = (4, 5)


def rmsprop(lr):
    return lambda p: torch.optim.RMSprop(p, lr=lr)


def dropout_mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 128), nn.ReLU(),
                         nn.Dropout(0.3), nn.Linear(128, 10))


def warmup_cosine(steps, warm):
    """lr multipliers by step: linear warm-up, then a cosine decay to 0."""
    return {i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / (steps - warm)))
            for i in range(steps)}


def fault_runs(faults, **kw) -> list[Config]:
    """400-step runs with one injected fault each: ``(family, build, data, opt, loss, layer, kind,
    step)`` tuples; ``kw``: more ``Config`` fields (e.g. ``fp16=True``)."""
    return [Config(fam, f"fault_{kind}_{layer}", build, data, opt, 400, loss,
                   fault={"kind": kind, "layer": layer, "step": at}, **kw)
            for fam, build, data, opt, loss, layer, kind, at in faults]


def configs() -> list[Config]:
    dseq, dflat, dimg = (lambda: Digits("seq")), (lambda: Digits("flat")), (lambda: Digits("img"))
    lm, reg = (lambda: Markov()), (lambda: HeavyTailed())
    tanh4 = lambda: mlp([64, 48, 48, 48, 10], nn.Tanh)  # noqa: E731
    wide = lambda: mlp([64, 256, 10])  # noqa: E731
    c = [
        Config("x_gru", "sgdm_long", lambda: seq_model("gru", 48), dseq, sgd(0.1, 0.9), 1500),
        Config("x_gru", "sgd_lr40", lambda: seq_model("gru", 48), dseq, sgd(40.0), 300),
        Config("x_lstm", "rmsprop", lambda: seq_model("lstm", 48), dseq, rmsprop(2e-3), 800),
        Config("x_lstm", "rmsprop_lr0.5", lambda: seq_model("lstm", 48), dseq, rmsprop(0.5), 300),
        Config("x_tanh", "adam_long", tanh4, dflat, adam(2e-3), 1500),
        Config("x_tanh", "sgd_lr4", tanh4, dflat, sgd(4.0, 0.9), 300),
        Config("x_wide", "sgd_long_low_loss", wide, dflat, sgd(0.2, 0.9), 2500),
        Config("x_wide", "adam_lr0.3", wide, dflat, adam(0.3), 300),
        Config("x_cnn", "adam_long", CNN, dimg, adam(1e-3), 1500),
        Config("x_cnn", "adamw_lr1", CNN, dimg, adamw(1.0), 300),
        Config("x_lm", "pre_adamw_lr5e-4_long", lambda: TinyLM(True, d=48), lm, adamw(5e-4), 1500, lm_loss),
        Config("x_lm", "post_adamw_lr0.05", lambda: TinyLM(False, d=48), lm, adamw(0.05), 300, lm_loss),
        Config("x_lm", "pre_ramp_1.04", lambda: TinyLM(True, d=48), lm, adamw(1e-3), 500, lm_loss, ramp=(200, 1.04)),
        Config("x_reg", "adam_long", lambda: mlp([16, 64, 64, 1]), reg, adam(1e-3), 2000, F.mse_loss),
        Config("x_reg", "sgd_ramp_1.02", lambda: mlp([16, 64, 64, 1]), reg, sgd(0.01), 600, F.mse_loss, ramp=(200, 1.02)),
        Config("x_bf16", "cnn_adam", CNN, dimg, adam(2e-3), 800, bf16=True),
        Config("x_ft", "restart_x30", tanh4, dflat, sgd(0.02, 0.9), 800, lr_at={400: 30.0}),
        # long, noisy healthy runs: batches of 4 and 8, dropout, a warm-up + cosine schedule
        Config("x_noisy", "batch4_sgdm_long", lambda: mlp([64, 64, 64, 10]), lambda: Digits("flat", batch=4),
               sgd(0.02, 0.9), 3000),
        Config("x_noisy", "dropout_adam_long", dropout_mlp, dflat, adam(1e-3), 2500),
        Config("x_lstm", "batch8_adam_long", lambda: seq_model("lstm"), lambda: Digits("seq", batch=8),
               adam(2e-3), 3000),
        Config("x_lm", "pre_warmup_cosine_long", lambda: TinyLM(True), lm, adamw(3e-3), 2000, lm_loss,
               lr_at=warmup_cosine(2000, 100)),
    ]
    faults = [
        ("x_tanh", tanh4, dflat, adam(2e-3), F.cross_entropy, "4", "corrupt_weight", 237),
        ("x_tanh", tanh4, dflat, adam(2e-3), F.cross_entropy, "2", "nan_grad", 233),
        ("x_gru", lambda: seq_model("gru", 48), dseq, sgd(0.1, 0.9), F.cross_entropy, "rnn", "inf_forward", 241),
        ("x_wide", wide, dflat, sgd(0.2, 0.9), F.cross_entropy, "0", "corrupt_batch", 199),
        ("x_lm", lambda: TinyLM(True, d=48), lm, adamw(5e-4), lm_loss, "blocks.0.ff.0", "corrupt_weight", 180),
        ("x_reg", lambda: mlp([16, 64, 64, 1]), reg, adam(1e-3), F.mse_loss, "2", "nan_grad", 211),
        ("x_cnn", CNN, dimg, adam(1e-3), F.cross_entropy, None, "lr_spike", 222),
    ]
    return c + fault_runs(faults)


# ----------------------------------------------------------------------------- the second set
# Written (2026-12-01) before any of its runs was replayed: tasks and models the detectors have
# not seen (the adding problem, an autoencoder, a 2-D spiral, forecasting a noisy sine), residual
# networks with BatchNorm and with LayerNorm, a 1-D CNN, Nesterov with weight decay, Adagrad,
# NAdam, RAdam, a one-cycle schedule, label smoothing.
class Adding:
    """Hochreiter & Schmidhuber's adding problem: sum the two marked values of a sequence."""

    def __init__(self, length=30, batch=32):
        self.length, self.batch = length, batch

    def __call__(self, g):
        v = torch.rand(self.batch, self.length, generator=g)
        mark = torch.zeros(self.batch, self.length)
        half = self.length // 2
        i = torch.randint(0, half, (self.batch,), generator=g)
        j = torch.randint(half, self.length, (self.batch,), generator=g)
        mark[torch.arange(self.batch), i] = 1.0
        mark[torch.arange(self.batch), j] = 1.0
        return torch.stack([v, mark], -1), (v * mark).sum(1, keepdim=True)


class Reconstruct:
    """Digits as their own targets (an autoencoder's task)."""

    def __init__(self, batch=32):
        self.d = Digits("flat", batch)

    def __call__(self, g):
        x, _ = self.d(g)
        return x, x


class Spiral:
    """Two interleaved 2-D spirals, a little noise: a small, hard classification."""

    def __init__(self, batch=64):
        self.batch = batch

    def __call__(self, g):
        t = torch.rand(self.batch, generator=g) * 3 * math.pi + 0.5
        y = torch.randint(0, 2, (self.batch,), generator=g)
        sign = 1.0 - 2.0 * y.float()
        x = torch.stack([t * torch.cos(t) * sign, t * torch.sin(t) * sign], 1) / 5
        return x + 0.05 * torch.randn(x.shape, generator=g), y


class Sine:
    """Forecast the next value of a noisy sine wave of random phase and frequency from 24 values."""

    def __init__(self, length=24, batch=32):
        self.length, self.batch = length, batch

    def __call__(self, g):
        f = 0.1 + 0.3 * torch.rand(self.batch, 1, generator=g)
        ph = 2 * math.pi * torch.rand(self.batch, 1, generator=g)
        t = torch.arange(self.length + 1).float()
        s = torch.sin(f * t + ph) + 0.05 * torch.randn(self.batch, self.length + 1, generator=g)
        return s[:, :-1, None], s[:, -1:]


class SeqRegressor(nn.Module):
    def __init__(self, cell, inp, hidden):
        super().__init__()
        self.rnn = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell](inp, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class ResCNN(nn.Module):
    """Two residual blocks of conv-BN-ReLU on 8x8 digits."""

    def __init__(self, w=16):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.convs = nn.ModuleList(nn.Conv2d(w, w, 3, padding=1, bias=False) for _ in range(4))
        self.bns = nn.ModuleList(nn.BatchNorm2d(w) for _ in range(4))
        self.fc = nn.Linear(w, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        for k in (0, 2):
            h = F.relu(self.bns[k](self.convs[k](x)))
            x = F.relu(x + self.bns[k + 1](self.convs[k + 1](h)))
        return self.fc(x.mean((2, 3)))


class ResMLP(nn.Module):
    """Pre-LayerNorm residual MLP blocks with GELU."""

    def __init__(self, inp=64, d=64, n=4, out=10):
        super().__init__()
        self.inp = nn.Linear(inp, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(),
                                                  nn.Linear(2 * d, d)) for _ in range(n))
        self.out = nn.Linear(d, out)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = x + b(x)
        return self.out(x)


class Conv1dNet(nn.Module):
    """Digit rows as an 8-channel signal of length 8 (1-D convolutions over the rows)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(8, 32, 3, padding=1), nn.Conv1d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x.transpose(1, 2)))))
        return self.fc(x.amax(2))


def autoencoder():
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 32),
                         nn.Tanh(), nn.Linear(32, 64))


def spiral_mlp():
    return mlp([2, 64, 64, 64, 2])


def nesterov(lr, wd=5e-4):
    return lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)


def opt_of(cls, **kw):
    return lambda p: cls(p, **kw)


def one_cycle(steps, peak, warm=0.3):
    """lr multipliers: cosine up to ``peak`` over the first ``warm`` of the steps, then down to ~0."""
    w = int(steps * warm)
    return {i: (1 + (peak - 1) * 0.5 * (1 - math.cos(math.pi * i / w)) if i < w else
                peak * 0.5 * (1 + math.cos(math.pi * (i - w) / (steps - w)))) for i in range(steps)}


def smooth_ce(out, y):
    return F.cross_entropy(out, y, label_smoothing=0.1)


def configs2() -> list[Config]:
    dseq, dflat, dimg = (lambda: Digits("seq")), (lambda: Digits("flat")), (lambda: Digits("img"))
    add, rec, spi, sine = (lambda: Adding()), (lambda: Reconstruct()), (lambda: Spiral()), (lambda: Sine())
    lstm_add = lambda: SeqRegressor("lstm", 2, 32)  # noqa: E731
    rnn_add = lambda: SeqRegressor("rnn", 2, 32)  # noqa: E731
    gru_sine = lambda: SeqRegressor("gru", 1, 32)  # noqa: E731
    c = [
        Config("y_add", "lstm_adam_long", lstm_add, add, adam(3e-3), 2000, F.mse_loss),
        Config("y_add", "rnn_sgd_lr0.5", rnn_add, add, sgd(0.5, 0.9), 300, F.mse_loss),
        Config("y_add", "lstm_sgd_lr20", lstm_add, add, sgd(20.0, 0.9), 300, F.mse_loss),
        Config("y_ae", "adam_long", autoencoder, rec, adam(2e-3), 2000, F.mse_loss),
        Config("y_ae", "sgd_lr30", autoencoder, rec, sgd(30.0, 0.9), 300, F.mse_loss),
        Config("y_spiral", "adam_long", spiral_mlp, spi, adam(3e-3), 2500),
        Config("y_spiral", "adam_lr0.5", spiral_mlp, spi, adam(0.5), 300),
        Config("y_sine", "gru_adam_long", gru_sine, sine, adam(3e-3), 2000, F.mse_loss),
        Config("y_sine", "gru_ramp_1.03", gru_sine, sine, adam(3e-3), 500, F.mse_loss, ramp=(200, 1.03)),
        Config("y_res", "nesterov_long", ResCNN, dimg, nesterov(0.05), 1500),
        Config("y_res", "nesterov_lr5", ResCNN, dimg, nesterov(5.0), 300),
        Config("y_resmlp", "adamw_long", ResMLP, dflat, adamw(1e-3), 2000, smooth_ce),
        Config("y_resmlp", "sgd_lr2", ResMLP, dflat, sgd(2.0, 0.9), 300, smooth_ce),
        Config("y_conv1d", "adagrad_long", Conv1dNet, dseq, opt_of(torch.optim.Adagrad, lr=0.02), 2000),
        Config("y_conv1d", "nadam", Conv1dNet, dseq, opt_of(torch.optim.NAdam, lr=2e-3), 600),
        Config("y_lm", "radam_one_cycle", lambda: TinyLM(True), lambda: Markov(), opt_of(torch.optim.RAdam, lr=1e-3),
               1200, lm_loss, lr_at=one_cycle(1200, 5.0)),
        Config("y_lm", "one_cycle_peak50", lambda: TinyLM(False), lambda: Markov(), adamw(1e-3), 400, lm_loss,
               lr_at=one_cycle(400, 50.0)),
        Config("y_bf16", "rescnn_adam", ResCNN, dimg, adam(1e-3), 800, bf16=True),
        Config("y_bf16", "ae_sgd_lr30", autoencoder, rec, sgd(30.0, 0.9), 300, F.mse_loss, bf16=True),
    ]
    faults = [
        ("y_res", ResCNN, dimg, nesterov(0.05), F.cross_entropy, "convs.2", "corrupt_weight", 173),
        ("y_ae", autoencoder, rec, adam(2e-3), F.mse_loss, "4", "nan_grad", 190),
        ("y_conv1d", Conv1dNet, dseq, opt_of(torch.optim.NAdam, lr=2e-3), F.cross_entropy, "c2", "inf_forward", 205),
        ("y_sine", gru_sine, sine, adam(3e-3), F.mse_loss, "rnn", "corrupt_batch", 160),
        ("y_spiral", spiral_mlp, spi, adam(3e-3), F.cross_entropy, None, "lr_spike", 215),
        ("y_resmlp", ResMLP, dflat, adamw(1e-3), smooth_ce, "blocks.1.3", "corrupt_weight", 150),
    ]
    return c + fault_runs(faults)


# ----------------------------------------------------------------------------- the third set
# Written (2026-12-01) before any of its runs was replayed: gradguard's own tasks, the ones a user
# reaches first -- Pascanu, Mikolov & Bengio's (2013) long-sequence problems (the paper's setup: a
# 50-unit tanh RNN, SGD lr 0.01, batches of 20), Le et al.'s (2015) IRNN, and the deep tanh and
# sigmoid MLPs of gradguard.tools.tasks.deep (He/Xavier-style init at gains that explode or vanish).
class PascanuData:
    """Batches of one of gradguard's Pascanu tasks at a fixed length."""

    def __init__(self, name, length=50, batch=20):
        from gradguard.tools.tasks.pascanu import get_task
        self.task, self.length, self.batch = get_task(name), length, batch

    def __call__(self, g):
        return self.task.sample(self.batch, self.length, g)


class DeepRegression:
    """The deep MLPs' regression task (y = the sum of x's first 4 features), fresh batches."""

    def __init__(self, batch=64):
        self.batch = batch

    def __call__(self, g):
        x = torch.randn(self.batch, 16, generator=g)
        return x, x[:, :4].sum(1, keepdim=True)


def pascanu_rnn(cell, inp, out, hidden=50):
    from gradguard.tools.tasks.digits import SequenceClassifier
    return SequenceClassifier(inp, hidden, out, cell)


def deep(depth, act, gain):
    from gradguard.tools.tasks.deep import deep_mlp
    return deep_mlp(depth, 64, act, gain, generator=torch.Generator().manual_seed(torch.initial_seed()))


def configs3() -> list[Config]:
    add, mul, tord = (lambda: PascanuData("addition")), (lambda: PascanuData("multiplication")), \
        (lambda: PascanuData("temporal_order"))
    add100 = lambda: PascanuData("addition", 100)  # noqa: E731
    reg = lambda: DeepRegression()  # noqa: E731
    mse = F.mse_loss
    c = [
        Config("z_add", "rnn_paper_sgd0.01", lambda: pascanu_rnn("rnn", 2, 1), add, sgd(0.01), 1500, mse),
        Config("z_add", "rnn_sgd_lr0.5", lambda: pascanu_rnn("rnn", 2, 1), add, sgd(0.5), 400, mse),
        Config("z_add", "lstm_adam", lambda: pascanu_rnn("lstm", 2, 1), add, adam(3e-3), 1500, mse),
        Config("z_add", "irnn_len100_adam", lambda: pascanu_rnn("irnn", 2, 1), add100, adam(1e-3), 1200, mse),
        Config("z_add", "irnn_len100_sgd0.1", lambda: pascanu_rnn("irnn", 2, 1), add100, sgd(0.1), 400, mse),
        Config("z_mul", "gru_adam_long", lambda: pascanu_rnn("gru", 2, 1), mul, adam(3e-3), 2000, mse),
        Config("z_order", "lstm_adam_long", lambda: pascanu_rnn("lstm", 6, 4), tord, adam(3e-3), 2000),
        Config("z_order", "rnn_sgdm_lr0.3", lambda: pascanu_rnn("rnn", 6, 4), tord, sgd(0.3, 0.9), 400),
        Config("z_deep", "relu_he_adam_long", lambda: deep(4, "relu", math.sqrt(2.0)), reg, adam(1e-3), 2000, mse),
        Config("z_deep", "relu_he_sgd_lr0.1", lambda: deep(4, "relu", math.sqrt(2.0)), reg, sgd(0.1, 0.9), 300, mse),
        Config("z_deep", "tanh_gain3_sgd", lambda: deep(24, "tanh", 3.0), reg, sgd(0.01), 400, mse),
        Config("z_deep", "tanh_gain1_adam_long", lambda: deep(12, "tanh", 1.0), reg, adam(1e-3), 2000, mse),
        Config("z_deep", "sigmoid_gain0.5_sgd", lambda: deep(24, "sigmoid", 0.5), reg, sgd(0.1), 600, mse),
        Config("z_deep", "relu_he_sgd_ramp_1.03", lambda: deep(6, "relu", math.sqrt(2.0)), reg, sgd(0.01, 0.9), 500,
               mse, ramp=(150, 1.03)),
    ]
    faults = [
        ("z_order", lambda: pascanu_rnn("lstm", 6, 4), tord, adam(3e-3), F.cross_entropy, "head", "nan_grad", 177),
        ("z_deep", lambda: deep(4, "relu", math.sqrt(2.0)), reg, adam(1e-3), mse, "4", "corrupt_weight", 187),
        ("z_add", lambda: pascanu_rnn("lstm", 2, 1), add, adam(3e-3), mse, "rnn", "inf_forward", 163),
        ("z_deep", lambda: deep(6, "tanh", 1.0), reg, adam(1e-3), mse, "0", "corrupt_batch", 170),
    ]
    return c + fault_runs(faults)


# ----------------------------------------------------------------------------- the fourth set
# Written (2026-12-01) before any of its runs was replayed: long healthy runs (5,000 steps) under
# the schedules people use -- warm restarts (SGDR, Loshchilov & Hutter 2017), step decay with
# weight decay, linear warm-up and decay, warm-up + cosine -- where the loss rises at every
# restart or the gradients change scale with the learning rate; and two diverging ones.
def sgdr(steps, period, low=0.01):
    """Cosine from 1 to ``low`` over each ``period`` steps, then back to 1 (a warm restart)."""
    return {i: low + (1 - low) * 0.5 * (1 + math.cos(math.pi * (i % period) / period)) for i in range(steps)}


def step_decay(at, factor=0.1):
    return {a: factor ** (k + 1) for k, a in enumerate(at)}


def linear_warm_decay(steps, warm):
    return {i: (i + 1) / warm if i < warm else max(1.0 - (i - warm) / (steps - warm), 0.01) for i in range(steps)}


def configs4() -> list[Config]:
    dseq, dflat, dimg = (lambda: Digits("seq")), (lambda: Digits("flat")), (lambda: Digits("img"))
    m3 = lambda: mlp([64, 64, 64, 10])  # noqa: E731
    n = 5000
    return [
        Config("w_sgdr", "mlp_sgdm", m3, dflat, sgd(0.1, 0.9), n, lr_at=sgdr(n, 500)),
        Config("w_sgdr", "cnn_sgdm", CNN, dimg, sgd(0.1, 0.9), n, lr_at=sgdr(n, 1000)),
        Config("w_step", "cnn_sgdm_wd", CNN, dimg, nesterov(0.1, 5e-4), n, lr_at=step_decay((2000, 4000))),
        Config("w_step", "resmlp_adamw_smooth", ResMLP, lambda: Digits("flat", batch=8), adamw(1e-3), n,
               smooth_ce, lr_at=step_decay((2500,))),
        Config("w_lin", "lstm_adam", lambda: seq_model("lstm"), dseq, adam(3e-3), n, lr_at=linear_warm_decay(n, 200)),
        Config("w_lin", "gru_sine_adam", lambda: SeqRegressor("gru", 1, 32), lambda: Sine(), adam(3e-3), n, F.mse_loss,
               lr_at=linear_warm_decay(n, 200)),
        Config("w_cos", "lm_preln_adamw", lambda: TinyLM(True), lambda: Markov(), adamw(3e-3), n, lm_loss,
               lr_at=warmup_cosine(n, 200)),
        Config("w_cos", "reg_adam_wd", lambda: mlp([16, 64, 64, 1]), lambda: HeavyTailed(), adamw(1e-3), n,
               F.mse_loss, lr_at=warmup_cosine(n, 200)),
        Config("w_cos", "ae_nesterov", autoencoder, lambda: Reconstruct(), nesterov(0.05, 0.0), n, F.mse_loss,
               lr_at=warmup_cosine(n, 200)),
        # a restart too far: the restarts' peak lr grows x2 each time (the run diverges)
        Config("w_sgdr", "mlp_restart_grows", m3, dflat, sgd(0.1, 0.9), 2500,
               lr_at={i: 2.0 ** (i // 500) * v for i, v in sgdr(2500, 500).items()}),
        Config("w_step", "cnn_no_decay_lr_up", CNN, dimg, sgd(0.1, 0.9), 2500, lr_at={1000: 30.0}),
    ]


# ----------------------------------------------------------------------------- the fifth set
# Written (2026-12-01) before any of its runs was replayed: float16 autocast with a GradScaler
# (torch.amp.GradScaler("cpu"), the guard told of it: Guard(scaler=...)), the classic mixed
# precision whose first steps overflow while the scaler calibrates.  (No LSTM: oneDNN has no
# float16 LSTM on CPU.)
def configs5() -> list[Config]:
    dflat, dimg = (lambda: Digits("flat")), (lambda: Digits("img"))
    lm = lambda: Markov()  # noqa: E731
    m3 = lambda: mlp([64, 64, 64, 10])  # noqa: E731
    c = [
        Config("v_fp16", "mlp_adam_long", m3, dflat, adam(1e-3), 2000, fp16=True),
        Config("v_fp16", "ae_adam_long", autoencoder, lambda: Reconstruct(), adam(2e-3), 2000, F.mse_loss, fp16=True),
        Config("v_fp16", "lm_preln_adamw_long", lambda: TinyLM(True), lm, adamw(3e-3), 2000, lm_loss, fp16=True),
        Config("v_fp16", "cnn_sgdm_long", CNN, dimg, sgd(0.05, 0.9), 1500, fp16=True),
        Config("v_fp16", "resmlp_adamw_long", ResMLP, dflat, adamw(1e-3), 1500, smooth_ce, fp16=True),
        Config("v_fp16", "mlp_sgdm_lr1.5", m3, dflat, sgd(1.5, 0.9), 300, fp16=True),
        Config("v_fp16", "lm_sgd_lr3", lambda: TinyLM(False), lm, sgd(3.0, 0.9), 300, lm_loss, fp16=True),
        Config("v_fp16", "mlp_ramp_1.04", m3, dflat, sgd(0.02, 0.9), 500, ramp=(200, 1.04), fp16=True),
        Config("v_fp16", "resmlp_sgd_lr2", ResMLP, dflat, sgd(2.0, 0.9), 300, smooth_ce, fp16=True),
    ]
    faults = [
        ("v_fp16", m3, dflat, adam(1e-3), F.cross_entropy, "2", "nan_grad", 173),
        ("v_fp16", lambda: TinyLM(True), lm, adamw(3e-3), lm_loss, "blocks.1.ff.2", "corrupt_weight", 187),
    ]
    return c + fault_runs(faults, fp16=True)


# ----------------------------------------------------------------------------- the sixth set
# Written (2026-12-01) before any of its runs was replayed, after RunningStatsDetector's defaults
# were fixed: BatchNorm networks other than the corpus's CNN -- an MLP with BatchNorm1d, running
# statistics kept with momentum 0.01 and as a cumulative average (momentum=None), a VGG-style
# stack in one Sequential, a residual CNN whose blocks are Sequentials -- healthy, diverging, and
# with a batch x1000, an Inf out of a conv and a conv weight x30 at steps off the measuring grid.
class BNNet(nn.Module):
    """conv-BN-ReLU x2 and a linear head; ``momentum`` of the BatchNorms (None: cumulative)."""

    def __init__(self, momentum=0.1):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=momentum)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=momentum)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        return self.fc(F.relu(self.b2(self.c2(x))).mean((2, 3)))


def bn_mlp():
    return nn.Sequential(nn.Linear(64, 96), nn.BatchNorm1d(96), nn.ReLU(), nn.Linear(96, 96),
                         nn.BatchNorm1d(96), nn.ReLU(), nn.Linear(96, 10))


def vgg():
    layers, c = [], 1
    for w in (8, 8, 16, 16):
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


class SeqResCNN(nn.Module):
    """A stem and two residual blocks, each block one Sequential(conv, BN, ReLU, conv, BN)."""

    def __init__(self, w=12):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                          nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)) for _ in range(2))
        self.fc = nn.Linear(w, 10)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = F.relu(x + b(x))
        return self.fc(x.mean((2, 3)))


def configs6() -> list[Config]:
    dflat, dimg = (lambda: Digits("flat")), (lambda: Digits("img"))
    n = 1500
    c = [
        Config("u_bnmlp", "sgdm_long", bn_mlp, dflat, sgd(0.05, 0.9), 2000),
        Config("u_bnmlp", "adam", bn_mlp, dflat, adam(1e-3), 600),
        Config("u_bnmlp", "sgd_lr30", bn_mlp, dflat, sgd(30.0, 0.9), 300),
        Config("u_mom", "cnn_m0.01_long", lambda: BNNet(0.01), dimg, sgd(0.05, 0.9), n),
        Config("u_cum", "cnn_cumulative_long", lambda: BNNet(None), dimg, sgd(0.05, 0.9), n),
        Config("u_vgg", "sgdm_cosine_long", vgg, dimg, sgd(0.1, 0.9), n, lr_at=warmup_cosine(n, 100)),
        Config("u_vgg", "adamw", vgg, dimg, adamw(2e-3), 600),
        Config("u_vgg", "sgd_lr40", vgg, dimg, sgd(40.0, 0.9), 300),
        Config("u_res", "nesterov_long", SeqResCNN, dimg, nesterov(0.05), n),
        Config("u_res", "adam_lr_ramp", SeqResCNN, dimg, adam(1e-3), 500, ramp=(200, 1.05)),
        Config("u_bf16", "vgg_adam", vgg, dimg, adam(2e-3), 800, bf16=True),
    ]
    faults = [
        ("u_bnmlp", bn_mlp, dflat, sgd(0.05, 0.9), F.cross_entropy, "0", "corrupt_batch", 177),
        ("u_cum", lambda: BNNet(None), dimg, sgd(0.05, 0.9), F.cross_entropy, "c1", "corrupt_batch", 203),
        ("u_mom", lambda: BNNet(0.01), dimg, sgd(0.05, 0.9), F.cross_entropy, "c1", "corrupt_batch", 158),
        ("u_vgg", vgg, dimg, sgd(0.1, 0.9), F.cross_entropy, "0", "corrupt_batch", 191),
        ("u_vgg", vgg, dimg, sgd(0.1, 0.9), F.cross_entropy, "6", "inf_forward", 164),
        ("u_res", SeqResCNN, dimg, nesterov(0.05), F.cross_entropy, "blocks.1.0", "corrupt_weight", 219),
        ("u_res", SeqResCNN, dimg, nesterov(0.05), F.cross_entropy, "stem.0", "corrupt_batch", 233),
    ]
    return c + fault_runs(faults)


# ----------------------------------------------------------------------------- the seventh set
# Written (2026-12-02) before any of its runs was replayed, with the detectors as they are at
# commit time: choices of ordinary training scripts that no other set has -- batches of 1 and 2,
# LayerNorm MLPs, a CNN without normalisation (Adamax, plain SGD), a GRU language model, Huber
# regression with Adadelta, multi-label BCE, sigmoid MLPs, a triangular cyclic learning rate and
# a fine-tuning lr raised x10 half-way -- healthy, diverging, and with faults at steps 160-230.
def ln_mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 128),
                         nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 10))


class PlainCNN(nn.Module):
    """conv-ReLU-conv-ReLU-maxpool-linear, no normalisation."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 16, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2)
        return self.fc(x.flatten(1))


class GRULM(nn.Module):
    def __init__(self, vocab=16, d=32):
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(vocab, d), nn.GRU(d, 64, batch_first=True), nn.Linear(64, vocab)

    def forward(self, tok):
        return self.head(self.rnn(self.emb(tok))[0])


def huber(out, y):
    return F.huber_loss(out, y, delta=1.0)


def multilabel(out, y):
    return F.binary_cross_entropy_with_logits(out, F.one_hot(y, 10).float())


def adamax(lr):
    return lambda p: torch.optim.Adamax(p, lr=lr)


def adadelta(lr):
    return lambda p: torch.optim.Adadelta(p, lr=lr)


def triangular(steps, period, low=0.1):
    """lr multipliers: a triangle between ``low`` and 1 every ``period`` steps (Smith 2017)."""
    return {i: low + (1 - low) * (1 - abs(2 * (i % period) / period - 1)) for i in range(steps)}


def configs7() -> list[Config]:
    dflat, dimg = (lambda: Digits("flat")), (lambda: Digits("img"))
    lm, reg = (lambda: Markov()), (lambda: HeavyTailed())
    b1, b2 = (lambda: Digits("flat", batch=1)), (lambda: Digits("flat", batch=2))
    m2 = lambda: mlp([64, 128, 10])  # noqa: E731
    sig = lambda: mlp([64, 64, 64, 10], nn.Sigmoid)  # noqa: E731
    hmlp = lambda: mlp([16, 64, 64, 1])  # noqa: E731
    c = [
        Config("w_batch", "b1_sgd_long", m2, b1, sgd(0.01), 3000),
        Config("w_batch", "b2_adam_long", m2, b2, adam(1e-3), 3000),
        Config("w_batch", "b2_sgdm_lr1", m2, b2, sgd(1.0, 0.9), 300),
        Config("w_ln", "adamw_long", ln_mlp, dflat, adamw(3e-3), 1500),
        Config("w_ln", "adam_lr0.3", ln_mlp, dflat, adam(0.3), 300),
        Config("w_ln", "sgdm_ramp_1.05", ln_mlp, dflat, sgd(0.05, 0.9), 500, ramp=(200, 1.05)),
        Config("w_cnn", "adamax_long", PlainCNN, dimg, adamax(2e-3), 1500),
        Config("w_cnn", "sgd_lr0.5", PlainCNN, dimg, sgd(0.5), 1000),
        Config("w_cnn", "sgdm_lr3", PlainCNN, dimg, sgd(3.0, 0.9), 300),
        Config("w_gru_lm", "adam_long", GRULM, lm, adam(3e-3), 1500, lm_loss),
        Config("w_gru_lm", "sgd_lr50", GRULM, lm, sgd(50.0), 300, lm_loss),
        Config("w_huber", "sgdm_long", hmlp, reg, sgd(0.01, 0.9), 2500, huber),
        Config("w_huber", "adadelta", hmlp, reg, adadelta(1.0), 1000, huber),
        Config("w_huber", "sgdm_lr2", hmlp, reg, sgd(2.0, 0.9), 300, huber),
        Config("w_multilabel", "adam_long", m2, dflat, adam(1e-3), 1500, multilabel),
        Config("w_multilabel", "sgdm_lr20", m2, dflat, sgd(20.0, 0.9), 300, multilabel),
        Config("w_sigmoid", "sgd_lr0.5_long", sig, dflat, sgd(0.5), 2000),
        Config("w_sigmoid", "sgdm_ramp_1.04", sig, dflat, sgd(0.1, 0.9), 600, ramp=(300, 1.04)),
        Config("w_sched", "cnn_triangular_long", CNN, dimg, sgd(0.1, 0.9), 2000, lr_at=triangular(2000, 400)),
        Config("w_sched", "finetune_lr_x10", m2, dflat, adam(1e-3), 2000, lr_at={1000: 10.0}),
    ]
    faults = [
        ("w_ln", ln_mlp, dflat, adamw(3e-3), F.cross_entropy, "3", "nan_grad", 169),
        ("w_ln", ln_mlp, dflat, adamw(3e-3), F.cross_entropy, "0", "corrupt_weight", 203),
        ("w_cnn", PlainCNN, dimg, adamax(2e-3), F.cross_entropy, "c2", "corrupt_weight", 211),
        ("w_cnn", PlainCNN, dimg, adamax(2e-3), F.cross_entropy, "c1", "corrupt_batch", 167),
        ("w_gru_lm", GRULM, lm, adam(3e-3), lm_loss, "emb", "inf_forward", 181),
        ("w_gru_lm", GRULM, lm, adam(3e-3), lm_loss, None, "lr_spike", 199),
        ("w_huber", hmlp, reg, sgd(0.01, 0.9), huber, "0", "corrupt_batch", 176),
        ("w_batch", m2, b2, adam(1e-3), F.cross_entropy, "2", "corrupt_weight", 227),
    ]
    return c + fault_runs(faults)


# ----------------------------------------------------------------------------- the eighth set
# Written (2026-12-02) before any of its runs was replayed, with the detectors of the commit that
# writes it: objectives and data that no other set has -- a variational autoencoder (ELBO),
# a contrastive InfoNCE loss on two noisy views, focal loss, mixup with soft targets, 30% of the
# labels wrong, regression targets in the hundreds (not standardised), a curriculum whose
# sequences grow during training, a summed (not averaged) loss, AdamW with weight decay 0.5 --
# healthy, diverging, and with faults at steps 160-240.
class VAE(nn.Module):
    """A small variational autoencoder on the digits (Kingma & Welling 2014): 64-128-(8, 8)-128-64."""

    def __init__(self, z=8):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 128), nn.ReLU())
        self.mu, self.logvar = nn.Linear(128, z), nn.Linear(128, z)
        self.dec = nn.Sequential(nn.Linear(z, 128), nn.ReLU(), nn.Linear(128, 64))

    def forward(self, x):
        h = self.enc(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.dec(z), mu, logvar


def vae_loss(out, x):
    """The negative ELBO per example: Bernoulli reconstruction (summed over pixels) + KL."""
    logits, mu, logvar = out
    rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)
    return rec + kl


class Views:
    """Two noisy views of each digit (Gaussian noise, 20% of pixels dropped), stacked: (2B, 64)."""

    def __init__(self, batch=32):
        self.d = Digits("flat", batch)

    def __call__(self, g):
        x, y = self.d(g)
        views = []
        for _ in range(2):
            keep = (torch.rand(x.shape, generator=g) > 0.2).float()
            views.append(x * keep + 0.1 * torch.randn(x.shape, generator=g))
        return torch.cat(views), y


def info_nce(out, y, tau=0.1):
    """InfoNCE (van den Oord et al. 2018; SimCLR's symmetric form): each view's pair among the batch."""
    z = F.normalize(out, dim=1)
    a, b = z.chunk(2)
    sim = a @ b.T / tau
    target = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target))


def focal(out, y, gamma=2.0):
    """Focal loss (Lin et al. 2017): cross-entropy down-weighted on well-classified examples."""
    logp = F.log_softmax(out, 1).gather(1, y[:, None])[:, 0]
    return (-(1 - logp.exp()).pow(gamma) * logp).mean()


class Mixup:
    """Mixup (Zhang et al. 2018) with a uniform mixing weight (alpha 1): mixed digits, soft targets."""

    def __init__(self, batch=32):
        self.d = Digits("flat", batch)

    def __call__(self, g):
        x, y = self.d(g)
        lam = float(torch.rand(1, generator=g))
        perm = torch.randperm(len(y), generator=g)
        t = F.one_hot(y, 10).float()
        return lam * x + (1 - lam) * x[perm], lam * t + (1 - lam) * t[perm]


def soft_ce(out, t):
    return -(t * F.log_softmax(out, 1)).sum(1).mean()


class NoisyLabels:
    """The digits with 30% of the training examples given a fixed wrong label."""

    def __init__(self, batch=32, frac=0.3, seed=99):
        self.d = Digits("flat", batch)
        g = torch.Generator().manual_seed(seed)
        n = len(self.d.y)
        flip = torch.rand(n, generator=g) < frac
        wrong = (self.d.y + torch.randint(1, 10, (n,), generator=g)) % 10
        self.y = torch.where(flip, wrong, self.d.y)

    def __call__(self, g):
        i = torch.randint(0, len(self.y), (self.d.batch,), generator=g)
        return self.d.x[i].reshape(len(i), 64), self.y[i]


class Unscaled:
    """Regression on targets in the hundreds, as raw prices or counts are: 300 <w, x> + 500 + noise."""

    def __init__(self, dim=16, batch=32, seed=11):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(dim, 1, generator=g) / math.sqrt(dim)
        self.dim, self.batch = dim, batch

    def __call__(self, g):
        x = torch.randn(self.batch, self.dim, generator=g)
        return x, 300.0 * (x @ self.w) + 500.0 + 30.0 * torch.randn(self.batch, 1, generator=g)


class GrowingAdding(Adding):
    """A curriculum: the adding problem's sequences grow from 10 to 60 steps, 1 every 30 batches."""

    def __init__(self, batch=32):
        super().__init__(10, batch)
        self.calls = 0

    def __call__(self, g):
        self.length = 10 + min(self.calls // 30, 50)
        self.calls += 1
        return super().__call__(g)


def sum_ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def configs8() -> list[Config]:
    dflat, rec = (lambda: Digits("flat")), (lambda: Reconstruct())
    views, mix, noisy = (lambda: Views()), (lambda: Mixup()), (lambda: NoisyLabels())
    unscaled, growing = (lambda: Unscaled()), (lambda: GrowingAdding())
    m2 = lambda: mlp([64, 128, 10])  # noqa: E731
    enc = lambda: mlp([64, 128, 32])  # noqa: E731
    umlp = lambda: mlp([16, 64, 64, 1])  # noqa: E731
    gru_add = lambda: SeqRegressor("gru", 2, 32)  # noqa: E731
    wd = opt_of(torch.optim.AdamW, lr=3e-3, weight_decay=0.5)
    c = [
        Config("v_vae", "adam_long", VAE, rec, adam(1e-3), 1500, vae_loss),
        Config("v_vae", "sgdm", VAE, rec, sgd(0.01, 0.9), 1000, vae_loss),
        Config("v_vae", "adam_lr0.05", VAE, rec, adam(0.05), 300, vae_loss),
        Config("v_nce", "adam_long", enc, views, adam(1e-3), 1500, info_nce),
        Config("v_nce", "sgdm_lr10", enc, views, sgd(10.0, 0.9), 300, info_nce),
        Config("v_focal", "adam_long", m2, dflat, adam(1e-3), 1500, focal),
        Config("v_focal", "sgdm_lr15", m2, dflat, sgd(15.0, 0.9), 300, focal),
        Config("v_mixup", "sgdm_long", m2, mix, sgd(0.05, 0.9), 2000, soft_ce),
        Config("v_noisy", "adam_long", m2, noisy, adam(1e-3), 2000),
        Config("v_unscaled", "adam_long", umlp, unscaled, adam(1e-2), 1500, F.mse_loss),
        Config("v_unscaled", "sgd_lr1e-5", umlp, unscaled, sgd(1e-5), 1500, F.mse_loss),
        Config("v_unscaled", "sgd_lr1e-3", umlp, unscaled, sgd(1e-3), 300, F.mse_loss),
        Config("v_curric", "gru_adam_long", gru_add, growing, adam(3e-3), 1500, F.mse_loss),
        Config("v_curric", "gru_sgdm_lr20", gru_add, growing, sgd(20.0, 0.9), 300, F.mse_loss),
        Config("v_sum", "sgd_long", m2, dflat, sgd(0.002), 1500, sum_ce),
        Config("v_sum", "sgd_lr0.1", m2, dflat, sgd(0.1), 300, sum_ce),
        Config("v_wd", "adamw_wd0.5_long", m2, dflat, wd, 2000),
    ]
    faults = [
        ("v_vae", VAE, rec, adam(1e-3), vae_loss, "dec.2", "nan_grad", 187),
        ("v_vae", VAE, rec, adam(1e-3), vae_loss, "enc.0", "corrupt_weight", 163),
        ("v_nce", enc, views, adam(1e-3), info_nce, "0", "corrupt_batch", 173),
        ("v_focal", m2, dflat, adam(1e-3), focal, "2", "corrupt_weight", 201),
        ("v_mixup", m2, mix, sgd(0.05, 0.9), soft_ce, None, "lr_spike", 209),
        ("v_unscaled", umlp, unscaled, adam(1e-2), F.mse_loss, "2", "inf_forward", 195),
        ("v_curric", gru_add, growing, adam(3e-3), F.mse_loss, "rnn", "nan_grad", 222),
        ("v_wd", m2, dflat, wd, F.cross_entropy, "0", "corrupt_weight", 238),
    ]
    return c + fault_runs(faults)


SETS = {"1": (configs, SEEDS, OUT), "2": (configs2, SEEDS2, OUT2), "3": (configs3, (6, 7), metrics.RESULTS / "blind3"),
        "4": (configs4, (8, 9), metrics.RESULTS / "blind4"), "5": (configs5, (10, 11), metrics.RESULTS / "blind5"),
        "6": (configs6, (12, 13), metrics.RESULTS / "blind6"), "7": (configs7, (14, 15), metrics.RESULTS / "blind7"),
        "8": (configs8, (16, 17), metrics.RESULTS / "blind8")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="train the runs again")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default=None, help="with --rebuild: only the runs whose id contains this")
    ap.add_argument("--set", default="1", choices=sorted(SETS), help="which set of runs (default 1)")
    args = ap.parse_args(argv)
    make, seeds, out = SETS[args.set]
    if args.rebuild or not any(out.glob("*.npz")):
        t = time.perf_counter()
        for r in C.build(args.jobs, args.only, make=make, seeds=seeds, out=out):
            print(r)
        print(f"trained in {time.perf_counter() - t:.0f} s")
    from gradguard.detect import default_detectors
    res = metrics.evaluate(metrics.load_runs(out), default_detectors, "blind", write=False)
    print(metrics.table(res["scores"], f"blind check, set {args.set} (seeds {seeds[0]}, {seeds[1]}; "
                        "configurations new to the detectors)"))
    for s in res["scores"]:
        if s["label"] == "healthy" and not s["fault"] and s["n_flags"]:
            print(f"- {s['id']}: healthy, flagged at step {s['first_flag']} ({s['first_kind']})")
        if s["fault"] and not s.get("fault_flag"):
            print(f"- {s['id']}: the {s['fault']} fault was not flagged (outcome: {s['label']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
