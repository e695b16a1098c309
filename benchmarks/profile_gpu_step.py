"""Where a guarded optimizer step spends its time on a GPU (diagnosis, not a target check).

For GPT-2-small shapes with fused AdamW it reports, per variant, the host (CPU) time
to issue the step and the device time (CUDA events), medians over interleaved
repetitions with fresh gradients; the fused optimizer's own cost of ``found_inf`` and
``grad_scale``; and the kernels one ``guard.step()`` launches (torch.profiler).

    PYTHONPATH=src python benchmarks/profile_gpu_step.py --out DIR
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import FULL, SMOKE, gpt_shapes, make_params  # noqa: E402

import gradguard as gg  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    cfg = FULL if not a.smoke else SMOKE
    params = make_params(gpt_shapes(cfg), torch.float32, dev)
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    src = [p.grad.clone() for p in params]

    def fresh():
        for p, g in zip(params, src):
            p.grad = g.clone()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    opts = {}

    def opt(key):
        if key not in opts:
            opts[key] = torch.optim.AdamW(params, lr=1e-6, fused=True)
        return opts[key]

    one = torch.ones((), device=dev)
    zero = torch.zeros((), device=dev)
    guards = {
        "guard no clip": gg.Guard(named, opt("g0"), detectors=[], param_norm_every=0, flush_every=10_000),
        "guard GlobalNorm": gg.Guard(named, opt("g1"), clip=gg.GlobalNorm(1.0), detectors=[],
                                     param_norm_every=0, flush_every=10_000),
        "guard defaults+GlobalNorm": gg.Guard(named, opt("g2"), clip=gg.GlobalNorm(1.0), flush_every=32),
    }

    def with_attrs(o, **kw):
        for k, v in kw.items():
            setattr(o, k, v)
        o.step()
        for k in kw:
            delattr(o, k)

    variants = {
        "adamw": lambda: opt("a").step(),
        "adamw found_inf": lambda: with_attrs(opt("b"), found_inf=zero),
        "adamw grad_scale+found_inf": lambda: with_attrs(opt("c"), grad_scale=one, found_inf=zero),
        "clip_grad_norm_ + adamw": lambda: (nn.utils.clip_grad_norm_(params, 1.0, foreach=True), opt("d").step()),
        "gg.grad_stats": lambda: gg.grad_stats(named),
        **{k: (lambda g=g: g.step()) for k, g in guards.items()},
    }
    host = {k: [] for k in variants}
    device = {k: [] for k in variants}
    for r in range(a.reps + 3):
        for k, fn in variants.items():
            fresh()
            sync()
            if dev.type == "cuda":
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            if dev.type == "cuda":
                e1.record()
            sync()
            if r >= 3:
                host[k].append((t1 - t0) * 1e3)
                device[k].append(e0.elapsed_time(e1) if dev.type == "cuda" else (time.perf_counter() - t0) * 1e3)
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "host_ms": {k: statistics.median(v) for k, v in host.items()},
           "device_ms": {k: statistics.median(v) for k, v in device.items()}}
    # the kernels of one guarded step
    g = guards["guard GlobalNorm"]
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    fresh()
    sync()
    with torch.profiler.profile(activities=acts) as prof:
        g.step()
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total" if dev.type == "cuda" else "cpu_time_total",
                                      row_limit=40)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # host time by Python function (what launches cost on the CPU side)
    for name, fn in (("guard_step", g.step), ("grad_stats", lambda: gg.grad_stats(named))):
        pr = cProfile.Profile()
        for _ in range(20):
            fresh()
            sync()
            pr.enable()
            fn()
            pr.disable()
        sync()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(30)
        (out / f"cprofile_{name}.txt").write_text(buf.getvalue())
    (out / "profile_step.json").write_text(json.dumps(res, indent=1))
    (out / "profile_step.txt").write_text(table)
    for k in variants:
        print(f"{k:32s} host {res['host_ms'][k]:7.3f} ms   device {res['device_ms'][k]:7.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
