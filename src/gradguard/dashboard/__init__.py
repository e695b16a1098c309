"""``gradguard dashboard [LOG_DIR]``: a live web page over a log dir of runs.

The server (``server.py``) is a read-only JSON API over ``RunStore`` plus one
static page (``static/``) that draws with Plotly.js served from the installed
``plotly`` package, so it works offline.  The web stack is imported only when
the command runs.
"""
from __future__ import annotations

from .._extras import require

__all__ = ["add_arguments", "run", "WEB_MODULES"]

WEB_MODULES = ("starlette", "uvicorn", "plotly")  # what the [dashboard] extra installs


def add_arguments(parser) -> None:
    parser.add_argument("log_dir", nargs="?", default="runs",
                        help="directory of runs written by Guard(log_dir=...) (default: ./runs)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1: only this machine can connect)")
    parser.add_argument("--port", type=int, default=6060, help="TCP port (default 6060; 0 picks a free one)")


def run(args) -> int:
    require("gradguard dashboard", "dashboard", *WEB_MODULES)
    from .server import serve

    if not 0 <= args.port <= 65535:
        raise SystemExit(f"--port must be in 0..65535, got {args.port}")
    serve(args.log_dir, host=args.host, port=args.port)
    return 0
