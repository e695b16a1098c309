"""docs/img/detection.png: the demo's explosion as the detectors see it, and before/after metrics.

    python benchmarks/detection/plot.py   (after run.py --tag before / --tag after)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main(run_id="rnn_tanh.demo_lr1.s0", out=ROOT / "docs" / "img" / "detection.png"):
    from gradguard.layout import COL

    res = {t: json.loads((metrics.RESULTS / f"summary_{t}.json").read_text()) for t in ("before", "after")}
    ev = {t: metrics.load_events(t) for t in ("before", "after")}
    run = next(r for r in metrics.load_runs() if r["id"] == run_id)
    rows, steps = run["rows"], run["steps_arr"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    n = min(len(steps), 60)
    a.semilogy(steps[:n], rows[:n, COL["loss"]], label="loss")
    a.semilogy(steps[:n], rows[:n, COL["global_norm"]], label="global grad norm")
    a.axhline(3 * rows[0, COL["loss"]], color="grey", ls=":", lw=1, label="3x first loss (label)")
    a.axvline(run["diverge_step"], color="k", ls="--", lw=1, label=f"diverges (step {run['diverge_step']})")
    for t, c in (("before", "tab:red"), ("after", "tab:green")):
        flags = [e for e in ev[t][run_id] if e["severity"] in ("warning", "critical") and e["step"] < n]
        if flags:
            f = flags[0]
            known = f.get("known", f["step"])  # raised there, dated where it began (older files: no "known")
            when = f"step {known}" if known == f["step"] else f"step {known}, dated {f['step']}"
            a.axvline(known, color=c, lw=2, label=f"{t}: first warning, {when} ({f['kind']})")
        else:
            a.plot([], [], color=c, lw=2, label=f"{t}: no warning before step {n}")
    a.set_title("gradguard demo, unguarded (tanh RNN, SGD lr 1)")
    a.set_xlabel("step")
    a.legend(fontsize=7)
    keys = [("recall", "recall (div.)"), ("healthy_ok", "healthy runs\nwith no warning"),
            ("culprit_top1", "fault culprit\ntop-1"), ("onset_pm1", "fault onset\n±1 step")]
    x = np.arange(len(keys))
    for i, (t, part) in enumerate([("before", "tuning"), ("before", "held_out"), ("after", "tuning"), ("after", "held_out")]):
        m = dict(res[t][part])
        m["healthy_ok"] = 1 - m["healthy_flagged"] / max(m["healthy"], 1)
        vals = [m[k] or 0 for k, _ in keys]
        b.bar(x + (i - 1.5) * 0.2, vals, 0.2, label=f"{t}, {part.replace('_', '-')}",
              color=["#f4a3a3", "#d62728", "#98df8a", "#2ca02c"][i])
    b.set_xticks(x, [k[1] for k in keys], fontsize=8)
    b.set_ylim(0, 1.05)
    b.set_title(f"corpus of {res['after']['all']['runs']} runs: before / after the redesign")
    b.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
