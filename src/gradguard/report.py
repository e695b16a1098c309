"""``gradguard report RUN -o report.html``: one self-contained HTML file per run.

The file holds Plotly.js (from the installed ``plotly`` package), the
dashboard's own page code and the run's data as JSON, so it shows the same
figures as the dashboard (zoomable, events clickable) with no server and no
network: something to attach to a bug report or a paper.
"""
from __future__ import annotations

import json
import re
import sys
import time
from urllib.parse import quote
from pathlib import Path

from ._extras import require
from .dashboard.server import STATIC, _plotly_js, api_payload
from .record import RunNotFound, RunStore, RunUnreadable
from ._json import json_safe

__all__ = ["write_report", "add_arguments", "run"]


def _script_safe(js: str) -> str:
    # Nothing inside a <script> may close it early ("<\/" means "</" in JS strings and regexes).
    return re.sub(r"<(/script|!--)", lambda m: "<\\" + m.group(1), js, flags=re.IGNORECASE)


def _script_json(data) -> str:
    """``data`` (API answers, already JSON-safe) as JSON that can sit inside a <script> element."""
    # allow_nan=False: a stray NaN is an error here, not invalid JSON in the page.
    # In JSON "<" only occurs inside strings, where \u003c is the same character.
    return json.dumps(data, allow_nan=False).replace("<", "\\u003c")


def _summary_html(info: dict, events) -> str:
    from html import escape

    kinds: dict[str, int] = {}
    for e in events:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    advice: list[str] = []
    for e in events:
        for a in e.advice:
            if a not in advice:
                advice.append(a)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["start_time"])) if info["start_time"] else "?"
    config = json.dumps(json_safe(info["config"]), default=str)
    rows = "".join(f"<li>{escape(k)}: {n}</li>" for k, n in sorted(kinds.items())) or "<li>none</li>"
    tips = "".join(f"<li>{escape(a)}</li>" for a in advice[:10]) or "<li>none</li>"
    return (f'<section class="layers"><h2>Summary of run {escape(info["name"])}</h2>'
            f'<p>started {escape(started)} · status {escape(info["status"])} · steps {info["rows"]} · '
            f'events {len(events)}</p><p>config: <code>{escape(config)}</code></p>'
            f'<h2>Events by kind</h2><ul>{rows}</ul><h2>Advice</h2><ol>{tips}</ol></section>')


def write_report(log_dir, run: str, out, max_points: int = 4000) -> Path:
    """Write ``out`` (HTML) for ``run`` of ``log_dir``.

    Args:
        log_dir: directory of runs.
        run: run name.
        out: output file path.
        max_points: points per series (min/max downsampled beyond that).
    Returns:
        the output path.

    Example:
        >>> write_report("runs", "20250101-120000", "report.html")
    """
    require("gradguard report", "dashboard", "plotly")

    store = RunStore(log_dir)
    info = store.info(run)          # raises RunNotFound for unknown runs
    q = "api/runs/" + quote(run, safe="")   # as the page's encodeURIComponent spells it
    data = {"api/runs": api_payload(store, "runs"),
            q + "/steps": api_payload(store, "steps", run, max_points=max_points),
            q + "/heatmap": api_payload(store, "heatmap", run, max_points=min(max_points, 800)),
            q + "/layers": api_payload(store, "layers", run),
            q + "/events": api_payload(store, "events", run)}
    data["api/runs"] = [r for r in data["api/runs"] if r["name"] == run]
    page = (STATIC / "index.html").read_text()
    page = page.replace('<link rel="stylesheet" href="static/app.css">',
                        "<style>" + (STATIC / "app.css").read_text() + "</style>")
    page = page.replace('<script src="static/plotly.min.js"></script>',
                        "<script>" + _script_safe(_plotly_js().read_text(encoding="utf-8")) + "</script>")
    page = page.replace('<script src="static/app.js"></script>',
                        '<script type="application/json" id="gg-data">' + _script_json(data) +
                        "</script><script>" + _script_safe((STATIC / "app.js").read_text()) + "</script>")
    page = page.replace("<title>gradguard dashboard</title>", "<title>gradguard report</title>")
    page = page.replace("</main>", _summary_html(info, store.events(run)) + "</main>")
    out = Path(out)
    out.write_text(page, encoding="utf-8")
    return out


def add_arguments(parser) -> None:
    parser.add_argument("run", help="run directory (LOG_DIR/RUN), or a run name with --log-dir")
    parser.add_argument("-o", "--output", default="report.html", help="output HTML file (default report.html)")
    parser.add_argument("--log-dir", default=None, help="directory of runs (default: RUN's parent)")
    parser.add_argument("--max-points", type=int, default=4000, help="points per series (default 4000)")


def run(args) -> int:
    if args.log_dir is None:
        path = Path(args.run).resolve()
        log_dir, name = path.parent, path.name
    else:
        log_dir, name = Path(args.log_dir), args.run
    try:
        out = write_report(log_dir, name, args.output, args.max_points)
    except (RunNotFound, RunUnreadable) as e:  # one line, not a traceback: the store is the problem
        print(f"gradguard report: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"gradguard report: cannot write {args.output}: {e}", file=sys.stderr)
        return 2
    print(f"gradguard report: wrote {out}")
    return 0
