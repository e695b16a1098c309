"""Host cost of the default detectors per row, in quiet flushes and in flushes where rules fire.

Rows are synthetic (no training): a healthy noisy run for a model with ``--layers``
watched tensors, fed to ``default_detectors()`` in batches of ``--batch`` rows (the CPU
flush interval).  "quiet" times warm detectors on healthy rows; "firing" times rows
where the spike, loss-spike, exploding and vanishing rules fire on every batch.

    python benchmarks/bench_detect_rows.py [--layers 77] [--batch 16] [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

import gradguard as gg
from gradguard.detect import default_detectors
from gradguard.layout import COL, GLOBAL_COLS, RowLayout


def make_rows(n_tensors: int, n_steps: int, seed: int = 0, fire: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = len(GLOBAL_COLS)
    rows = np.zeros((n_steps, RowLayout(n_tensors).width), np.float32)
    norms = rng.lognormal(0, 0.2, (n_steps, n_tensors))
    loss = 2.0 * rng.lognormal(0, 0.05, n_steps)
    if fire:  # from step 200 on, one spike, one loss spike and vanishing early layers per 16 steps
        norms[200::16] *= 1e3
        loss[205::16] *= 5
        norms[200:, : n_tensors // 2] *= 1e-5
    rows[:, g:g + n_tensors] = norms
    rows[:, g + n_tensors:g + 2 * n_tensors] = norms / 3
    # parameter norms: total and per tensor every 10 steps (the guard's default), NaN in between
    rows[:, g + 2 * n_tensors:] = np.nan
    rows[::10, g + 2 * n_tensors:] = 30.0 / np.sqrt(n_tensors)
    rows[:, COL["global_norm"]] = np.sqrt((norms.astype(np.float64) ** 2).sum(1))
    rows[:, COL["loss"]] = loss
    rows[:, COL["clip_coef"]] = 1.0
    rows[:, COL["lr"]] = 0.1
    rows[:, COL["param_norm"]] = np.nan
    rows[::10, COL["param_norm"]] = 30.0
    return rows


def time_detectors(n_tensors: int, batch: int, fire: bool, rounds: int, warm: int = 200, n: int = 800) -> float:
    """Median over rounds of microseconds per row (all default detectors together)."""
    model = nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(n_tensors)])
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), detectors=[])
    run = getattr(guard, "run", guard)  # the RunInfo where the guard has one
    rows = make_rows(n_tensors, warm + n, fire=fire)
    steps = list(range(warm + n))
    out = []
    for _ in range(rounds):
        dets = default_detectors()
        for d in dets:
            d.bind(run)
            d.update(steps[:warm], rows[:warm], run)
        t = time.perf_counter()
        for a in range(warm, warm + n, batch):
            for d in dets:
                d.update(steps[a:a + batch], rows[a:a + batch], run)
        out.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 77])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(1)
    for n in a.layers:
        for fire in (False, True):
            us = time_detectors(n, a.batch, fire, a.rounds)
            print(f"{n:4d} tensors, batch {a.batch:3d}, {'firing' if fire else 'quiet ':6s}: {us:7.1f} us/row")


if __name__ == "__main__":
    main()
