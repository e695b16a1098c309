"""Rescue benchmark: faults injected into ordinary runs, and what each guard makes of them.

Grid: 3 architectures x (5 faults + none) x seeds x 4 methods, CPU only.

- architectures: ``cnn`` (2 conv + BatchNorm, SGD-momentum, the packaged 8x8 digits),
  ``gru`` (a GRU reading the digits' 8 rows, Adam), ``gpt`` (a 2-layer character transformer
  LM, AdamW, sequences from a fixed order-1 Markov chain).
- faults, at mid-run (step ``steps // 2``): ``nan`` (the loss is NaN on two batches),
  ``corrupt`` (one batch with inputs x100 and shuffled labels), ``lr`` (learning rate x100
  for 5 steps), ``weight`` (one weight set to 1e4), ``inf`` (5 steps whose gradients overflow
  to inf).
- methods: ``none`` (no guard), ``clip`` (``GlobalNorm(1.0)`` + skip), ``zclip``
  (``adaptive.ZClip()`` + skip), ``auto`` (``remedies="auto"``, no clipping), ``autoclip``
  (``remedies="auto"`` + ``GlobalNorm(1.0)``: clipping is not implied by "auto").

Metric: final held-out loss against the same method and seed without the fault; a faulted run
is *recovered* when that loss is finite and at most 2% above.  Interventions (rollbacks,
learning-rate changes, held or skipped steps) are counted on the runs without a fault.

    python benchmarks/rescue_faults/run.py              # full grid, 2 processes, ~25 min
    python benchmarks/rescue_faults/run.py --smoke      # one seed, short runs (seconds)
    python benchmarks/rescue_faults/run.py --write docs/benchmarks.md --plot
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "rescue_faults.json"
SHORT = OUT.parent / "rescue_faults_300.json"  # the grid with 300-step runs, kept for comparison
ARCHS = ("cnn", "gru", "gpt")
FAULTS = ("none", "nan", "corrupt", "lr", "weight", "inf")
METHODS = ("none", "clip", "zclip", "auto", "autoclip")
TOL = 0.02  # recovered: final held-out loss within 2% of the fault-free run
# Run lengths: the digits CNN and the character transformer as long as in the runs that showed the
# problem (800 and 400 steps); the GRU reads the same digits as the CNN.  The fault is at mid-run.
STEPS = {"cnn": 800, "gru": 800, "gpt": 400}


def steps_of(cfg_steps, arch) -> int:
    """A run's length from a config's ``steps``: one number for every architecture, or a table."""
    return cfg_steps[arch] if isinstance(cfg_steps, dict) else int(cfg_steps)


# ----------------------------------------------------------------------------- tasks
class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 10))

    def forward(self, x):
        return self.body(x[:, None])


class GRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(8, 32, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class GPT(nn.Module):
    """Two pre-norm transformer blocks over characters, causal."""

    def __init__(self, vocab=16, d=32, ctx=16, layers=2):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(ctx, d))
        layer = nn.TransformerEncoderLayer(d, 2, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.mask = nn.Transformer.generate_square_subsequent_mask(ctx)

    def forward(self, x, scale=1.0):
        h = (self.tok(x) + self.pos[: x.shape[1]]) * scale
        return self.head(self.norm(self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)))


def _digits(split):
    from gradguard.tools.tasks.digits import load_digits
    return load_digits(split)


class Task:
    """A model factory, an optimizer, a batch sampler, a loss and a held-out set."""

    def __init__(self, arch, steps):
        self.arch, self.steps = arch, steps
        if arch == "gpt":
            g = torch.Generator().manual_seed(123)
            self.p = torch.softmax(torch.randn(16, 16, generator=g) * 2.5, 1)
            self.test = self._markov(256, torch.Generator().manual_seed(7))
        else:
            self.x, self.y = _digits("train")
            self.test = _digits("test")

    def _markov(self, n, g, length=17):
        x = torch.empty(n, length, dtype=torch.long)
        x[:, 0] = torch.randint(0, 16, (n,), generator=g)
        for t in range(1, length):
            x[:, t] = torch.multinomial(self.p[x[:, t - 1]], 1, generator=g)[:, 0]
        return x[:, :-1], x[:, 1:]

    def model(self):
        return {"cnn": CNN, "gru": GRU, "gpt": GPT}[self.arch]()

    def optimizer(self, model):
        if self.arch == "cnn":
            return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if self.arch == "gru":
            return torch.optim.Adam(model.parameters(), lr=2e-2)
        return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

    def batch(self, g):
        if self.arch == "gpt":
            return self._markov(16, g)
        i = torch.randint(0, len(self.y), (32,), generator=g)
        return self.x[i], self.y[i]

    def loss(self, model, x, y, scale=1.0):
        if self.arch == "gpt":
            return F.cross_entropy(model(x, scale).flatten(0, 1), y.flatten())
        return F.cross_entropy(model(x * scale), y)

    @torch.no_grad()
    def held_out(self, model):
        model.eval()
        loss = float(self.loss(model, *self.test))
        model.train()
        return loss


# ----------------------------------------------------------------------------- one run
def make_guard(method, model, opt):
    import gradguard as gg
    if method == "none":
        return None
    if method == "default":  # the default guard (detectors, skip, no remedies): the overhead reference
        return gg.Guard(model, opt)
    if method == "clip":
        return gg.Guard(model, opt, clip=gg.GlobalNorm(1.0), detectors=[])
    if method == "zclip":
        from gradguard.adaptive import ZClip
        return gg.Guard(model, opt, clip=ZClip(), detectors=[])
    if method == "autoclip":  # the autopilot with the clipping the "clip" method uses
        return gg.Guard(model, opt, clip=gg.GlobalNorm(1.0), remedies="auto")
    return gg.Guard(model, opt, remedies="auto")


def train(arch, fault, method, seed, steps, task=None):
    """One run; returns its final held-out loss and what the guard did."""
    task = task or Task(arch, steps)
    torch.manual_seed(seed)
    model = task.model()
    opt = task.optimizer(model)
    guard = make_guard(method, model, opt)
    # the learning rate decays to 1% (a chainable scheduler: the LR fault and the autopilot's
    # back-off multiply the current rate and compose with it); a run that anneals ends near its
    # minimum, so the final loss measures the damage, not where the noise left it
    sched = torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda _: 0.01 ** (1 / steps))
    g = torch.Generator().manual_seed(1000 + seed)
    at = steps // 2
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            x, y = task.batch(g)  # the data stream is the same whatever the fault
            scale = 1.0
            if fault == "corrupt" and step == at:
                scale, y = 100.0, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]
            if fault == "lr" and step in (at, at + 5):
                for group in opt.param_groups:
                    group["lr"] = group["lr"] * (100.0 if step == at else 0.01)
            if fault == "weight" and step == at:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = 1e4
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, x, y, scale)
            if fault == "nan" and step in (at, at + 1):
                loss = loss * float("nan")
            loss.backward()
            if fault == "inf" and at <= step < at + 5:
                with torch.no_grad():
                    next(model.parameters()).grad.view(-1)[0] = float("inf")
            if guard is None:
                opt.step()
            else:
                guard.step(loss=loss)
            sched.step()
    wall = time.perf_counter() - t0
    out = {"arch": arch, "fault": fault, "method": method, "seed": seed, "loss": task.held_out(model),
           "wall_s": wall, "skipped": 0, "interventions": 0, "rollbacks": 0, "alarm": None}
    if guard is not None:
        try:
            guard.close()
        except Exception as exc:  # the autopilot's escalation, raised at the last flush
            out["alarm"] = str(exc)[:200]
        out["skipped"] = int(guard._skipped)
        ap = [a for a in guard.remedies.actions if type(a).__name__ == "Autopilot"]
        if ap:
            out["interventions"] = ap[0].interventions
            out["rollbacks"] = ap[0].rollbacks
            out["rescues"] = [e.message[:160] for e in guard.events if e.kind == "rescue"]
        out["events"] = [(e.step, e.kind, e.severity, e.data.get("actions")) for e in guard.events
                         if e.step >= at - 2]
    return out


def overhead(archs, steps, reps):
    """Per-step wall time of healthy runs, default guard vs remedies="auto", interleaved A/B."""
    out = {}
    for arch in archs:
        task = Task(arch, steps)
        times = {"default": [], "auto": []}
        for r in range(reps):
            for m in ("default", "auto") if r % 2 == 0 else ("auto", "default"):
                times[m].append(1e3 * train(arch, "none", m, 0, steps, task)["wall_s"] / steps)
        out[arch] = {m: {"median_ms": sorted(v)[len(v) // 2], "min_ms": min(v), "max_ms": max(v),
                         "reps": len(v), "steps": steps} for m, v in times.items()}
    return out


def _job(spec):
    torch.set_num_threads(1)
    arch, fault, method, seed, steps = spec
    try:
        return train(arch, fault, method, seed, steps)
    except Exception as exc:  # GuardAlarm from the autopilot: the run stopped
        return {"arch": arch, "fault": fault, "method": method, "seed": seed, "loss": math.nan,
                "wall_s": 0.0, "skipped": 0, "interventions": 0, "rollbacks": 0,
                "alarm": f"{type(exc).__name__}: {str(exc)[:200]}"}


# ----------------------------------------------------------------------------- scoring
def score(runs):
    """Per method: recovered faulted runs, per fault and arch; interventions on fault-free runs."""
    ref = {(r["arch"], r["method"], r["seed"]): r["loss"] for r in runs if r["fault"] == "none"}
    table = {}
    for r in runs:
        if r["fault"] == "none":
            continue
        base = ref.get((r["arch"], r["method"], r["seed"]))
        ok = base is not None and math.isfinite(r["loss"]) and r["loss"] <= base * (1 + TOL)
        r["recovered"] = bool(ok)
        r["ratio"] = r["loss"] / base if base and math.isfinite(r["loss"]) else None
        r["within5"] = bool(base is not None and math.isfinite(r["loss"]) and r["loss"] <= base * 1.05)
        cell = table.setdefault(r["method"], {}).setdefault(f"{r['arch']}/{r['fault']}", [0, 0])
        cell[0] += ok
        cell[1] += 1
    summary = {}
    for m, cells in table.items():
        rec = sum(c[0] for c in cells.values())
        tot = sum(c[1] for c in cells.values())
        clean = [r for r in runs if r["method"] == m and r["fault"] == "none"]
        faulted = [r for r in runs if r["method"] == m and r["fault"] != "none"]
        summary[m] = {"recovered": rec, "faulted": tot, "rate": rec / tot if tot else None,
                      "within5": sum(r["within5"] for r in faulted),
                      "by_arch": {a: [sum(c[0] for k, c in cells.items() if k.startswith(a + "/")),
                                      sum(c[1] for k, c in cells.items() if k.startswith(a + "/"))]
                                  for a in ARCHS if any(k.startswith(a + "/") for k in cells)},
                      "by_fault": {f: [sum(c[0] for k, c in cells.items() if k.endswith("/" + f)),
                                       sum(c[1] for k, c in cells.items() if k.endswith("/" + f))]
                                   for f in FAULTS[1:]},
                      "clean_runs": len(clean),
                      "clean_interventions": sum(r["interventions"] for r in clean),
                      "clean_skipped": sum(r["skipped"] for r in clean)}
    return summary


LABELS = {"none": "no guard", "clip": "GlobalNorm(1.0) + skip", "zclip": "ZClip + skip",
          "auto": 'remedies="auto"', "autoclip": 'remedies="auto" + GlobalNorm(1.0)'}


def markdown(res) -> str:
    s, cfg = res["summary"], res["config"]
    lines = ["<!-- rescue_faults: written by benchmarks/rescue_faults/run.py -->",
             "## Rescue on faults (`gradguard bench rescue`)", "",
             f"{len(cfg['archs'])} architectures (CNN + BatchNorm + SGD-momentum on digits, GRU + Adam "
             f"on digits rows, 2-layer char transformer + AdamW) x 5 faults at mid-run ("
             + ", ".join(f"{a}: step {steps_of(cfg['steps'], a) // 2} of {steps_of(cfg['steps'], a)}"
                         for a in cfg["archs"])
             + f") x {cfg['seeds']} seeds; a faulted run is recovered when its final "
             f"held-out loss is within 2% of the same method and seed without the fault. "
             + (res.get("wall_note") or f"Measured on 2 CPU cores in {res['wall_s']:.0f} s."), "",
             "| method | recovered (within 2%) | within 5% | " + " | ".join(FAULTS[1:]) + " | "
             + " | ".join(ARCHS) + " | interventions on fault-free runs |",
             "|---|---|---|" + "---|" * (len(FAULTS[1:]) + len(ARCHS)) + "---|"]
    for m in METHODS:
        if m not in s:
            continue
        r = s[m]
        by = " | ".join(f"{a}/{b}" for a, b in (r["by_fault"][f] for f in FAULTS[1:]))
        by += " | " + " | ".join(f"{a}/{b}" for a, b in (r["by_arch"].get(x, [0, 0]) for x in ARCHS))
        iv = (f"{r['clean_interventions']} ({r['clean_skipped']} steps withheld) in {r['clean_runs']} runs"
              if m.startswith("auto") else "-")
        lines.append(f"| {LABELS[m]} | {r['recovered']}/{r['faulted']} ({100 * r['rate']:.0f}%) | "
                     f"{r['within5']}/{r['faulted']} | {by} | {iv} |")
    for m in ("auto", "autoclip"):
        missed = [r for r in res["runs"] if r["method"] == m and r["fault"] != "none" and not r.get("recovered")]
        if m not in s:
            continue
        rolled = [r for r in missed if r["rollbacks"]]
        ratios = [r["ratio"] for r in rolled if r.get("ratio")]
        idle = [r for r in missed if not r["rollbacks"]]
        tune = [r for r in res["runs"] if r["method"] == m and r["fault"] != "none" and r["seed"] <= 2]
        held = [r for r in res["runs"] if r["method"] == m and r["fault"] != "none" and r["seed"] > 2]
        text = (f"{LABELS[m]}: {sum(r.get('recovered', False) for r in tune)}/{len(tune)} recovered on seeds "
                f"0-2 (the seeds its settings were chosen on)"
                + (f", {sum(r.get('recovered', False) for r in held)}/{len(held)} on seeds 3-{cfg['seeds'] - 1}"
                   if held else "") + f". It misses {len(missed)} faulted run{'s' if len(missed) != 1 else ''}")
        if rolled:
            text += (f"; {len(rolled)} of them were rolled back and end {min(ratios, default=0):.3f}-"
                     f"{max(ratios, default=0):.3f}x the fault-free loss (a rollback discards the updates "
                     "from the snapshot, at most an 8-step CPU flush before the fault, to the flush that "
                     "confirms it)")
        late = []  # rolled back to a state that already held the fault's first updates
        for r in rolled:
            acts = [a for e in r.get("events", []) if e[1] == "rescue" for a in (e[3] or [])]
            after = [int(a.split("after step ")[1].split(";")[0]) for a in acts[:1] if "after step " in a]
            if after and after[0] >= steps_of(cfg["steps"], r["arch"]) // 2:
                late.append(f"{r['arch']}/{r['fault']} seed {r['seed']} ({r['ratio']:.3f}x, to the state after "
                            f"step {after[0]})")
        if late:
            text += ("; rolled back to a snapshot taken after the fault (at a quiet flush before the loss "
                     "rose): " + ", ".join(late))
        if idle:
            text += (f"; {len(idle)} had no rollback: "
                     + ", ".join(f"{r['arch']}/{r['fault']} seed {r['seed']} ({r['ratio']:.3f}x)" if r.get("ratio")
                                 else f"{r['arch']}/{r['fault']} seed {r['seed']}" for r in idle)
                     + " (the fault left a smaller mark on the loss than any detector's or the autopilot's threshold)")
        lines += ["", text + "."]
    oh = res.get("overhead")
    if oh:
        reps = next(iter(oh.values()))["default"].get("reps", 5)  # (results before "reps" was stored: 5)
        lines += ["", f"Per-step wall time on healthy runs (single process, {reps} interleaved runs of "
                  f"{next(iter(oh.values()))['default'].get('steps', 300)} steps, median [min-max] ms, forward and backward included): "
                  + "; ".join(f"{a}: default guard {v['default']['median_ms']:.2f} [{v['default']['min_ms']:.2f}-"
                              f"{v['default']['max_ms']:.2f}], auto {v['auto']['median_ms']:.2f} "
                              f"[{v['auto']['min_ms']:.2f}-{v['auto']['max_ms']:.2f}] "
                              f"({100 * (v['auto']['median_ms'] / v['default']['median_ms'] - 1):+.0f}%)"
                              for a, v in oh.items())
                  + "."]
    short = res.get("short")
    if short:
        ss = short["summary"]
        lines += ["", f"The same grid with {short['config']['steps']}-step runs (every architecture; fault at "
                  f"step {short['config']['steps'] // 2}), from `{SHORT.relative_to(ROOT)}`: "
                  + ", ".join(f"{LABELS[m]} {ss[m]['recovered']}/{ss[m]['faulted']} within 2% "
                              f"({ss[m]['within5']}/{ss[m]['faulted']} within 5%)" for m in METHODS if m in ss)
                  + ". " + (short.get("wall_note") or "")
                  + " A GRU run there ends about 0.2% worse per lost update: two skipped NaN batches cost it "
                    "0.4-0.8%."]
    lines += ["", "![recovered by fault](img/bench_rescue_faults.png)"]
    return "\n".join(lines) + "\n"


def write_section(md_path: Path, text: str) -> None:
    """Replace this benchmark's section (from its marker to the next "## " heading), or append it."""
    tag = "<!-- rescue_faults:"
    old = md_path.read_text() if md_path.exists() else ""
    if tag not in old:
        md_path.write_text(old.rstrip("\n") + "\n\n" + text)
        return
    head, rest = old.split(tag, 1)
    end = rest.find("\n## ", rest.find("## Rescue on faults") + 5)
    md_path.write_text(head + text + ("\n" + rest[end + 1:] if end >= 0 else ""))


def plot(res, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = res["summary"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    shown = [m for m in METHODS if m in s]
    width = 0.8 / len(shown)
    for i, m in enumerate(shown):
        rates = [s[m]["by_fault"][f][0] / max(s[m]["by_fault"][f][1], 1) for f in FAULTS[1:]]
        ax.bar([j + (i - (len(shown) - 1) / 2) * width for j in range(len(FAULTS) - 1)], rates, width,
               label=LABELS[m])
    ax.set_xticks(range(len(FAULTS) - 1), FAULTS[1:])
    ax.set_ylabel("recovered (within 2%)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=len(shown), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.set_title("Faulted runs recovered, by fault (3 architectures x seeds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="1 seed, 60 steps, no files written")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None,
                    help="steps of every run (default: " + ", ".join(f"{a} {n}" for a, n in STEPS.items()) + ")")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--faults", nargs="+", default=list(FAULTS), choices=FAULTS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--from-json", action="store_true",
                    help="write the section and plot from the stored results, without training")
    ap.add_argument("--overhead", type=int, default=0, metavar="REPS",
                    help="only time healthy steps, default guard vs auto, REPS interleaved runs per arch")
    ap.add_argument("--out", default=None, help=f"results JSON (default {OUT.relative_to(ROOT)})")
    ap.add_argument("--write", default=None, metavar="MD", help="replace this section of a markdown file")
    ap.add_argument("--plot", action="store_true", help="write docs/img/bench_rescue_faults.png")
    args = ap.parse_args(argv)
    seeds = 1 if args.smoke else args.seeds
    steps = 60 if args.smoke else (args.steps or dict(STEPS))
    oh_path = OUT.parent / "rescue_faults_overhead.json"
    if args.from_json:
        res = json.loads((Path(args.out) if args.out else OUT).read_text())
        if oh_path.exists():
            res["overhead"] = json.loads(oh_path.read_text())
        if SHORT.exists():
            res["short"] = json.loads(SHORT.read_text())
        print(markdown(res))
        if args.write:
            write_section(Path(args.write), markdown(res))
        if args.plot:
            plot(res, ROOT / "docs" / "img" / "bench_rescue_faults.png")
        return 0
    if args.overhead:
        torch.set_num_threads(1)
        res = overhead(args.archs, args.steps or 300, args.overhead)
        print(json.dumps(res, indent=1))
        if not args.smoke:
            oh_path.write_text(json.dumps(res, indent=1))
        return 0
    faults = args.faults if "none" in args.faults else ["none"] + args.faults
    specs = [(a, f, m, s, steps_of(steps, a)) for a in args.archs for f in faults for m in args.methods
             for s in range(seeds)]
    t0 = time.perf_counter()
    if args.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            runs = pool.map(_job, specs, chunksize=1)
    else:
        runs = [_job(s) for s in specs]
    res = {"config": {"archs": args.archs, "faults": faults, "methods": args.methods, "seeds": seeds,
                      "steps": steps, "tol": TOL},
           "wall_s": time.perf_counter() - t0, "summary": score(runs), "runs": runs}
    print(markdown(res))
    if args.smoke:
        return 0
    out = Path(args.out) if args.out else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    if args.write:
        write_section(Path(args.write), markdown(res))
    if args.plot:
        plot(res, ROOT / "docs" / "img" / "bench_rescue_faults.png")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
