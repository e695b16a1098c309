"""PNG plots of the benchmark results (benchmarks/results/*.json -> docs/img/bench_*.png).

matplotlib is needed here only (``pip install matplotlib``); it is not a
gradguard dependency.

    python benchmarks/plot.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
IMG = HERE.parent / "docs" / "img"


def _load(name):
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def main() -> int:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py: matplotlib is not installed; no plots written", file=sys.stderr)
        return 1
    IMG.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title in (("detectors", "P3: overhead per GPT step (CPU)"),
                        ("peers", "P7: monitoring overhead per step vs peers (CPU)")):
        d = _load(name)
        if not d:
            continue
        vals = d["total"] if "total" in d else {k: v[0] for k, v in d["rows"].items()}
        vals = {k: v for k, v in vals.items() if k != "plain"}
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.32 * len(vals)))
        ax.barh(list(vals), list(vals.values()),
                color=["tab:green" if k.startswith("gradguard") else
                       "tab:blue" if k.startswith("floor") else "tab:gray" for k in vals])
        ax.invert_yaxis()
        ax.set_xlabel("% of a plain training step (median)")
        ax.set_title(title)
        fig.tight_layout()
        out = IMG / f"bench_{name}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    s = _load("scaling")
    if s:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        if s["tensors"]:
            n, st, cl = zip(*s["tensors"])
            axes[0].loglog(n, st, "o-", label="gg grad_stats")
            axes[0].loglog(n, cl, "s--", label="torch clip_grad_norm_")
            axes[0].set_xlabel("tensors (10M parameters)")
        if s["params"]:
            p, st, cl, rd = zip(*s["params"])
            axes[1].loglog(p, st, "o-", label="gg grad_stats")
            axes[1].loglog(p, cl, "s--", label="torch clip_grad_norm_")
            axes[1].loglog(p, rd, ":", label="one read")
            axes[1].set_xlabel("parameters (100 tensors)")
        if s["flush"]:
            fe, med, mean = zip(*s["flush"])
            axes[2].semilogx(fe, mean, "o-", label="guard.step mean")
            axes[2].semilogx(fe, med, "s--", label="guard.step median")
            axes[2].set_xlabel("flush_every (steps)")
        for ax in axes:
            ax.set_ylabel("ms")
            ax.legend(fontsize=7)
        fig.suptitle("How gradguard's costs grow (CPU)")
        fig.tight_layout()
        out = IMG / "bench_scaling.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
