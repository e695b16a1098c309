"""``gradguard bench``: run the benchmark scripts in ``benchmarks/`` and collect their tables.

Each suite is a script in the repository's ``benchmarks/`` folder (they are
not installed with the package: run this from a source checkout, or pass
``--dir``).  Every suite measures A/B interleaved and quotes medians; with
``--write`` each script replaces its own section of ``docs/benchmarks.md``.

Example:
    gradguard bench --suite detectors peers --write docs/benchmarks.md
    gradguard bench detection            # precision/recall on the labelled corpus of runs
    gradguard bench detection --rebuild  # train the corpus again first (~190 s on 2 cores)
    gradguard bench rescue               # faults injected into runs: who recovers (~10 min)
    gradguard bench rescue --smoke       # the same grid, 1 seed and short runs (seconds)
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["add_arguments", "run", "SUITES"]

# suite -> script (in order of a full run)
SUITES = {
    "overhead": "bench_overhead.py",     # P1/P2 (core)
    "detectors": "bench_detectors.py",   # P3
    "peers": "bench_peers.py",           # P7
    "scaling": "bench_scaling.py",       # cost growth
    "store": "bench_store.py",           # P5
    # detection quality on a labelled corpus of realistic runs (a source checkout: the
    # corpus trains models, it is a developer tool, like every suite here)
    "detection": "detection/run.py",
    # faults injected into small runs: recovered by no guard / clipping / ZClip / remedies="auto"
    "rescue": "rescue_faults/run.py",
}


def _default_dir() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (base / "benchmarks" / "bench_detectors.py").exists():
            return base / "benchmarks"
    return Path.cwd() / "benchmarks"


def add_arguments(parser) -> None:
    parser.add_argument("what", nargs="?", choices=["detection", "rescue"], default=None,
                        help="'detection': score the detectors on the labelled corpus "
                             "(benchmarks/detection); 'rescue': inject faults into small runs and "
                             "score who recovers (benchmarks/rescue_faults)")
    parser.add_argument("--rebuild", action="store_true",
                        help="with 'detection': train the corpus again before scoring")
    parser.add_argument("--smoke", action="store_true", help="with 'rescue': 1 seed, short runs")
    parser.add_argument("--suite", nargs="+", choices=list(SUITES), default=None,
                        help="suites to run (default: overhead detectors peers scaling)")
    parser.add_argument("--dir", default=None, help="folder holding the benchmark scripts")
    parser.add_argument("--write", default=None, metavar="MD",
                        help="markdown file whose sections the suites replace (e.g. docs/benchmarks.md)")
    parser.add_argument("--plot", action="store_true", help="write docs/img/bench_*.png (needs matplotlib)")


def run(args) -> int:
    """Run the chosen suites one after another; returns the number of failed suites (0 = all ok)."""
    folder = Path(args.dir) if args.dir else _default_dir()
    if not folder.is_dir():
        print(f"gradguard bench: no benchmarks folder at {folder}; pass --dir", file=sys.stderr)
        return 2
    if getattr(args, "what", None) == "detection":
        script = folder / SUITES["detection"]
        if not script.exists():
            print(f"gradguard bench: {script} not found; pass --dir", file=sys.stderr)
            return 2
        return subprocess.call([sys.executable, str(script)] + (["--rebuild"] if args.rebuild else []))
    if getattr(args, "what", None) == "rescue":
        script = folder / SUITES["rescue"]
        if not script.exists():
            print(f"gradguard bench: {script} not found; pass --dir", file=sys.stderr)
            return 2
        extra = ["--smoke"] if getattr(args, "smoke", False) else []
        extra += ["--write", args.write] if args.write else []
        extra += ["--plot"] if args.plot else []
        return subprocess.call([sys.executable, str(script)] + extra)
    suites = args.suite or ["overhead", "detectors", "peers", "scaling"]
    failed = 0
    for name in suites:
        script = folder / SUITES[name]
        if not script.exists():
            print(f"gradguard bench: {script} not found, skipped", file=sys.stderr)
            failed += 1
            continue
        takes_write = "--write" in script.read_text()
        cmd = [sys.executable, str(script)] + (["--write", args.write] if args.write and takes_write else [])
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        rc = subprocess.call(cmd)
        failed += rc != 0
    if args.plot:
        failed += subprocess.call([sys.executable, str(folder / "plot.py")]) != 0
    return failed
