"""Adaptive clipping rescue: can a clipping policy save a run that diverges without one?

Three small runs that diverge (or nearly) without clipping, each trained with
no clipping, GlobalNorm(1.0) and every adaptive policy, over several seeds:

  irnn-adding  IRNN (ReLU RNN, identity recurrent init, Le et al. 2015) on the
               Pascanu adding problem (T=60), SGD at a high learning rate.
  tanh-mlp     a 12-layer tanh MLP with weights at 2x the Xavier scale (the
               chaotic, gradient-exploding regime) on a linear teacher, SGD.
  transformer  a 2-layer pre-LN transformer on a next-token copy task, Adam at
               a learning rate ~10x too high, no warm-up.

The policy is applied exactly as ``gg.Guard`` applies it (``clip_`` on the
step's ``GradStats``) but without the guard's NaN-step skip, so what is
measured is the clipping alone.  A run *diverges* when its training loss
becomes NaN/Inf (the run stops there); it *fails* when it diverges or its
final loss is no better than a trivial predictor (adding: 1/6; MLP: the
target variance; transformer: ln(vocab)).  The final loss is on a fixed
held-out batch; the median is over the runs that stayed finite.

Usage:  python benchmarks/rescue_adaptive.py [--seeds 5] [--write docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch
from torch import nn

import gradguard as gg
from gradguard.adaptive import AGC, AdaGC, AutoClip, ZClip
from gradguard.stats import compute_stats

SECTION = "## Adaptive clipping rescue (`benchmarks/rescue_adaptive.py`)"


# ---------------------------------------------------------------- data


def adding_batch(n: int, T: int, gen: torch.Generator):
    """Pascanu et al. 2013 adding problem: sum the two marked values.

    Channel 0: values in [0, 1]; channel 1: markers, one in the first 10% of
    the sequence and one in the second half.  Predicting 1 gives MSE ~0.167.
    """
    vals = torch.rand(n, T, generator=gen)
    first = torch.randint(0, max(1, T // 10), (n,), generator=gen)
    second = torch.randint(T // 2, T, (n,), generator=gen)
    marks = torch.zeros(n, T)
    marks[torch.arange(n), first] = 1.0
    marks[torch.arange(n), second] = 1.0
    x = torch.stack([vals, marks], dim=-1)
    y = (vals * marks).sum(1, keepdim=True)
    return x, y


class IRNN(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="relu", batch_first=True)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(torch.eye(hidden))
            self.rnn.bias_hh_l0.zero_()
            self.rnn.bias_ih_l0.zero_()
            self.rnn.weight_ih_l0.normal_(0, 0.1)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


# Learning rates chosen (on seeds 0-1) so that the unclipped run fails; ~10x
# what trains these models comfortably.
LR = {"irnn-adding": 0.1, "tanh-mlp": 0.2, "transformer": 0.1}
STEPS = {"irnn-adding": 250, "tanh-mlp": 250, "transformer": 200}


def make_irnn(gen):
    T = 40
    model = IRNN()
    opt = torch.optim.SGD(model.parameters(), lr=LR["irnn-adding"])

    def batch(train=True):
        return adding_batch(32 if train else 512, T, gen if train else torch.Generator().manual_seed(10_000))

    # trivial baseline: always predict 1 (the mean sum), MSE = 2 * Var(U[0,1]) = 1/6
    return model, opt, batch, nn.functional.mse_loss, STEPS["irnn-adding"], lambda y: 1.0 / 6.0


MLP_DEPTH, MLP_GAIN = 12, 2.0


class TanhMLP(nn.Module):
    def __init__(self, width=64, depth=MLP_DEPTH, gain=MLP_GAIN, d_in=16):
        super().__init__()
        layers, d = [], d_in
        for _ in range(depth):
            lin = nn.Linear(d, width)
            nn.init.xavier_normal_(lin.weight, gain=gain)
            nn.init.zeros_(lin.bias)
            layers += [lin, nn.Tanh()]
            d = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(self.body(x))


def make_mlp(gen):
    teacher = torch.randn(16, 1, generator=torch.Generator().manual_seed(1))
    model = TanhMLP()
    opt = torch.optim.SGD(model.parameters(), lr=LR["tanh-mlp"])

    def batch(train=True):
        g = gen if train else torch.Generator().manual_seed(10_001)
        x = torch.randn(128 if train else 1024, 16, generator=g)
        return x, x @ teacher / teacher.norm()

    # trivial baseline: predict the mean target
    return model, opt, batch, nn.functional.mse_loss, STEPS["tanh-mlp"], lambda y: float(y.var(unbiased=False))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=16, d=48, heads=4, layers=2, ctx=24):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(ctx, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx), persistent=False)

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]]
        return self.head(self.enc(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True))


def make_transformer(gen):
    vocab, ctx = 16, 24
    model = TinyTransformer(vocab=vocab, ctx=ctx)
    opt = torch.optim.Adam(model.parameters(), lr=LR["transformer"])

    def batch(train=True):
        # sequences that repeat a random 6-token motif: predictable after the first period
        g = gen if train else torch.Generator().manual_seed(10_002)
        n = 32 if train else 256
        motif = torch.randint(0, vocab, (n, 6), generator=g)
        seq = motif.repeat(1, ctx // 6 + 1)[:, : ctx + 1]
        return seq[:, :-1], seq[:, 1:]

    def loss_fn(logits, y):
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    # trivial baseline: uniform over the (uniformly drawn) tokens
    return model, opt, batch, loss_fn, STEPS["transformer"], lambda y: math.log(vocab)


TASK_SUMMARY = ("IRNN (64 units) on the adding problem, T=40, SGD lr 0.1, 250 steps, batch 32; "
                "12-layer tanh MLP (width 64, 2x Xavier init), SGD lr 0.2, 250 steps; "
                "2-layer pre-LN transformer (d=48) on repeated 6-token motifs, Adam lr 0.1, 200 steps")
TASKS = {"irnn-adding": make_irnn, "tanh-mlp": make_mlp, "transformer": make_transformer}


def policies():
    return {
        "none": lambda: None,
        "GlobalNorm(1.0)": lambda: gg.GlobalNorm(1.0),
        "AutoClip(p=10)": lambda: AutoClip(10),
        "AGC(0.01)": lambda: AGC(0.01),
        "AGC(0.01, excl. head)": lambda: AGC(0.01, exclude="head.*"),
        "ZClip()": lambda: ZClip(),
        "AdaGC()": lambda: AdaGC(),
    }


# ---------------------------------------------------------------- runs


def run(task: str, policy_name: str, seed: int) -> tuple[float, bool, bool]:
    """(final eval loss, diverged = NaN/Inf loss, failed = no better than the trivial baseline)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, opt, batch, loss_fn, steps, baseline = TASKS[task](gen)
    policy = policies()[policy_name]()
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    if policy is not None:
        policy.bind(names)
    x_eval, y_eval = batch(train=False)

    def evaluate():
        with torch.no_grad():
            return float(loss_fn(model(x_eval), y_eval))

    trivial = baseline(y_eval)
    for _ in range(steps):
        x, y = batch()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if not math.isfinite(loss.item()):  # host sync: the benchmark stops a dead run
            return math.nan, True, True
        loss.backward()
        if policy is not None:
            grads = [p.grad for p in params]
            policy.clip_(params, grads, compute_stats(names, grads))
        opt.step()
    final = evaluate()
    diverged = not math.isfinite(final)
    return final, diverged, diverged or final >= trivial


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--tasks", nargs="*", default=list(TASKS))
    ap.add_argument("--write", default=None, help="replace this script's section in a markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = []
    for task in args.tasks:
        for name in policies():
            finals, div, fail = [], 0, 0
            for seed in range(args.seeds):
                final, diverged, failed = run(task, name, seed)
                div += diverged
                fail += failed
                if math.isfinite(final):
                    finals.append(final)
            med = statistics.median(finals) if finals else math.nan
            rows.append((task, name, med, div, fail, args.seeds))
            print(f"{task:12s} {name:22s} median final loss {med:9.4g}  diverged {div}/{args.seeds}"
                  f"  failed {fail}/{args.seeds}", flush=True)
    elapsed = time.perf_counter() - t0
    print(f"total {elapsed:.0f} s")
    table = ["| task | policy | median final loss (finite runs) | diverged (NaN/Inf) | failed (>= trivial) |",
             "|---|---|---:|---:|---:|"]
    for task, name, med, div, fail, n in rows:
        table.append(f"| {task} | {name} | {med:.4g} | {div}/{n} | {fail}/{n} |")
    text = "\n".join(table)
    print(text)
    if args.write:
        _write(args.write, text, args, elapsed)


READING = """\
Setup: {tasks}.
Each policy is applied as `gg.Guard` applies it, but without the guard's NaN-step
skip, so only the clipping is measured. *Diverged*: the training loss became NaN/Inf (the run
stops). *Failed*: diverged, or the final held-out loss is no better than a trivial predictor
(adding: 1/6; MLP: target variance 1; transformer: ln 16 = 2.77). Runs are deterministic (CPU,
1 thread, seeds 0-4).

What this shows (for these runs):
- `GlobalNorm(1.0)` is the only policy that rescued all three (0/15 failed). On the transformer
  it is also the best final loss (0.79 vs 2.43 unclipped).
- The adaptive thresholds are learned from the run's own norms, so they do not stop a run that
  explodes from its first steps. IRNN (seed 0 logged): the first global norm is ~120 and a single
  unclipped SGD step at lr 0.1 makes the next loss NaN; AutoClip (its threshold is then the first
  norm itself), AdaGC (the first step initialises the EMA) and ZClip (warm-up) all leave the first
  step unclipped by design: 5/5 NaN. Tanh MLP: the norm grows 10^18-fold within 20 steps (seed 0), inside
  ZClip's warm-up (5/5 NaN); on the transformer ZClip's warm-up variance is so large (early norms
  ~40-75) that no later step reaches z > 2.5 and it never clips (identical to no clipping).
- Where the explosion is slower (tanh MLP), AdaGC (0.111), AutoClip (0.116) and AGC over all
  tensors (0.122) rescue every seed and end below `GlobalNorm(1.0)` (0.137).
- AGC with the paper's classifier exclusion fails where the unclipped linear head is itself the
  unstable part (IRNN at lr 0.1: 5/5 NaN; transformer 4/5 failed); AGC on every tensor kept the
  IRNN finite but barely learned (0.166 vs 0.167 trivial).
- With Adam at a too-high LR (transformer) nothing produced NaN; AdaGC ended worse than no
  clipping (3.96, 5/5 above ln 16). Not investigated further; note that Adam normalises each
  coordinate, so a per-tensor rescale changes its moment history rather than bounding the step.
Take-away: the adaptive policies are spike suppressors for runs that are otherwise stable (their
papers' setting: LLM pre-training with rare spikes); for a run that diverges from the start, a
fixed `GlobalNorm` bound is the reliable rescue.
"""


def _write(path, table, args, elapsed):
    with open(path) as f:
        doc = f.read()
    start = doc.index(SECTION) + len(SECTION)
    nxt = doc.find("\n## ", start)
    end = len(doc) if nxt < 0 else nxt + 1
    body = f"""

Command: `python benchmarks/rescue_adaptive.py --seeds {args.seeds} --write docs/benchmarks.md`
({elapsed:.0f} s on {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread).

{table}

{READING.format(tasks=TASK_SUMMARY)}"""
    with open(path, "w") as f:
        f.write(doc[:start] + body + doc[end:])


if __name__ == "__main__":
    main()
