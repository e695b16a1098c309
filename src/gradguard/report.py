"""``gradguard report RUN [RUN ...] -o report.html``: one self-contained HTML file.

The file holds Plotly.js (the bundle the dashboard serves), the
dashboard's own page code and the runs' data as JSON, so it shows the same
figures as the dashboard (zoomable, events clickable, runs overlaid in every
panel) with no server and no network: "guarded vs unguarded" in one file to
attach to a bug report or a paper.
"""
from __future__ import annotations

import json
import re
import sys
import time
from urllib.parse import quote
from pathlib import Path

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


def _compare_html(infos: list[dict], store: RunStore) -> str:
    """One row per run: what differs at a glance (status, steps, skipped, events, first event)."""
    from html import escape

    rows = []
    for info in infos:
        events = store.events(info["name"])
        worst = next((e for e in events if e.severity == "critical"), events[0] if events else None)
        first = (f"step {worst.step} · {escape(worst.kind)}: {escape(worst.message)}" if worst else "none")
        rows.append(f'<tr><td class="name">{escape(info["name"])}</td><td>{escape(info["status"])}</td>'
                    f'<td class="num">{info["rows"]}</td><td class="num">{info.get("skipped", 0)}</td>'
                    f'<td class="num">{len(events)}</td><td>{first}</td></tr>')
    return ('<section class="layers" id="compare-summary"><h2>Runs compared</h2><table><thead><tr>'
            "<th>run</th><th>status</th><th>steps</th><th>skipped steps</th><th>events</th>"
            f"<th>leading event (first critical, else first)</th></tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


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


def write_report(log_dir, run, out, max_points: int = 4000) -> Path:
    """Write ``out`` (HTML) for one run or several runs of ``log_dir``.

    Args:
        log_dir: directory of runs.
        run: run name, or a list of run names (shown overlaid, first one primary).
        out: output file path.
        max_points: points per series (min/max downsampled beyond that), >= 2.
    Returns:
        the output path.

    Example:
        >>> write_report("gradguard-runs", ["unguarded", "guarded"], "report.html")
    """
    names = [run] if isinstance(run, str) else list(run) if isinstance(run, (list, tuple)) else []
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"run must be a run name or a non-empty list of run names, got {run!r}")
    names = list(dict.fromkeys(names))
    if not isinstance(max_points, int) or max_points < 2:
        raise ValueError(f"max_points must be an integer >= 2, got {max_points!r}")

    store = RunStore(log_dir)
    infos = [store.info(n) for n in names]   # raises RunNotFound for unknown runs
    listed = {r["name"]: r for r in api_payload(store, "runs")}
    data = {"api/runs": [listed[n] for n in names if n in listed], "report": {"runs": names}}
    for name in names:
        q = "api/runs/" + quote(name, safe="")   # as the page's encodeURIComponent spells it
        data.update({q + "/steps": api_payload(store, "steps", name, max_points=max_points),
                     q + "/heatmap": api_payload(store, "heatmap", name, max_points=min(max_points, 800)),
                     q + "/layers": api_payload(store, "layers", name),
                     q + "/events": api_payload(store, "events", name)})
    for i in infos:
        i["skipped"] = listed.get(i["name"], {}).get("skipped", 0)
    page = (STATIC / "index.html").read_text()
    page = page.replace('<link rel="stylesheet" href="static/app.css">',
                        "<style>" + (STATIC / "app.css").read_text() + "</style>")
    page = page.replace('<script src="static/plotly.min.js"></script>',
                        "<script>" + _script_safe(_plotly_js().read_text(encoding="utf-8")) + "</script>")
    page = page.replace('<script src="static/app.js"></script>',
                        '<script type="application/json" id="gg-data">' + _script_json(data) +
                        "</script><script>" + _script_safe((STATIC / "app.js").read_text()) + "</script>")
    page = page.replace("<title>gradguard dashboard</title>", "<title>gradguard report</title>")
    summary = (_compare_html(infos, store) if len(infos) > 1 else "") + \
        "".join(_summary_html(i, store.events(i["name"])) for i in infos)
    page = page.replace("</main>", summary + "</main>")
    out = Path(out)
    out.write_text(page, encoding="utf-8")
    return out


def add_arguments(parser) -> None:
    parser.add_argument("run", nargs="+",
                        help="run directories (LOG_DIR/RUN, all in one LOG_DIR), or run names with "
                             "--log-dir; several runs are overlaid in every panel")
    parser.add_argument("-o", "--output", default="report.html", help="output HTML file (default report.html)")
    parser.add_argument("--log-dir", default=None, help="directory of runs (default: RUN's parent)")
    parser.add_argument("--max-points", type=int, default=4000, help="points per series (default 4000)")


def run(args) -> int:
    if args.log_dir is None:
        paths = [Path(r).resolve() for r in args.run]
        parents = sorted({str(p.parent) for p in paths})
        if len(parents) > 1:
            print("gradguard report: the runs must be in one log dir, got " + ", ".join(parents)
                  + " (or pass run names with --log-dir)", file=sys.stderr)
            return 2
        log_dir, names = Path(parents[0]), [p.name for p in paths]
    else:
        log_dir, names = Path(args.log_dir), list(args.run)
    try:
        out = write_report(log_dir, names, args.output, args.max_points)
    except (RunNotFound, RunUnreadable, ValueError) as e:  # one line, not a traceback: the store is the problem
        print(f"gradguard report: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"gradguard report: cannot write {args.output}: {e}", file=sys.stderr)
        return 2
    print(f"gradguard report: wrote {out}")
    return 0
