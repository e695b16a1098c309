"""``gradguard bench``: run the benchmark scripts in ``benchmarks/`` and collect their tables.

Each suite is a script in the repository's ``benchmarks/`` folder (they are
not installed with the package: run this from a source checkout, or pass
``--dir``).  Every suite measures A/B interleaved and quotes medians; with
``--write`` each script replaces its own section of ``docs/benchmarks.md``.

Example:
    gradguard bench --suite detectors peers --write docs/benchmarks.md
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
}


def _default_dir() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (base / "benchmarks" / "bench_detectors.py").exists():
            return base / "benchmarks"
    return Path.cwd() / "benchmarks"


def add_arguments(parser) -> None:
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
