"""Rescue benchmark on the Pascanu et al. 2013 tasks: plain SGD vs SGD + gradguard.

For each task x length x seed, the same tanh RNN (50 units, the paper's size) from the same
initialisation and the same batches is trained twice: plain SGD, and SGD under
``gg.Guard(clip=gg.GlobalNorm(1.0), on_nonfinite="skip")`` (``--methods`` adds the adaptive
policies of ``gradguard.adaptive`` with their papers' defaults).  Success = under 1% errors on
10,000 fresh sequences (addition: squared error > 0.04 is an error).

The paper trains for up to 5M updates; this machine gets a fixed budget of ``--steps``
updates per run (default 3,000: 0.06% of the paper's), so absolute success rates are far
below the paper's.  We also report the median error rate, which moves long before success.

    .venv/bin/python benchmarks/rescue.py                       # full grid
    .venv/bin/python benchmarks/rescue.py --tasks addition --lengths 50 --seeds 2 --steps 500
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings

import torch

import gradguard as gg
from gradguard.tools.tasks import SequenceClassifier, get_task


def make_policy(method):
    """None for plain SGD, else the clipping policy named ``method``."""
    if method == "sgd":
        return None
    if method == "globalnorm":
        return gg.GlobalNorm(1.0)
    from gradguard import adaptive  # the adaptive family, with each paper's defaults

    return {"autoclip": adaptive.AutoClip, "zclip": adaptive.ZClip, "agc": adaptive.AGC,
            "adagc": adaptive.AdaGC}[method]()


LABELS = {"sgd": "SGD", "globalnorm": "SGD + GlobalNorm(1.0)", "autoclip": "SGD + AutoClip(p=10)",
          "zclip": "SGD + ZClip", "agc": "SGD + AGC", "adagc": "SGD + AdaGC"}


def train(task, length, seed, steps, lr, method, hidden=50, batch=20):
    torch.manual_seed(seed)
    model = SequenceClassifier(task.input_size, hidden, task.output_size, "rnn")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    policy = make_policy(method)
    guard = gg.Guard(model, opt, clip=policy, on_nonfinite="skip",
                     flush_every=100, detectors=[]) if policy is not None else None
    gen = torch.Generator().manual_seed(1000 + seed)
    diverged = None
    for step in range(steps):
        x, y = task.sample(batch, length, gen)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model(x), y)
        loss.backward()
        if guard is not None:
            guard.step(loss=loss)
        else:
            opt.step()
        if step % 100 == 99 and diverged is None and not math.isfinite(float(loss.detach())):  # host sync: every 100 steps
            diverged = step
    skipped = guard.skipped_steps if guard is not None else 0
    # 10,000 fresh sequences from a generator no training batch used.
    test_gen = torch.Generator().manual_seed(10**6 + seed)
    errors = 0
    with torch.no_grad():
        for _ in range(10):
            x, y = task.sample(1000, length, test_gen)
            errors += int(task.errors(model(x), y).sum())
    return {"error_rate": errors / 10_000, "diverged_at": diverged, "skipped": skipped}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["addition", "temporal_order"])
    p.add_argument("--lengths", nargs="+", type=int, default=[50, 100])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--methods", nargs="+", default=["sgd", "globalnorm"], choices=sorted(LABELS))
    p.add_argument("--json", default=None, help="write raw results here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    results = []
    t0 = time.time()
    for name in a.tasks:
        task = get_task(name)
        for L in a.lengths:
            for seed in range(a.seeds):
                for method in a.methods:
                    t = time.time()
                    r = train(task, L, seed, a.steps, a.lr, method)
                    r.update(task=name, length=L, seed=seed, method=method,
                             seconds=round(time.time() - t, 1))
                    results.append(r)
                    print(json.dumps(r), flush=True, file=sys.stderr)
    wall = time.time() - t0
    if a.json:
        json.dump({"args": vars(a), "results": results, "wall_s": wall}, open(a.json, "w"), indent=1)
    print(f"\n{a.steps} updates per run, lr {a.lr}, batch 20, 50 tanh units; wall {wall:.0f} s\n")
    print("| task | length | method | successes (<1% errors) | median error rate | diverged (NaN) |")
    print("|---|---|---|---|---|---|")
    for name in a.tasks:
        for L in a.lengths:
            for m in a.methods:
                rs = [r for r in results if r["task"] == name and r["length"] == L and r["method"] == m]
                ok = sum(r["error_rate"] < 0.01 for r in rs)
                med = statistics.median(r["error_rate"] for r in rs)
                nan = sum(r["diverged_at"] is not None for r in rs)
                label = LABELS[m]
                print(f"| {name} | {L} | {label} | {ok}/{len(rs)} | {100 * med:.1f}% | {nan}/{len(rs)} |")


if __name__ == "__main__":
    main()
