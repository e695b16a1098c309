"""The labelled corpus of realistic training runs for the detection benchmark.

Every run trains a small model on generated (or packaged) data, CPU only, with a fixed seed,
watched by ``gg.Guard(model, opt, clip=None, on_nonfinite="warn", detectors=[])``: nothing is
clipped or skipped, so a run is free to diverge.  The guard's rows are stored (one ``.npz``
per run under ``benchmarks/results/detection/runs/``) with what a detector is bound to (the
``RunInfo``) and the run's label; detectors are judged later by replaying the rows
(``metrics.py``), which gives the events a live guard would have given (detectors never change
the run, and any chunking of the rows gives the same events: tests/test_detect.py).

Labels come from the outcome only (``label_run``, written before any detector output was read):

- ``diverging``: the loss turns non-finite, or stays above ``K_RANGE`` x the first loss (the
  early range; later early losses may already be part of a blow-up) for ``PERSIST`` consecutive
  steps.  The divergence step (the loss
  "leaves its early range") is the first non-finite loss or the first step of that stretch.
- ``vanishing``: not diverging, and the first weight matrix moved less than 1e-3 of its norm
  while the last one moved more than 100x as much (the early layers learned nothing).
- ``healthy``: not diverging, and the median of the last 10% of losses is below 0.6 x the
  median of the first ``EARLY`` losses (it converged; 0.6 because a language model's loss
  cannot fall below the data's entropy).
- ``other``: none of these (kept, reported, never scored).
- injected faults carry ``fault`` (kind), ``culprit`` (parameter name, or None where no single
  layer is to blame) and ``onset`` (the first step whose row can show it), whatever the outcome.

Seeds: every configuration runs with seed 0 (the tuning half) and seed 1 (held out).
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EARLY = 5        # early losses (the convergence reference)
K_RANGE = 3.0    # the loss leaves its early range above K_RANGE x the first loss
PERSIST = 5      # ... for this many consecutive steps (a single bad batch is not a divergence)
SEEDS = (0, 1)   # 0: tuning half, 1: held out

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "detection" / "runs"


# ----------------------------------------------------------------------------- data
def _digits():
    from gradguard.tools.tasks.digits import load_digits
    return load_digits("train")  # (N, 8, 8) in [0, 1], labels 0..9


class Digits:
    """Minibatches of the packaged 8x8 digits: ``shape`` 'seq' (8 rows of 8), 'flat' or 'img'."""

    def __init__(self, shape, batch=32):
        self.x, self.y = _digits()
        self.shape, self.batch = shape, batch

    def __call__(self, g):
        i = torch.randint(0, len(self.y), (self.batch,), generator=g)
        x = self.x[i]
        x = {"seq": x, "flat": x.reshape(len(i), 64), "img": x[:, None]}[self.shape]
        return x, self.y[i]


class Markov:
    """Token sequences from a fixed random order-1 Markov chain (a learnable LM task)."""

    def __init__(self, vocab=16, length=16, batch=16, seed=123):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(vocab, vocab, generator=g) * 2.5
        self.p = torch.softmax(logits, 1)
        self.vocab, self.length, self.batch = vocab, length, batch

    def __call__(self, g):
        tok = torch.empty(self.batch, self.length + 1, dtype=torch.long)
        tok[:, 0] = torch.randint(0, self.vocab, (self.batch,), generator=g)
        for t in range(self.length):
            tok[:, t + 1] = torch.multinomial(self.p[tok[:, t]], 1, generator=g)[:, 0]
        return tok[:, :-1], tok[:, 1:]


class HeavyTailed:
    """y = <w, x> + Student-t noise (df 2.5: finite mean, heavy tails)."""

    def __init__(self, dim=16, batch=32, df=2.5, seed=7):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(dim, 1, generator=g)
        self.dim, self.batch, self.df = dim, batch, df

    def __call__(self, g):
        x = torch.randn(self.batch, self.dim, generator=g)
        z = torch.randn(self.batch, 1, generator=g)
        chi = torch.randn(self.batch, 5, generator=g).pow(2).sum(1, keepdim=True)  # chi2(5)
        noise = z / torch.sqrt(chi / 5) * 0.5  # t(5)-like, then squared tails via a rare scale
        rare = (torch.rand(self.batch, 1, generator=g) < 0.01).float() * 20.0
        return x, x @ self.w + noise * (1 + rare)


# ----------------------------------------------------------------------------- models
def seq_model(cell, hidden=32, init_scale=1.0):
    from gradguard.tools.tasks.digits import SequenceClassifier
    return SequenceClassifier(8, hidden, 10, cell, init_scale)


def mlp(widths, act=nn.ReLU):
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class Block(nn.Module):
    def __init__(self, d, pre):
        super().__init__()
        self.pre = pre
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        if self.pre:
            h = self.ln1(x)
            x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
            return x + self.ff(self.ln2(x))
        x = self.ln1(x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0])
        return self.ln2(x + self.ff(x))


class TinyLM(nn.Module):
    def __init__(self, pre, vocab=16, d=32, n=2, length=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, pre) for _ in range(n))
        self.norm = nn.LayerNorm(d) if pre else nn.Identity()
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.triu(torch.full((length, length), float("-inf")), 1))

    def forward(self, tok):
        x = self.emb(tok) + self.pos[: tok.shape[1]]
        for b in self.blocks:
            x = b(x, self.mask)
        return self.head(self.norm(x))


def lm_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


# ----------------------------------------------------------------------------- configurations
@dataclass
class Config:
    family: str
    name: str
    build: object          # () -> nn.Module
    data: object           # () -> callable(generator) -> (x, y)
    opt: object            # (params) -> optimizer
    steps: int
    loss: object = F.cross_entropy
    lr_at: dict = field(default_factory=dict)  # step -> lr multiplier from then on (schedule change)
    ramp: tuple | None = None   # (from step, factor per step): an lr schedule that keeps growing
    fault: dict | None = None   # kind, layer (module path), step
    bf16: bool = False
    fp16: bool = False  # float16 autocast with a GradScaler, the guard told of it (scaler=)


def sgd(lr, m=0.0):
    return lambda p: torch.optim.SGD(p, lr=lr, momentum=m)


def adam(lr):
    return lambda p: torch.optim.Adam(p, lr=lr)


def adamw(lr):
    return lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.01)


def configs() -> list[Config]:
    dseq, dflat, dimg = (lambda: Digits("seq")), (lambda: Digits("flat")), (lambda: Digits("img"))
    lm, reg = (lambda: Markov()), (lambda: HeavyTailed())
    m3 = lambda: mlp([64, 64, 64, 10])  # noqa: E731
    c = [
        # tanh RNN on digit rows (the demo's model: SGD at lr 1.0 explodes)
        Config("rnn_tanh", "healthy_long", lambda: seq_model("rnn"), dseq, sgd(0.05, 0.9), 2000),
        Config("rnn_tanh", "healthy", lambda: seq_model("rnn"), dseq, adam(3e-3), 400),
        Config("rnn_tanh", "demo_lr1", lambda: seq_model("rnn", 64), dseq, sgd(1.0), 300),
        Config("rnn_tanh", "lr0.6", lambda: seq_model("rnn", 64), dseq, sgd(0.6), 300),
        Config("rnn_tanh", "radius2.5", lambda: seq_model("rnn", 32, 2.5), dseq, sgd(0.3), 300),
        # LSTM / GRU
        Config("lstm_gru", "lstm_adam_long", lambda: seq_model("lstm"), dseq, adam(3e-3), 2000),
        Config("lstm_gru", "gru_adam_long", lambda: seq_model("gru"), dseq, adam(3e-3), 2000),
        Config("lstm_gru", "lstm_sgd_lr30", lambda: seq_model("lstm"), dseq, sgd(30.0), 300),
        # ReLU MLP
        Config("mlp_relu", "sgdm_long", m3, dflat, sgd(0.05, 0.9), 2500),
        Config("mlp_relu", "adam_long", m3, dflat, adam(1e-3), 2000),
        Config("mlp_relu", "sgdm_lr1.5", m3, dflat, sgd(1.5, 0.9), 300),
        Config("mlp_relu", "sgdm_ramp_1.05", m3, dflat, sgd(0.05, 0.9), 400, ramp=(100, 1.05)),
        Config("mlp_relu", "deep_sigmoid", lambda: mlp([64] + [32] * 10 + [10], nn.Sigmoid), dflat,
               sgd(0.1), 400),
        # CNN with BatchNorm
        Config("cnn_bn", "sgdm_long", CNN, dimg, sgd(0.05, 0.9), 2000),
        Config("cnn_bn", "adam", CNN, dimg, adam(3e-3), 400),
        Config("cnn_bn", "sgdm_lr20", CNN, dimg, sgd(20.0, 0.9), 300),
        # transformer LMs
        Config("lm_preln", "adamw_long", lambda: TinyLM(True), lm, adamw(3e-3), 2000, lm_loss),
        Config("lm_preln", "sgd_lr3", lambda: TinyLM(True), lm, sgd(3.0, 0.9), 300, lm_loss),
        Config("lm_postln", "adamw", lambda: TinyLM(False), lm, adamw(1e-3), 400, lm_loss),
        Config("lm_postln", "sgd_lr3", lambda: TinyLM(False), lm, sgd(3.0, 0.9), 300, lm_loss),
        # heavy-tailed regression: SGD near its stability limit grows slowly
        Config("regression_heavy", "sgd_long", lambda: mlp([16, 32, 1]), reg, sgd(0.01), 2000, F.mse_loss),
        Config("regression_heavy", "sgd", lambda: mlp([16, 32, 1]), reg, sgd(0.02, 0.5), 400, F.mse_loss),
        Config("regression_heavy", "sgd_lr0.12", lambda: mlp([16, 32, 1]), reg, sgd(0.12), 400, F.mse_loss),
        Config("regression_heavy", "sgd_lr0.2", lambda: mlp([16, 32, 1]), reg, sgd(0.2, 0.5), 400, F.mse_loss),
        # fine-tuning: a schedule change at step 300
        Config("finetune", "restart_x3", m3, dflat, sgd(0.02, 0.9), 2000, lr_at={300: 3.0}),
        Config("finetune", "restart_x60", m3, dflat, sgd(0.02, 0.9), 600, lr_at={300: 60.0}),
        Config("finetune", "ramp_1.03", m3, dflat, sgd(0.02, 0.9), 600, ramp=(300, 1.03)),
        Config("finetune", "lm_ramp_1.05", lambda: TinyLM(False), lm, adamw(1e-3), 400, lm_loss,
               ramp=(150, 1.05)),
        # mixed precision (bf16 autocast on CPU)
        Config("bf16", "adam_long", m3, dflat, adam(1e-3), 2000, bf16=True),
        Config("bf16", "sgdm_lr1.5", m3, dflat, sgd(1.5, 0.9), 300, bf16=True),
        Config("bf16", "ramp_1.04", m3, dflat, sgd(0.02, 0.9), 500, bf16=True, ramp=(200, 1.04)),
    ]
    # injected faults on healthy configurations: (family, base builder, data, opt, loss, layer, kind)
    faults = [
        ("mlp_relu", m3, dflat, sgd(0.05, 0.9), F.cross_entropy, "2", "nan_grad"),
        ("mlp_relu", m3, dflat, sgd(0.05, 0.9), F.cross_entropy, "0", "corrupt_weight"),
        ("mlp_relu", m3, dflat, sgd(0.05, 0.9), F.cross_entropy, None, "lr_spike"),
        ("rnn_tanh", lambda: seq_model("rnn"), dseq, adam(3e-3), F.cross_entropy, "head", "nan_grad"),
        ("lstm_gru", lambda: seq_model("lstm"), dseq, adam(3e-3), F.cross_entropy, "rnn", "inf_forward"),
        ("cnn_bn", CNN, dimg, sgd(0.05, 0.9), F.cross_entropy, "c2", "inf_forward"),
        ("cnn_bn", CNN, dimg, sgd(0.05, 0.9), F.cross_entropy, "c1", "corrupt_batch"),
        ("lm_preln", lambda: TinyLM(True), lm, adamw(3e-3), lm_loss, "blocks.1.ff.0", "nan_grad"),
        ("lm_postln", lambda: TinyLM(False), lm, adamw(1e-3), lm_loss, "blocks.0.ff.2", "corrupt_weight"),
        ("regression_heavy", lambda: mlp([16, 32, 1]), reg, sgd(0.01), F.mse_loss, "0", "corrupt_batch"),
    ]
    for fam, build, data, opt, loss, layer, kind in faults:
        c.append(Config(fam, f"fault_{kind}_{layer}", build, data, opt, 300, loss,
                        fault={"kind": kind, "layer": layer, "step": 150}))
    return c


# ----------------------------------------------------------------------------- one run
def _culprit_param(model, layer, kind):
    if layer is None:
        return None
    mod = model.get_submodule(layer)
    name = next(n for n, _ in mod.named_parameters())
    if isinstance(mod, nn.MultiheadAttention):
        name = "in_proj_weight"
    if kind == "inf_forward" and isinstance(mod, (nn.LSTM, nn.GRU, nn.RNN)):
        name = "weight_ih_l0"
    return f"{layer}.{name}"


def _forward_loss(cfg, model, x, y):
    if cfg.bf16 or cfg.fp16:
        with torch.autocast("cpu", dtype=torch.bfloat16 if cfg.bf16 else torch.float16):
            return cfg.loss(model(x).float(), y)
    return cfg.loss(model(x), y)


def run_one(cfg: Config, seed: int, out: Path = OUT) -> dict:
    import gradguard as gg
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    model = cfg.build()
    data = cfg.data()
    opt = cfg.opt(model.parameters())
    base_lr = [pg["lr"] for pg in opt.param_groups]
    # nonfinite_budget=None: a run that turns NaN is recorded to its end (its label needs it)
    scaler = torch.amp.GradScaler("cpu") if cfg.fp16 else None
    guard = gg.Guard(model, opt, clip=None, on_nonfinite="warn", detectors=[], flush_every=64,
                     nonfinite_budget=None, scaler=scaler)
    steps, rows = [], []
    guard.add_row_observer(lambda s, r: (steps.extend(s), rows.append(np.array(r, np.float32))))
    fault = dict(cfg.fault) if cfg.fault else None
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() >= 2}
    fstep = fault["step"] if fault else -1
    culprit = _culprit_param(model, fault["layer"], fault["kind"]) if fault else None
    handles = []
    if fault and fault["kind"] == "nan_grad":
        p = dict(model.named_parameters())[culprit]
        handles.append(p.register_hook(lambda gr: gr * math.nan if guard.steps == fstep else gr))
    if fault and fault["kind"] == "inf_forward":
        def hook(mod, inp, outp):
            if guard.steps != fstep:
                return None
            o = outp[0] if isinstance(outp, tuple) else outp
            o = o.clone(memory_format=torch.contiguous_format)
            o.view(-1)[-1] = math.inf  # the last element: the last time step of a sequence output
            return (o,) + tuple(outp[1:]) if isinstance(outp, tuple) else o
        handles.append(model.get_submodule(fault["layer"]).register_forward_hook(hook))
    mult = 1.0
    losses = []
    # the NaN producer, measured through the guard on the injected NaN/Inf faults: the guard
    # calls ``rerun`` on a poisoned step only, and its nonfinite event names the producer
    nan_fault = bool(fault and fault["kind"] in ("nan_grad", "inf_forward"))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(cfg.steps):
            mult = cfg.lr_at.get(i, mult)
            if cfg.ramp and i >= cfg.ramp[0]:
                mult *= cfg.ramp[1]
            spike = 100.0 if fault and fault["kind"] == "lr_spike" and i == fstep else 1.0
            for pg, lr in zip(opt.param_groups, base_lr):
                pg["lr"] = lr * mult * spike
            x, y = data(g)
            if fault and fault["kind"] == "corrupt_batch" and i == fstep:
                x = x * 1000.0 if x.dtype.is_floating_point else x
            if fault and fault["kind"] == "corrupt_weight" and i == fstep:
                with torch.no_grad():
                    dict(model.named_parameters())[culprit].mul_(30.0)
            opt.zero_grad(set_to_none=True)
            loss = _forward_loss(cfg, model, x, y)
            (scaler.scale(loss) if scaler else loss).backward()
            guard.step(loss, rerun=(lambda: _forward_loss(cfg, model, x, y)) if nan_fault else None)
            if scaler:
                scaler.update()
            losses.append(float(loss))
    guard.flush()
    first = next((e for e in guard.events if e.kind == "nonfinite"), None) if nan_fault else None
    producer = None if first is None else {"step": first.step, **first.data.get("origin", {})}
    for h in handles:
        h.remove()
    secs = time.perf_counter() - t0
    moved = {n: float((p.detach() - w0[n]).norm() / (w0[n].norm() + 1e-12))
             for n, p in model.named_parameters() if n in w0}
    label = label_run(np.array(losses), moved)
    run = guard.run
    meta = {
        "id": f"{cfg.family}.{cfg.name}.s{seed}", "family": cfg.family, "config": cfg.name, "seed": seed,
        "held_out": seed % 2 == 1, "steps": cfg.steps, "seconds": round(secs, 2), **label,
        "fault": fault["kind"] if fault else None, "culprit": culprit,
        # an lr spike scales step fstep's update: the row of fstep+1 is the first to show it
        "onset": (fstep + (fault["kind"] == "lr_spike")) if fault else None, "producer": producer,
        **({"amp": True} if cfg.fp16 else {}),  # the replay builds the scaler's overflow events
        "run": {"names": list(run.names), "shapes": [list(s) for s in run.shapes],
                "trainable": list(run.trainable), "owner": dict(run.owner),
                "module_types": sorted(run.module_types), "param_norm_every": run.param_norm_every,
                "init_layer_norms": run.init_layer_norms.tolist(),
                "buffers": list(run.buffers), "buffer_inputs": list(run.buffer_inputs)},
    }
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / f"{meta['id']}.npz", steps=np.asarray(steps, np.int64),
                        rows=np.concatenate(rows), meta=np.array(json.dumps(meta)))
    return meta


def label_run(losses: np.ndarray, moved: dict) -> dict:
    """The outcome label of a run from its losses and weight movement (see the module doc)."""
    n = len(losses)
    early = losses[:EARLY]
    ref = float(losses[0]) if math.isfinite(losses[0]) else math.inf
    bad = ~np.isfinite(losses)
    above = np.where(bad, True, losses > K_RANGE * ref)
    div = None
    first_bad = int(np.argmax(bad)) if bad.any() else None
    run = 0
    for t in range(n):
        run = run + 1 if above[t] else 0
        if run >= PERSIST:
            div = t - PERSIST + 1
            break
    if first_bad is not None and (div is None or first_bad < div):
        div = first_bad
    out = {"label": "other", "diverge_step": div, "range_top": K_RANGE * ref, "gradual": None}
    if div is not None:
        # gradual: more than 5 steps between the loss's last visit at or below its first
        # value and the divergence step
        inside = np.flatnonzero(np.isfinite(losses[:div]) & (losses[:div] <= ref))
        last_in = int(inside[-1]) if len(inside) else 0
        out.update(label="diverging", gradual=bool(div - last_in > 5), last_in_range=last_in)
        return out
    mats = [v for v in moved.values()]
    if len(mats) >= 2 and mats[0] < 1e-3 and mats[-1] > 100 * mats[0]:
        out["label"] = "vanishing"
    elif np.median(losses[-max(n // 10, 1):]) < 0.6 * np.median(early):
        out["label"] = "healthy"
    out["final_loss"] = float(np.median(losses[-max(n // 10, 1):]))
    return out


def _work(args):
    make, i, seed, out = args
    torch.set_num_threads(1)
    meta = run_one(make()[i], seed, out)
    return {k: meta[k] for k in ("id", "label", "diverge_step", "fault", "seconds")}


def build(jobs: int = 2, only: str | None = None, make=None, seeds=SEEDS, out: Path = OUT) -> list[dict]:
    """Train every run of ``make()`` (default: this corpus's ``configs``; a module-level
    function, so that worker processes can import it) for each seed, in ``jobs`` processes,
    and write its ``.npz`` under ``out``; ``only``: the runs whose id contains it."""
    make = make or configs
    todo = [(make, i, s, out) for i, c in enumerate(make()) for s in seeds
            if only is None or only in f"{c.family}.{c.name}"]
    if jobs > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(jobs) as pool:
            res = pool.map(_work, todo, chunksize=1)
    else:
        res = [_work(t) for t in todo]
    return res


if __name__ == "__main__":
    import sys
    t = time.perf_counter()
    for r in build(int(sys.argv[1]) if len(sys.argv) > 1 else 2, sys.argv[2] if len(sys.argv) > 2 else None):
        print(r, flush=True)
    print(f"corpus built in {time.perf_counter() - t:.0f} s")
