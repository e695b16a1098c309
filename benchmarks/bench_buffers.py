"""What reading the BatchNorm running variances every step costs (RunningStatsDetector's input).

A/B interleaved in one process, medians over repetitions: the same training step (forward,
backward, ``guard.step``) under a guard built from the model (its running variances watched) and
under one built from ``model.named_parameters()`` (no model, no buffers; everything else equal),
on the detection corpus's small BatchNorm CNN (2 norm layers, the worst case: a step of ~1 ms)
and a ResNet-18-shaped network (20 norm layers) on 32x32 inputs.  Also the buffer statistics call
alone, on each lane.

Usage:  python benchmarks/bench_buffers.py [--reps N]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import gradguard as gg
from gradguard.backend import DEVICE, HOST
from gradguard.layout import watched_buffers
from gradguard.stats import Statistics

sys.path.insert(0, str(Path(__file__).resolve().parent / "detection"))
from corpus import CNN  # noqa: E402


class Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


def resnet18(width=16):
    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    c = width
    for i, w in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [Basic(c, w, 1 if i == 0 else 2), Basic(w, w, 1)]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


CASES = {"corpus CNN (2 BatchNorm2d), batch 32 of 1x8x8": (CNN, (32, 1, 8, 8)),
         "ResNet-18 shape (20 BatchNorm2d, width 16), batch 16 of 3x32x32": (resnet18, (16, 3, 32, 32))}


def step_time(guard, model, opt, x, y) -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    guard.step(loss)
    return time.perf_counter() - t


def bench(build, shape, reps: int) -> dict:
    torch.manual_seed(0)
    out = {}
    pairs = {}
    for name in ("buffers", "none"):
        model = build()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        guard = gg.Guard(model if name == "buffers" else list(model.named_parameters()), opt)
        pairs[name] = (guard, model, opt)
    assert pairs["buffers"][0].run.buffers and not pairs["none"][0].run.buffers
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    times = {k: [] for k in pairs}
    for _ in range(20):  # warm-up
        for k, p in pairs.items():
            step_time(*p, x, y)
    for _ in range(reps):  # interleaved: both see the same machine state
        for k, p in pairs.items():
            times[k].append(step_time(*p, x, y))
    med = {k: statistics.median(v) for k, v in times.items()}
    out["step_ms"] = {k: 1e3 * v for k, v in med.items()}
    out["ratio"] = med["buffers"] / med["none"]
    bufs = [b for _, b in watched_buffers(pairs["buffers"][1])]
    names = [str(i) for i in range(len(bufs))]
    for lane, xp in (("host", HOST), ("device lane on CPU", DEVICE)):
        st = Statistics(bufs, xp)
        st(names, bufs, [])
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(50):
                st(names, bufs, [])
            ts.append((time.perf_counter() - t) / 50)
        out[f"stats_us_{lane}"] = 1e6 * statistics.median(ts)
    out["n_buffers"] = len(bufs)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.reps} interleaved steps, medians.\n")
    print("| model | buffers | step, buffers watched (ms) | step, none (ms) | ratio | buffer stats, host lane (µs) "
          "| buffer stats, device lane on CPU (µs) |")
    print("|---|---|---|---|---|---|---|")
    for name, (build, shape) in CASES.items():
        r = bench(build, shape, args.reps)
        print(f"| {name} | {r['n_buffers']} | {r['step_ms']['buffers']:.3f} | {r['step_ms']['none']:.3f} | "
              f"{r['ratio']:.3f}x | {r['stats_us_host']:.1f} | {r['stats_us_device lane on CPU']:.1f} |")


if __name__ == "__main__":
    main()
