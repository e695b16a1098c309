"""``gradguard bench detection``: score the detectors on the labelled corpus of realistic runs.

    python benchmarks/detection/run.py            # replay the stored runs (seconds)
    python benchmarks/detection/run.py --rebuild  # train the corpus again first (~190 s on 2 cores)

Prints, per family and overall, for all runs, the tuning half (seed 0) and the held-out half
(seed 1): recall on diverging runs, lead time, false warnings on healthy runs, culprit and
onset accuracy on injected faults.  Results: ``benchmarks/results/detection/``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
import metrics  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="train the corpus again")
    ap.add_argument("--jobs", type=int, default=2, help="processes for --rebuild")
    ap.add_argument("--tag", default=None,
                    help="write events_<tag>.json and summary_<tag>.json (e.g. 'after'); default: print only")
    args = ap.parse_args(argv)
    if args.rebuild or not any((metrics.RESULTS / "runs").glob("*.npz")):
        t = time.perf_counter()
        corpus.build(args.jobs)
        print(f"corpus trained in {time.perf_counter() - t:.0f} s", flush=True)
    from gradguard.detect import default_detectors

    runs = metrics.load_runs()
    t = time.perf_counter()
    res = metrics.evaluate(runs, default_detectors, args.tag or "current", write=args.tag is not None)
    print(f"{len(runs)} runs replayed in {time.perf_counter() - t:.1f} s\n")
    for part in ("all", "tuning", "held_out"):
        sub = [s for s in res["scores"] if part == "all" or s["held_out"] == (part == "held_out")]
        print(metrics.table(sub, {"all": "all runs", "tuning": "tuning half (seed 0)",
                                  "held_out": "held out (seed 1)"}[part]))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
