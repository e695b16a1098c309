"""``gradguard dashboard [LOG_DIR]``: a live web page over a log dir of runs (default
``./gradguard-runs``, where ``gradguard demo`` writes).

The server (``server.py``) is a read-only JSON API over ``RunStore`` plus one
static page (``static/``) that draws with Plotly.js, vendored in ``static/``,
so it works offline.  The web stack is imported only when
the command runs.
"""
from __future__ import annotations

import sys

from .._extras import require

__all__ = ["add_arguments", "run", "WEB_MODULES", "DEFAULT_LOG_DIR"]

WEB_MODULES = ("starlette", "uvicorn")  # what the [dashboard] extra installs
# The one default: `gradguard demo` writes here, `gg.watch`'s docs use it, the dashboard serves it.
DEFAULT_LOG_DIR = "gradguard-runs"


def add_arguments(parser) -> None:
    parser.add_argument("log_dir", nargs="?", default=DEFAULT_LOG_DIR,
                        help="directory of runs written by Guard(log_dir=...) or `gradguard demo` "
                             f"(default: ./{DEFAULT_LOG_DIR})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1: only this machine can connect); "
                             "anything else needs --allow-remote")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow binding beyond loopback. The dashboard has no authentication: "
                             "anyone who can reach the port reads every run (names, configs, "
                             "statistics). Prefer an SSH tunnel (ssh -L 6060:127.0.0.1:6060 HOST)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="an extra Host header to accept (e.g. the name clients use to reach "
                             "this machine); repeatable. This machine's own names are accepted")
    parser.add_argument("--port", type=int, default=6060, help="TCP port (default 6060; 0 picks a free one)")


def run(args) -> int:
    require("gradguard dashboard", "dashboard", *WEB_MODULES)
    from .server import LOOPBACK, allowed_hosts_for, serve

    if not 0 <= args.port <= 65535:
        raise SystemExit(f"--port must be in 0..65535, got {args.port}")
    if args.host not in LOOPBACK:
        if not args.allow_remote:
            print(f"gradguard dashboard: --host {args.host} would let other machines read every run "
                  "of the log dir, and the dashboard has no authentication. Pass --allow-remote to do "
                  "it anyway, or keep the default 127.0.0.1 and use an SSH tunnel "
                  "(ssh -L 6060:127.0.0.1:6060 HOST).", file=sys.stderr)
            return 2
        print(f"gradguard dashboard: WARNING: serving on {args.host} without authentication; anyone "
              "who can reach this port can read every run. Accepted Host headers: "
              + ", ".join(allowed_hosts_for(args.host, args.allowed_host)), file=sys.stderr, flush=True)
    serve(args.log_dir, host=args.host, port=args.port, allowed_hosts=args.allowed_host)
    return 0
