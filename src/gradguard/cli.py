"""The ``gradguard`` command line: one subcommand per concern.

Each subcommand lives in its own module exposing ``add_arguments(parser)``
and ``run(args) -> int``; modules are imported only when their subcommand
runs (the dashboard's web stack is not loaded for ``gradguard demo``).  A
subcommand whose extra is not installed stops with one line naming the
extra and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from ._extras import MissingExtra

__all__ = ["main", "SUBCOMMANDS"]

# name -> (module, help).  The module must define add_arguments() and run().
SUBCOMMANDS = {
    "demo": ("gradguard.tools.demo", "train a task unguarded and guarded, side by side"),
    "dashboard": ("gradguard.dashboard", "serve the live dashboard over a log dir"),
    "report": ("gradguard.report", "write a self-contained HTML report of a run"),
    "diagnose": ("gradguard.tools.diagnose", "check a model's gradient flow before training"),
    "replay": ("gradguard.tools.replay", "re-run a flight-recorder dump under anomaly detection"),
    "bench": ("gradguard.tools.bench", "run the overhead benchmark suite"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradguard",
                                     description="Watch, explain and fix exploding/vanishing gradients.")
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    try:
        for name, (module, help_) in SUBCOMMANDS.items():
            p = sub.add_parser(name, help=help_)
            if name == chosen:
                mod = importlib.import_module(module)
                mod.add_arguments(p)
                p.set_defaults(_run=mod.run)
        args = parser.parse_args(argv)
        return int(args._run(args) or 0)
    except MissingExtra as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
