"""GPU benchmark: gradguard's statistics and guarded step on GPT-2-small, in under 4 minutes.

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu      # on a CUDA machine
    python benchmarks/bench_gpu.py --smoke --out /tmp/x              # tiny model on CPU (tests)

Sections (each in try/except: a failure is recorded with its traceback and the next
section runs; results.json and gpu_section.md are rewritten after every section):
  P1g  statistics of GPT-2-small-shaped gradients (148 tensors, 124M), fp32 and bf16:
       gg.grad_stats vs one read of the same bytes (a flat sum) vs torch._foreach_norm
       (2 and inf) vs clip_grad_norm_(foreach=True), plus the Triton kernel alone.
  P2g  guard.step() (GlobalNorm(1.0), skip; no detectors / default detectors) vs
       clip_grad_norm_ + fused AdamW step, fresh gradients every call (made outside
       the timed region).
  P3g  overhead as % of a full GPT-2-small bf16-autocast training step (batch 8 x 1024,
       fused AdamW): plain, torch clip, gradguard defaults with a store, flush_every=1,
       and a naive per-parameter .norm().item() monitor + clip.
  P4g  host syncs per step (torch.cuda.set_sync_debug_mode("warn")), Guard defaults with
       a store, fused AdamW, 40 steps, flush_every=32, with the gradguard frame of each.
Timing: every variant runs once per round, the order rotated each round (paired,
interleaved); medians over rounds, ratios as medians of per-round ratios. Each timed
region is bracketed by device synchronisations.
Uses only the public gradguard API (gg.Guard, gg.grad_stats, gg.GlobalNorm), plus
gradguard._triton_stats for the kernel-alone row. Needs torch only (Triton if present).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import gradguard as gg

try:
    from gradguard import _triton_stats
except ImportError:  # an older gradguard without the kernel
    _triton_stats = None

TARGET_VS_READ = 1.5   # statistics <= 1.5x one read of the gradient bytes
TARGET_VS_CLIP = 0.5   # statistics <= 0.5x torch's clip_grad_norm_
GG_DIR = os.path.dirname(os.path.abspath(gg.__file__))


# --------------------------------------------------------------------------- model
class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d), Attention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 in plain torch; tied embeddings: 148 parameter tensors, 124M at full size."""

    def __init__(self, vocab=50257, ctx=1024, d=768, layers=12, heads=12):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for blk in self.h:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


FULL = dict(vocab=50257, ctx=1024, d=768, layers=12, heads=12, batch=8)
SMOKE = dict(vocab=256, ctx=32, d=64, layers=2, heads=4, batch=2)


# --------------------------------------------------------------------------- timing
class Bench:
    def __init__(self, device: torch.device, deadline: float):
        self.device, self.deadline = device, deadline

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timed(self, fn, setup=None, inner: int = 1) -> float:
        """Seconds per call of fn; setup (fresh gradients) runs before, outside the clock."""
        if setup is not None:
            setup()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / inner

    def interleaved(self, fns: dict, reps: int, setups: dict | None = None, inner: int = 1,
                    warmup: int = 2, reserve: float = 0.0) -> dict:
        """Per-variant lists of seconds; one call of each per round, order rotated each
        round; stops early (at least 3 rounds) when the time budget nears ``reserve``."""
        setups = setups or {}
        names = list(fns)
        for _ in range(warmup):
            for n in names:
                self.timed(fns[n], setups.get(n))
        out = {n: [] for n in names}
        for r in range(reps):
            if r >= 3 and self.left() < reserve:
                break
            k = r % len(names)
            for n in names[k:] + names[:k]:
                out[n].append(self.timed(fns[n], setups.get(n), inner))
        return out


def med_ms(xs) -> float:
    return statistics.median(xs) * 1e3 if xs else math.nan


def paired(a, b) -> float:
    """Median of per-round ratios a/b."""
    rs = [x / y for x, y in zip(a, b) if y > 0]
    return statistics.median(rs) if rs else math.nan


def clean(o):
    """JSON-safe: NaN/Inf floats as strings."""
    if isinstance(o, float) and not math.isfinite(o):
        return "NaN" if math.isnan(o) else ("Inf" if o > 0 else "-Inf")
    if isinstance(o, dict):
        return {str(k): clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean(v) for v in o]
    return o


def fmt(x, nd=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def verdict(x: float, target: float) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return "meets" if x <= target else "misses"


# --------------------------------------------------------------------------- sections
def gpt_shapes(cfg) -> list[tuple]:
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = GPT(**{k: v for k, v in cfg.items() if k != "batch"})
    return [tuple(p.shape) for p in model.parameters()]


def make_params(shapes, dtype, device, seed=0, grads=True):
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in shapes:
        p = nn.Parameter(torch.randn(s, dtype=dtype, device=device, generator=g) * 0.02)
        if grads:  # total norm << 1: GlobalNorm(1.0) does not clip, the values do not drift
            p.grad = (torch.randn(s, device=device, generator=g) * 1e-4).to(dtype)
        params.append(p)
    return params


def section_p1g(b: Bench, cfg, reps, inner) -> dict:
    shapes = gpt_shapes(cfg)
    out = {"tensors": len(shapes), "params": sum(math.prod(s) for s in shapes), "dtypes": {}}
    for dtype in (torch.float32, torch.bfloat16):
        params = make_params(shapes, dtype, b.device)
        grads = [p.grad for p in params]
        named = [(f"p{i}", p) for i, p in enumerate(params)]
        flat = torch.cat([g.reshape(-1) for g in grads])  # the same bytes, one buffer
        fns = {
            "one read (flat sum)": lambda: flat.sum(),
            "gg.grad_stats": lambda: gg.grad_stats(named),
            "torch._foreach_norm(2)": lambda: torch._foreach_norm(grads),
            "torch._foreach_norm(inf)": lambda: torch._foreach_norm(grads, math.inf),
            "clip_grad_norm_(foreach)": lambda: nn.utils.clip_grad_norm_(params, 1e9, foreach=True),
        }
        if _triton_stats is not None and _triton_stats.available(grads):
            fns["triton kernel alone"] = lambda: _triton_stats.sumsq_maxabs(grads)
        else:
            out["triton_note"] = ("gradguard._triton_stats missing" if _triton_stats is None else
                                  "Triton kernel not available here (needs CUDA tensors and Triton)")
        res = b.interleaved(fns, reps, inner=inner, reserve=30)
        nbytes = flat.numel() * flat.element_size()
        rows = {}
        for n, xs in res.items():
            rows[n] = {"median_ms": med_ms(xs), "rounds": len(xs),
                       "x_one_read": paired(xs, res["one read (flat sum)"]),
                       "x_clip": paired(xs, res["clip_grad_norm_(foreach)"]),
                       "GB_per_s": nbytes / statistics.median(xs) / 1e9 if xs else math.nan}
        out["dtypes"][str(dtype).replace("torch.", "")] = {"bytes": nbytes, "rows": rows}
        del params, grads, named, flat, fns
        if b.device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def section_p2g(b: Bench, cfg, reps) -> dict:
    shapes = gpt_shapes(cfg)
    src = [g.grad for g in make_params(shapes, torch.float32, b.device, seed=1)]
    pa, pb, pc = (make_params(shapes, torch.float32, b.device, seed=2, grads=False) for _ in range(3))
    fused = dict(lr=1e-4, fused=True)
    opt_a, opt_b, opt_c = (torch.optim.AdamW(ps, **fused) for ps in (pa, pb, pc))
    g_nodet = gg.Guard([(f"p{i}", p) for i, p in enumerate(pa)], opt_a, clip=gg.GlobalNorm(1.0),
                       on_nonfinite="skip", detectors=[])
    g_def = gg.Guard([(f"p{i}", p) for i, p in enumerate(pc)], opt_c, clip=gg.GlobalNorm(1.0),
                     on_nonfinite="skip")

    def fresh(ps):
        def f():
            for p, g in zip(ps, src):
                p.grad = g.clone()  # a new tensor, as a backward would make
        return f

    def torch_step():
        nn.utils.clip_grad_norm_(pb, 1.0, foreach=True)
        opt_b.step()

    fns = {"clip_grad_norm_ + fused AdamW": torch_step,
           "guard.step (GlobalNorm, skip, no detectors)": lambda: g_nodet.step(),
           "guard.step (GlobalNorm, skip, default detectors)": lambda: g_def.step()}
    setups = {"clip_grad_norm_ + fused AdamW": fresh(pb),
              "guard.step (GlobalNorm, skip, no detectors)": fresh(pa),
              "guard.step (GlobalNorm, skip, default detectors)": fresh(pc)}
    res = b.interleaved(fns, reps, setups=setups, reserve=30)
    base = res["clip_grad_norm_ + fused AdamW"]
    rows = {n: {"median_ms": med_ms(xs), "rounds": len(xs), "x_torch": paired(xs, base)}
            for n, xs in res.items()}
    for g in (g_nodet, g_def):
        close = getattr(g, "close", None)
        if close:
            close()
    return {"rows": rows, "note": "default flush_every; a flush (one host sync) falls in the "
                                  "median's rounds rarely"}


def _train_setup(b: Bench, cfg, seed=0):
    torch.manual_seed(seed)
    with b.device:  # initialised where it trains: no 0.5 GB host init and copy
        model = GPT(**{k: v for k, v in cfg.items() if k != "batch"})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["ctx"] + 1), generator=g).to(b.device)
    return model, opt, x[:, :-1].contiguous(), x[:, 1:].contiguous()


def _fwd_bwd(model, opt, xb, yb, device):
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(xb)
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), yb.view(-1))
    loss.backward()
    return loss


def section_p3g(b: Bench, cfg, reps, warmup, tmp) -> dict:
    model, opt, xb, yb = _train_setup(b, cfg)
    params = [p for p in model.parameters()]
    g_def = gg.Guard(model, opt, clip=gg.GlobalNorm(1.0), log_dir=os.path.join(tmp, "p3-defaults"))
    g_f1 = gg.Guard(model, opt, clip=gg.GlobalNorm(1.0), log_dir=os.path.join(tmp, "p3-flush1"),
                    flush_every=1)
    # watching only (no clipping): fused AdamW then needs no grad_scale, whose write-back of
    # every unscaled gradient is the price of folding the clip into the optimizer
    g_mon = gg.Guard(model, opt, clip=None, log_dir=os.path.join(tmp, "p3-monitor"))

    def plain():
        _fwd_bwd(model, opt, xb, yb, b.device)
        opt.step()

    def torch_clip():
        _fwd_bwd(model, opt, xb, yb, b.device)
        nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()

    def guard_with(g):
        def f():
            loss = _fwd_bwd(model, opt, xb, yb, b.device)
            g.step(loss=loss)
        return f

    def naive():
        _fwd_bwd(model, opt, xb, yb, b.device)
        norms = [p.grad.norm().item() for p in params]  # host sync: one per parameter (the point)
        if not all(map(math.isfinite, norms)):
            return
        nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()

    fns = {"plain (fused AdamW)": plain, "torch clip_grad_norm_": torch_clip,
           "gradguard defaults (store)": guard_with(g_def),
           "gradguard flush_every=1": guard_with(g_f1),
           "gradguard monitoring only (clip=None)": guard_with(g_mon),
           "naive .norm().item() + clip": naive}
    res = b.interleaved(fns, reps, warmup=warmup, reserve=45)
    base = res["plain (fused AdamW)"]
    rows = {n: {"median_ms": med_ms(xs), "rounds": len(xs),
                "overhead_pct": (paired(xs, base) - 1) * 100,
                "overhead_pct_of_medians": (statistics.median(xs) / statistics.median(base) - 1) * 100}
            for n, xs in res.items()}
    g_def.close()
    g_f1.close()
    del model, opt
    if b.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"rows": rows, "batch": [cfg["batch"], cfg["ctx"]]}


class SyncCounter:
    """Counts synchronizing CUDA operations (set_sync_debug_mode("warn")) per step and
    records the innermost gradguard frame (else the caller) of each."""

    def __init__(self, cuda: bool):
        self.cuda, self.step, self.hits = cuda, -1, []

    def _show(self, message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "synchroniz" not in text.lower():
            return
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if os.path.abspath(f.filename).startswith(GG_DIR)]
        f = ours[-1] if ours else None
        where = (f"{os.path.relpath(f.filename, os.path.dirname(GG_DIR))}:{f.lineno} in {f.name}"
                 if f else f"(outside gradguard) {os.path.basename(filename)}:{lineno}")
        self.hits.append({"step": self.step, "where": where, "in_gradguard": f is not None,
                          "message": text.splitlines()[0][:160]})

    def __enter__(self):
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._show
        if self.cuda:
            self._prev = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode(self._prev)
        self._cm.__exit__(*exc)


class FlushProbe:
    """A do-nothing detector: detectors are fed the drained rows at every flush, so it
    notes the training step of each flush (the schedule is the guard's business)."""

    def __init__(self):
        self.current, self.flush_steps = -1, []

    def bind(self, guard):
        pass

    def update(self, steps, rows, guard):
        self.flush_steps.append(self.current)
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def section_p4g(b: Bench, cfg, steps, tmp) -> dict:
    model, opt, xb, yb = _train_setup(b, cfg, seed=1)
    flush_every = 32
    probe = FlushProbe()
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(1.0), log_dir=os.path.join(tmp, "p4"),
                     flush_every=flush_every, detectors=gg.default_detectors() + [probe])
    cuda = b.device.type == "cuda"
    with SyncCounter(cuda) as sc:
        for step in range(steps):
            sc.step = probe.current = step
            loss = _fwd_bwd(model, opt, xb, yb, b.device)
            guard.step(loss=loss)
        b.sync()
    probe.current = steps  # the flush in close() is no training step's
    guard.close()
    per_step = collections.Counter(h["step"] for h in sc.hits)
    gg_per_step = collections.Counter(h["step"] for h in sc.hits if h["in_gradguard"])
    frames = collections.Counter(h["where"] for h in sc.hits if h["step"] > 0)
    after0 = [per_step.get(s, 0) for s in range(1, steps)]
    flushes = sorted({s for s in probe.flush_steps if 0 <= s < steps})
    return {"flush_steps": flushes,
            "gradguard_syncs_outside_flushes_after_0": sum(
                n for s, n in gg_per_step.items() if s > 0 and s not in flushes),
            "gradguard_syncs_in_flushes": sum(n for s, n in gg_per_step.items() if s in flushes),"steps": steps, "flush_every": flush_every, "sync_debug_mode": cuda,
            "syncs_per_step": [per_step.get(s, 0) for s in range(steps)],
            "gradguard_syncs_per_step": [gg_per_step.get(s, 0) for s in range(steps)],
            "steps_after_0_with_syncs": [s for s in range(1, steps) if per_step.get(s, 0)],
            "syncs_after_step_0": sum(after0),
            "mean_syncs_per_step_after_0": sum(after0) / max(len(after0), 1),
            "frames_after_step_0": dict(frames.most_common()),
            "note": "" if cuda else "no CUDA: sync debug mode unavailable, counts are 0 by construction"}


# --------------------------------------------------------------------------- report
def env_info(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "gradguard": getattr(gg, "__version__", "?"), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    return info


def _md_p1g(r) -> list[str]:
    lines = [f"{r['tensors']} tensors, {r['params'] / 1e6:.1f}M parameters. Medians; ratios are "
             "medians of paired per-round ratios." + (f" {r['triton_note']}." if r.get("triton_note") else ""),
             ""]
    for dt, d in r["dtypes"].items():
        lines += [f"**{dt}** ({d['bytes'] / 1e6:.0f} MB of gradients)", "",
                  "| variant | ms | x one read | x clip_grad_norm_ | GB/s | vs targets |",
                  "|---|---:|---:|---:|---:|---|"]
        for n, row in d["rows"].items():
            tgt = ""
            if n in ("gg.grad_stats", "triton kernel alone"):
                tgt = (f"{verdict(row['x_one_read'], TARGET_VS_READ)} {TARGET_VS_READ}x read, "
                       f"{verdict(row['x_clip'], TARGET_VS_CLIP)} {TARGET_VS_CLIP}x clip")
            lines.append(f"| {n} | {fmt(row['median_ms'])} | {fmt(row['x_one_read'], 2)} | "
                         f"{fmt(row['x_clip'], 2)} | {fmt(row['GB_per_s'], 0)} | {tgt} |")
        lines.append("")
    return lines


def _md_p2g(r) -> list[str]:
    return (["Fresh gradients every call (cloned outside the timed region).", "",
             "| variant | ms | x torch |", "|---|---:|---:|"]
            + [f"| {n} | {fmt(row['median_ms'])} | {fmt(row['x_torch'], 2)} |" for n, row in r["rows"].items()]
            + [""])


def _md_p3g(r) -> list[str]:
    return ([f"bf16 autocast, batch {r['batch'][0]} x {r['batch'][1]}, fused AdamW; overhead = median "
             "of paired per-round (variant / plain - 1).", "",
             "| variant | step ms | overhead % |", "|---|---:|---:|"]
            + [f"| {n} | {fmt(row['median_ms'], 2)} | {fmt(row['overhead_pct'], 2)} |"
               for n, row in r["rows"].items()]
            + [""])


def _md_p4g(r) -> list[str]:
    lines = [f"Guard defaults with a store, fused AdamW, {r['steps']} steps, flush_every="
             f"{r['flush_every']}, `set_sync_debug_mode(\"warn\")`. {r['note']}", "",
             f"- syncs after step 0: **{r['syncs_after_step_0']}** "
             f"({fmt(r['mean_syncs_per_step_after_0'], 2)} per step), at steps "
             f"{r['steps_after_0_with_syncs'] or 'none'}",
             f"- gradguard syncs outside flush steps after step 0: "
             f"**{r['gradguard_syncs_outside_flushes_after_0']}** (target 0); in the flushes "
             f"(steps {r['flush_steps']}): {r['gradguard_syncs_in_flushes']}",
             f"- syncs per step: {r['syncs_per_step']}",
             f"- of which in gradguard's code: {r['gradguard_syncs_per_step']}"]
    if r["frames_after_step_0"]:
        lines += ["", "| where (after step 0) | count |", "|---|---:|"]
        lines += [f"| `{w}` | {c} |" for w, c in r["frames_after_step_0"].items()]
    return lines + [""]


SECTIONS_MD = {"P1g": ("gradient statistics, GPT-2-small shapes", _md_p1g),
               "P2g": ("guarded optimizer step vs clip_grad_norm_ + fused AdamW", _md_p2g),
               "P3g": ("overhead on a full GPT-2-small training step", _md_p3g),
               "P4g": ("host syncs per step", _md_p4g)}


def markdown(results: dict) -> str:
    e = results["env"]
    lines = ["## GPU", "",
             f"Machine: **{e['device_name']}** ({e['device']}); torch {e['torch']}, CUDA {e['cuda']}, "
             f"Triton {e['triton']}, Python {e['python']}; {e['date']}"
             + (" — **smoke run (tiny model on CPU): the numbers mean nothing**" if results.get("smoke") else ""),
             "", f"Targets: statistics <= {TARGET_VS_READ}x one read and <= {TARGET_VS_CLIP}x "
             "`clip_grad_norm_`; zero host syncs per step outside flushes.", ""]
    for name, r in results["sections"].items():
        title, render = SECTIONS_MD[name]
        lines += [f"### {name}: {title}", ""]
        if "skipped" in r:
            lines += [f"Skipped: {r['skipped']}", ""]
        elif "error" in r:
            lines += ["Failed:", "", "```", r["error"].rstrip(), "```", ""]
        else:
            try:
                lines += render(r)
            except Exception:  # noqa: BLE001 - a rendering bug must not lose the numbers
                lines += ["(could not render; see results.json)", "", "```", traceback.format_exc(), "```", ""]
    return "\n".join(lines)


def write(results: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(clean(results), f, indent=1)
    with open(os.path.join(out, "gpu_section.md"), "w") as f:
        f.write(markdown(results) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few reps, CPU (for tests)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 225; smoke 60)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--only", default="P1g,P2g,P3g,P4g", help="comma-separated sections")
    a = ap.parse_args(argv)

    t_start = time.monotonic()
    budget = a.budget if a.budget is not None else (60.0 if a.smoke else 225.0)
    if a.smoke:
        device, cfg = torch.device("cpu"), SMOKE
        reps, inner, reps3, warm3, steps4 = a.reps or 3, 2, a.reps or 3, 1, 6
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke for the CPU smoke test", file=sys.stderr)
            return 2
        device, cfg = torch.device("cuda"), FULL
        reps, inner, reps3, warm3, steps4 = a.reps or 30, 10, a.reps or 100, 5, 40  # P3g: +-1% noise at 20
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    b = Bench(device, t_start + budget)
    results = {"smoke": a.smoke, "budget_s": budget, "env": env_info(device), "config": cfg, "sections": {}}
    wanted = a.only.split(",")
    with tempfile.TemporaryDirectory(prefix="gg-bench-gpu-") as tmp:
        # (name, seconds that must be left to start it: a rough cost of one run, the run)
        plan = [("P1g", 20 * (not a.smoke), lambda: section_p1g(b, cfg, reps, inner)),
                ("P2g", 15 * (not a.smoke), lambda: section_p2g(b, cfg, reps)),
                ("P3g", 30 * (not a.smoke), lambda: section_p3g(b, cfg, reps3, warm3, tmp)),
                ("P4g", 15 * (not a.smoke), lambda: section_p4g(b, cfg, steps4, tmp))]
        for name, need, fn in plan:
            if name not in wanted:
                continue
            t0 = time.monotonic()
            if b.left() <= need:
                results["sections"][name] = {"skipped": f"time budget: {b.left():.0f}s left, needs ~{need}s"}
            else:
                try:
                    results["sections"][name] = fn()
                except Exception:  # noqa: BLE001 - record and go on to the next section
                    results["sections"][name] = {"error": traceback.format_exc()}
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            results["sections"][name]["seconds"] = round(time.monotonic() - t0, 2)
            results["elapsed_s"] = round(time.monotonic() - t_start, 2)
            write(results, a.out)
            print(f"{name}: {results['sections'][name]['seconds']}s"
                  + (" ERROR" if "error" in results["sections"][name] else ""), flush=True)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
