"""Score detectors on the stored corpus (``corpus.py``) by replaying each run's rows.

Replaying is exact: detectors never change a run, and any chunking of the rows gives the same
events (tests/test_detect.py); the built-in ``nonfinite`` event is rebuilt from each poisoned
row the way the guard builds it.  Rows are replayed in chunks of 64 (the corpus's flush size).

Metrics (a "flag" is an event of severity warning or critical):

- recall: diverging runs (no injected fault) with a flag no later than ``WITHIN`` steps after
  the loss left its early range;
- lead time: divergence step minus the step the first such flag was raised at (median; a weight
  jump dated back to where it happened counts from the measuring step that saw it; over all diverging runs
  and over the gradual ones: more than 5 steps between the loss's last visit at or below its
  first value and the divergence);
- false warnings per 10,000 healthy steps, and healthy runs with any flag;
- injected faults: the first flag within [onset - 1, onset + WITHIN]: culprit top-1 (its first
  layer belongs to the culprit's module) and onset error (|step - onset| <= 1);
- vanishing runs with a ``vanishing`` event;
- NaN/Inf faults: the producer the guard's first ``nonfinite`` event names (``data["origin"]``): the
  corpus passes ``guard.step(loss, rerun=...)``, re-run on poisoned steps only (``producer`` in the meta).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

WITHIN = 25
CHUNK = 64
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "detection"


def load_events(tag: str) -> dict:
    """The events of a saved evaluation (``evaluate(..., tag)``), by run id."""
    with gzip.open(RESULTS / f"events_{tag}.json.gz", "rt") as f:
        return json.load(f)


def load_runs(folder: Path = RESULTS / "runs") -> list[dict]:
    runs = []
    for f in sorted(folder.glob("*.npz")):
        z = np.load(f)
        meta = json.loads(str(z["meta"]))
        runs.append({**meta, "steps_arr": z["steps"], "rows": z["rows"]})
    return runs


def run_info(meta: dict):
    from gradguard.layout import RunInfo
    r = meta["run"]
    return RunInfo(tuple(r["names"]), tuple(tuple(s) for s in r["shapes"]), tuple(r["trainable"]),
                   dict(r["owner"]), frozenset(r["module_types"]), int(r["param_norm_every"]),
                   np.asarray(r["init_layer_norms"], np.float64),
                   tuple(r.get("buffers", ())), tuple(r.get("buffer_inputs", ())))  # runs from before buffers: none


def replay(run: dict, make_detectors) -> list[dict]:
    """The events a guard with ``make_detectors()`` would have given on this run (as dicts)."""
    from gradguard.detect import nonfinite_event
    from gradguard.events import add_events
    from gradguard.layout import COL

    info = run_info(run)
    dets = make_detectors()
    for d in dets:
        d.bind(info)
    steps, rows = run["steps_arr"], run["rows"]
    # the producer the live guard's nonfinite event named (guard.step(rerun=...), the NaN/Inf faults)
    prod = dict(run.get("producer") or {})
    origins = {prod.pop("step"): prod} if prod.get("param") else {}
    events = []
    for a in range(0, len(steps), CHUNK):
        s, r = steps[a:a + CHUNK], rows[a:a + CHUNK]
        new = [nonfinite_event(int(s[i]), info, r[i], amp=bool(run.get("amp")), origin=origins.get(int(s[i])))
               for i in np.flatnonzero(r[:, COL["bad"]] > 0)]
        for d in dets:
            new += d.update(s, r, info)
        add_events(events, new)  # as the guard keeps them: in step order, cause first
    # "known": the step whose rows raised the event (a weight jump is dated back to where it most
    # likely happened, but raised at the measuring step that saw it: ``seen_at``)
    return [{"step": e.step, "known": e.seen_at, "kind": e.kind,
             "severity": e.severity, "layers": list(e.layers[:3]), "message": e.message,
             "count": (e.data or {}).get("count", 1)} for e in events]


def _module(name: str | None) -> str | None:
    return None if name is None else name.rpartition(".")[0]


def score_run(run: dict, events: list[dict]) -> dict:
    flags = [e for e in events if e["severity"] in ("warning", "critical")]
    out = {"id": run["id"], "family": run["family"], "label": run["label"], "fault": run["fault"],
           "held_out": run["held_out"], "steps": run["steps"], "n_flags": len(flags),
           "first_flag": flags[0]["step"] if flags else None,
           "first_kind": flags[0]["kind"] if flags else None}
    if run["fault"]:
        t0 = run["onset"]
        hit = next((e for e in flags if t0 - 1 <= e["step"] <= t0 + WITHIN), None)
        out["fault_flag"] = hit is not None
        out["onset_err"] = None if hit is None else hit["step"] - t0
        if run["fault"] in ("nan_grad", "inf_forward"):
            prod = run.get("producer") or {}
            out["producer_ok"] = _module(prod.get("param")) == _module(run["culprit"])
        if run["culprit"] is not None:
            top = hit["layers"][0] if hit and hit["layers"] else None
            out["culprit_ok"] = top is not None and _module(top) == _module(run["culprit"])
            out["named"] = top
    elif run["label"] == "diverging":
        d = run["diverge_step"]
        known = sorted(e.get("known", e["step"]) for e in flags)  # a lead counts from when it was known
        hit = [k for k in known if k <= d + WITHIN]
        out["caught"] = bool(hit)
        out["lead"] = d - hit[0] if hit else None
        out["gradual"] = run["gradual"]
    elif run["label"] == "vanishing":
        out["caught"] = any(e["kind"] == "vanishing" for e in events)
    return out


def summarize(scores: list[dict]) -> dict:
    div = [s for s in scores if s["label"] == "diverging" and not s["fault"]]
    hea = [s for s in scores if s["label"] == "healthy" and not s["fault"]]
    fau = [s for s in scores if s["fault"]]
    cul = [s for s in fau if "culprit_ok" in s]
    leads = [s["lead"] for s in div if s["caught"]]
    gleads = [s["lead"] for s in div if s["caught"] and s["gradual"]]
    van = [s for s in scores if s["label"] == "vanishing" and not s["fault"]]
    hsteps = sum(s["steps"] for s in hea)

    def frac(a, b):
        return None if not b else a / b
    return {
        "runs": len(scores), "diverging": len(div), "healthy": len(hea), "faults": len(fau),
        "vanishing": len(van),
        "recall": frac(sum(s["caught"] for s in div), len(div)),
        "lead_median": float(np.median(leads)) if leads else None,
        "lead_gradual_median": float(np.median(gleads)) if gleads else None, "gradual": sum(
            1 for s in div if s["gradual"]),
        "healthy_flagged": sum(s["n_flags"] > 0 for s in hea),
        "false_per_10k": 1e4 * sum(s["n_flags"] for s in hea) / hsteps if hsteps else None,
        "healthy_steps": hsteps,
        "fault_flagged": frac(sum(s["fault_flag"] for s in fau), len(fau)),
        "culprit_top1": frac(sum(s["culprit_ok"] for s in cul), len(cul)),
        "onset_pm1": frac(sum(s["onset_err"] is not None and abs(s["onset_err"]) <= 1 for s in fau), len(fau)),
        "vanishing_caught": frac(sum(s["caught"] for s in van), len(van)),
        "producer_ok": frac(sum(s["producer_ok"] for s in fau if "producer_ok" in s),
                            sum("producer_ok" in s for s in fau)),
        "nan_faults": sum("producer_ok" in s for s in fau),
    }


def table(scores: list[dict], title: str) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    def num(x, f="{:.1f}"):
        return "-" if x is None else f.format(x)
    head = ("| runs | recall (div) | lead med (gradual) | healthy flagged | false /10k steps | "
            "faults: culprit top-1 | onset ±1 | vanishing caught |")
    lines = [f"**{title}**", "", "| family " + head, "|---" * 9 + "|"]
    fams = sorted({s["family"] for s in scores})
    for name, sub in [(f, [s for s in scores if s["family"] == f]) for f in fams] + [("**all**", scores)]:
        m = summarize(sub)
        lines.append(
            f"| {name} | {m['runs']} | {pct(m['recall'])} of {m['diverging']} | "
            f"{num(m['lead_median'], '{:g}')} ({num(m['lead_gradual_median'], '{:g}')}, n={m['gradual']}) | "
            f"{m['healthy_flagged']} of {m['healthy']} | {num(m['false_per_10k'])} | "
            f"{pct(m['culprit_top1'])} | {pct(m['onset_pm1'])} of {m['faults']} | {pct(m['vanishing_caught'])} |")
    return "\n".join(lines)


def evaluate(runs, make_detectors, tag: str, write: bool = True) -> dict:
    events = {r["id"]: replay(r, make_detectors) for r in runs}
    scores = [score_run(r, events[r["id"]]) for r in runs]
    res = {"tag": tag, "scores": scores,
           "all": summarize(scores),
           "tuning": summarize([s for s in scores if not s["held_out"]]),
           "held_out": summarize([s for s in scores if s["held_out"]])}
    if write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        # gzip: a dead run has one nonfinite event per step; mtime 0: the same events, the same bytes
        data = json.dumps(events, separators=(",", ":")).encode()
        (RESULTS / f"events_{tag}.json.gz").write_bytes(gzip.compress(data, mtime=0))
        (RESULTS / f"summary_{tag}.json").write_text(json.dumps(res, indent=1))
    return res


def compare_table(tags=("before", "after")) -> str:
    """Overall metrics of saved summaries side by side: tuning half, held-out half, all."""
    res = {t: json.loads((RESULTS / f"summary_{t}.json").read_text()) for t in tags}
    rows = [("diverging runs flagged within %d steps (recall)" % WITHIN,
             lambda m: f"{100 * m['recall']:.0f}% of {m['diverging']}"),
            ("median lead time, all diverging (steps)", lambda m: f"{m['lead_median']:g}"),
            ("median lead time, gradual divergence (steps)",
             lambda m: f"{m['lead_gradual_median']:g} (n={m['gradual']})"),
            ("healthy runs with a warning/critical event",
             lambda m: f"{m['healthy_flagged']} of {m['healthy']}"),
            ("false warnings per 10,000 healthy steps",
             lambda m: f"{m['false_per_10k']:.1f} ({m['healthy_steps']} steps)"),
            ("injected faults flagged within [onset-1, onset+%d]" % WITHIN,
             lambda m: f"{100 * m['fault_flagged']:.0f}% of {m['faults']}"),
            ("injected faults: culprit top-1", lambda m: f"{100 * m['culprit_top1']:.0f}%"),
            ("injected faults: onset within ±1 step", lambda m: f"{100 * m['onset_pm1']:.0f}%"),
            ("vanishing runs with a vanishing event", lambda m: f"{100 * m['vanishing_caught']:.0f}%"),
            ("NaN/Inf faults: producer named (guard.step(rerun=))",
             lambda m: f"{100 * m['producer_ok']:.0f}% of {m['nan_faults']}")]
    parts = ("tuning", "held_out", "all")
    head = "| metric | " + " | ".join(f"{t}: {p.replace('_', '-')}" for t in tags for p in parts) + " |"
    lines = [head, "|---" * (1 + len(tags) * len(parts)) + "|"]
    for name, f in rows:
        cells = []
        for t in tags:
            for p in parts:
                if name.startswith("NaN/Inf") and t == "before":
                    cells.append("- (no NanOrigin)")
                    continue
                try:
                    cells.append(f(res[t][p]))
                except (TypeError, KeyError):
                    cells.append("-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
