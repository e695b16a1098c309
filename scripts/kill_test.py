"""SIGKILL a training process that is writing its run store, many times, and check the store.

Runs tests/test_faults.py::test_sigkill_while_logging with GRADGUARD_KILL_REPEATS
(default here: 50) kills at random moments.  Each kill must leave a store that
opens, passes PRAGMA integrity_check and holds every committed step.

    .venv/bin/python scripts/kill_test.py            # 50 kills
    .venv/bin/python scripts/kill_test.py 200 --seed 7
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("repeats", nargs="?", type=int, default=50, help="number of kills (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("repeats must be >= 1")
    env = dict(os.environ, GRADGUARD_KILL_REPEATS=str(args.repeats), GRADGUARD_KILL_SEED=str(args.seed))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_faults.py") + "::test_sigkill_while_logging"]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
