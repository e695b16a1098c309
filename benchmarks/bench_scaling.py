"""How gradguard's costs grow: tensor count, parameter count, logging interval (CPU).

A/B interleaved, medians of per-round ratios (order rotates each round):
  1. tensor count 10 -> 10,000 at a fixed 10M parameters: ``grad_stats`` and
     ``clip_grad_norm_`` (per-tensor fixed costs show here);
  2. parameter count 1M -> 500M in 100 tensors: ``grad_stats`` vs
     ``clip_grad_norm_`` vs one read of the bytes (``sum``);
  3. logging interval: ``guard.step`` (GlobalNorm, fused AdamW, seven detectors,
     run store) with ``flush_every`` 1 -> 256, 300 tensors, 3M parameters.

    python benchmarks/bench_scaling.py [--max-params 500e6] [--write docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_detectors import emit, machine, save_json  # noqa: E402

HEADING = "## Scaling"


def rounds(fns: dict, reps: int) -> dict:
    names = list(fns)
    out = {n: [] for n in names}
    for f in fns.values():
        f()
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            fns[n]()
            out[n].append(time.perf_counter() - t)
    return out


def med_ms(xs):
    return statistics.median(xs) * 1e3


def grads_for(n_tensors: int, total: int):
    per = max(1, total // n_tensors)
    g = torch.Generator().manual_seed(0)
    ps = []
    for _ in range(n_tensors):
        p = torch.nn.Parameter(torch.empty(per))
        p.grad = torch.randn(per, generator=g) * 1e-6
        ps.append(p)
    return ps


def stats_vs_clip(ps, reps, with_read=False):
    from gradguard.stats import compute_stats

    grads = [p.grad for p in ps]
    names = [str(i) for i in range(len(ps))]
    fns = {"grad_stats": lambda: compute_stats(names, grads),
           "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(ps, 1e9)}
    if with_read:
        fns["one read"] = lambda: [g.sum() for g in grads]
    return rounds(fns, reps)


def main(argv=None) -> int:
    import gradguard as gg

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-params", type=float, default=500e6)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--write", default=None)
    a = ap.parse_args(argv)
    out = {"tensors": [], "params": [], "flush": []}
    lines = [f"`benchmarks/bench_scaling.py`: CPU, {machine()}; {a.reps} interleaved rounds, medians.", ""]

    lines += ["**Tensor count** (10M parameters in total)", "",
              "| tensors | grad_stats ms | clip_grad_norm_ ms | ratio | per tensor us (grad_stats) |",
              "|---|---|---|---|---|"]
    for n in (10, 100, 1000, 10_000):
        res = stats_vs_clip(grads_for(n, 10_000_000), a.reps)
        s, c = med_ms(res["grad_stats"]), med_ms(res["clip_grad_norm_"])
        r = statistics.median(x / y for x, y in zip(res["grad_stats"], res["clip_grad_norm_"]))
        out["tensors"].append((n, s, c))
        lines.append(f"| {n:,} | {s:.2f} | {c:.2f} | {r:.2f} | {1e3 * s / n:.1f} |")
        print(lines[-1], flush=True)

    lines += ["", "**Parameter count** (100 tensors)", "",
              "| parameters | grad_stats ms | clip_grad_norm_ ms | one read ms | x clip | x one read |",
              "|---|---|---|---|---|---|"]
    stopped = None
    for total in (1e6, 10e6, 100e6, 250e6, 500e6):
        if total > a.max_params:
            stopped = total
            break
        ps = grads_for(100, int(total))
        res = stats_vs_clip(ps, max(3, a.reps // (2 if total >= 250e6 else 1)), with_read=True)
        del ps
        s, c, rd = (med_ms(res[k]) for k in ("grad_stats", "clip_grad_norm_", "one read"))
        rc = statistics.median(x / y for x, y in zip(res["grad_stats"], res["clip_grad_norm_"]))
        rr = statistics.median(x / y for x, y in zip(res["grad_stats"], res["one read"]))
        out["params"].append((total, s, c, rd))
        lines.append(f"| {total / 1e6:,.0f}M | {s:.1f} | {c:.1f} | {rd:.1f} | {rc:.2f} | {rr:.2f} |")
        print(lines[-1], flush=True)
    if stopped:
        lines.append(f"\nStopped before {stopped / 1e6:,.0f}M parameters (--max-params).")
    else:
        lines.append("\n500M parameters = 2 GB of float32 gradients (+2 GB parameters): fits the 24 GiB "
                     "machine; the optimizer is not part of this measurement.")

    lines += ["", "**Logging interval** (guard.step, GlobalNorm + fused AdamW + detectors + store; "
              "300 tensors, 0.3M parameters)", "",
              "| flush_every | guard.step ms | x (flush_every=1) |", "|---|---|---|"]
    tmp = Path(tempfile.mkdtemp(prefix="gg_bench_scaling_"))
    try:
        guards, fns = {}, {}
        for fe in (1, 8, 32, 256):
            ps = grads_for(300, 300_000)
            opt = torch.optim.AdamW(ps, lr=1e-4, fused=True)
            g = gg.Guard([(f"p{i}", p) for i, p in enumerate(ps)], opt, clip=gg.GlobalNorm(1.0),
                         flush_every=fe, log_dir=tmp, run_name=f"fe{fe}")
            guards[fe] = g

            def step(g=g):
                g._last_grads = None  # re-uses the same gradients
                g.step(loss=1.0)
            fns[fe] = step
        res = rounds(fns, 260)  # enough steps that flush_every=256 flushes
        for g in guards.values():
            g.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = res[1]
    for fe, xs in res.items():
        r = statistics.median(x / y for x, y in zip(xs, base))
        mean = sum(xs) / len(xs) * 1e3  # mean: flush cost lands on one step in flush_every
        out["flush"].append((fe, med_ms(xs), mean))
        lines.append(f"| {fe} | median {med_ms(xs):.2f}, mean {mean:.2f} | {r:.2f} |")
    save_json("scaling", out)
    emit(lines, a.write, HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
