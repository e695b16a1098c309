"""The dashboard's HTTP side: a read-only JSON API over ``RunStore`` and the page.

Routes (all GET):
    /                              the page
    /static/{app.js,app.css}       the page's code
    /static/plotly.min.js          plotly.js's cartesian bundle, vendored (static/PLOTLY_LICENSE)
    /api/info                      ``{"log_dir": absolute path}``: the page says what it serves
    /api/runs                      ``RunStore.runs()`` plus ``skipped`` (skipped steps)
    /api/runs/{run}/steps          ``?start=&end=&max_points=`` global series
    /api/runs/{run}/heatmap        ``?start=&end=&max_points=`` per-layer norms (log10)
    /api/runs/{run}/layers         ``RunStore.layer_summary()``
    /api/runs/{run}/events         events with messages and advice

Unknown runs and anything that is not a run of the log dir answer 404; a run
whose store cannot be read (not SQLite, truncated, newer schema) answers 409
with the reason, and is listed by ``/api/runs`` with status ``unreadable``.
``max_points`` is capped on the server (``MAX_STEPS_POINTS``, and
``MAX_HEAT_CELLS`` points x layers for the heatmap): one request cannot make
the server build an answer of hundreds of MB.
JSON has no NaN/Inf.  The plotted series (steps, heatmap) send a non-finite
value as ``null``, which Plotly draws as a gap (the NaN/Inf steps are marked
separately).  Everything else (runs, layers, events) follows the package's
convention (``gradguard._json.json_safe``): ``"NaN"``, ``"Inf"``, ``"-Inf"``.
Before, those answers sent ``null`` too; the page reads both forms.
"""
from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np

from .._extras import require
from .._json import json_safe
from ..record import RunNotFound, RunStore, RunUnreadable

__all__ = ["create_app", "serve", "start_server", "api_payload", "STATIC", "LOOPBACK",
           "MAX_STEPS_POINTS", "MAX_HEAT_CELLS", "allowed_hosts_for"]

STATIC = Path(__file__).parent / "static"
STEPS_POINTS = 2000
HEAT_POINTS = 400
MAX_STEPS_POINTS = 20_000       # ~1 MB of JSON per series column; the page asks for 2000
MAX_HEAT_CELLS = 1_000_000      # heatmap points x layers
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _plotly_js() -> Path:
    """Plotly.js: its "cartesian" partial bundle (scatter, heatmap, shapes: all the page draws),
    1.5 MB against the full bundle's 4.8 MB, so the page and a report load ~3x less script."""
    return STATIC / "plotly.min.js"


def _series(a: np.ndarray) -> list:
    """A plotted float array -> list with None (a gap in the plot) for NaN/Inf."""
    a = np.asarray(a, dtype=np.float64)
    out = a.astype(object)
    out[~np.isfinite(a)] = None
    return out.tolist()  # numpy, no host sync


def _int_arg(params, name):
    v = params.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {v!r}") from None


_SKIPPED: dict = {}   # (log dir, run, rows, last_step) -> skipped steps: a finished run is read once


def _with_skipped(store: RunStore, runs: list[dict]) -> list[dict]:
    for r in runs:
        if r["status"] == "unreadable":
            r["skipped"] = 0
            continue
        key = (str(store.root), r["name"], r["rows"], r["last_step"])
        n = _SKIPPED.get(key)   # requests run on a thread pool: one lookup, never key-then-index
        if n is None:
            if len(_SKIPPED) > 4096:
                _SKIPPED.clear()
            try:
                n = store.skipped_steps(r["name"])
            except (RunNotFound, RunUnreadable):
                n = 0
            _SKIPPED[key] = n
        r["skipped"] = n
    return runs


def api_payload(store: RunStore, kind: str, run: str | None = None, start=None, end=None,
                max_points=None):
    """The JSON-ready answer of one API route (shared by the server and the report)."""
    if kind == "runs":
        return json_safe(_with_skipped(store, store.runs()))
    if kind == "info":
        return {"log_dir": str(Path(store.root).resolve())}
    if kind == "steps":
        s = store.steps(run, start, end, min(max_points or STEPS_POINTS, MAX_STEPS_POINTS))
        return {k: (v.tolist() if k == "step" else _series(v)) for k, v in s.items()}
    if kind == "heatmap":
        cap = max(2, MAX_HEAT_CELLS // max(1, len(store.layers(run))))
        h = store.layer_norms(run, start, end, min(max_points or HEAT_POINTS, cap))
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log10(h["norm"].astype(np.float64))
        return {"step": h["step"].tolist(), "step_hi": h["step_hi"].tolist(),
                "layers": [l["name"] for l in store.layers(run)],
                "log10_norm": _series(z.T), "nonfinite": h["nonfinite"].T.astype(int).tolist()}
    if kind == "layers":
        return json_safe(store.layer_summary(run))
    if kind == "events":
        return json_safe([e.to_dict() for e in store.events(run, start, end)])
    raise ValueError(f"unknown API route {kind!r}")


def create_app(log_dir, allowed_hosts: list[str] | None = None):
    """The Starlette app serving ``log_dir`` read-only.

    Args:
        log_dir: directory of runs.
        allowed_hosts: Host headers accepted (DNS-rebinding guard); None: any.
    Returns:
        a Starlette application.
    """
    require("the gradguard dashboard", "dashboard", "starlette")
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    store = RunStore(log_dir)
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
    files = {"app.js": (STATIC / "app.js", "text/javascript"), "app.css": (STATIC / "app.css", "text/css"),
             "plotly.min.js": (_plotly_js(), "text/javascript")}

    def index(request):
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=headers)

    def static(request):
        name = request.path_params["name"]
        if name not in files:  # a fixed set: no path from the URL reaches the disk
            return PlainTextResponse("not found", 404, headers=headers)
        path, media = files[name]
        return FileResponse(path, media_type=media, headers={**headers, "Cache-Control": "max-age=3600"})

    def api(kind):
        def endpoint(request):
            q = request.query_params
            try:
                body = api_payload(store, kind, request.path_params.get("run"), _int_arg(q, "start"),
                                   _int_arg(q, "end"), _int_arg(q, "max_points"))
            except RunNotFound:
                return JSONResponse({"error": "run not found"}, 404, headers=headers)
            except RunUnreadable as e:
                return JSONResponse({"error": str(e)}, 409, headers=headers)
            except (ValueError, TypeError) as e:
                return JSONResponse({"error": str(e)}, 400, headers=headers)
            return JSONResponse(body, headers=headers)
        return endpoint

    routes = [Route("/", index), Route("/favicon.ico", lambda r: Response(status_code=204)), Route("/static/{name}", static), Route("/api/runs", api("runs")),
              Route("/api/info", api("info"))]
    routes += [Route(f"/api/runs/{{run}}/{k}", api(k)) for k in ("steps", "heatmap", "layers", "events")]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []
    return Starlette(routes=routes, middleware=middleware)


def allowed_hosts_for(host: str, extra=()) -> list[str]:
    """Host headers accepted for a server bound to ``host`` (a DNS-rebinding guard, on for every
    bind): the loopback names, and for a wider bind this machine's names and addresses, the bound
    address itself and ``extra`` (``--allowed-host``)."""
    names = ["127.0.0.1", "localhost", "[::1]", "::1"]
    if host not in LOOPBACK:
        if host not in ("0.0.0.0", "::", ""):
            names.append(host)
        for n in (socket.gethostname(), socket.getfqdn()):
            names.append(n)
            try:
                names += [a[4][0] for a in socket.getaddrinfo(n, None)]
            except OSError:
                pass
    names += [str(e) for e in extra]
    return list(dict.fromkeys(n for n in names if n))


def _allowed_hosts(host: str, extra=()) -> list[str]:
    return allowed_hosts_for(host, extra)


class DashboardServer:
    """A uvicorn server on a background thread (tests, notebooks). ``.url``, ``.stop()``."""

    def __init__(self, server, thread, sock):
        self._server, self._thread, self._sock = server, thread, sock
        host, port = sock.getsockname()[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def _server(log_dir, host, port, allowed_hosts=()):
    require("the gradguard dashboard", "dashboard", "starlette", "uvicorn")
    import uvicorn

    sock = _bind(host, port)
    config = uvicorn.Config(create_app(log_dir, _allowed_hosts(host, allowed_hosts)), log_level="warning",
                            access_log=False, lifespan="off")
    return uvicorn.Server(config), sock


def start_server(log_dir, host: str = "127.0.0.1", port: int = 0, allowed_hosts=()) -> DashboardServer:
    """Serve ``log_dir`` on a thread; port 0 picks a free port. Returns a ``DashboardServer``.

    Example:
        >>> srv = start_server("gradguard-runs"); print(srv.url); srv.stop()
    """
    import time

    server, sock = _server(log_dir, host, port, allowed_hosts)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    return DashboardServer(server, thread, sock)


def serve(log_dir, host: str = "127.0.0.1", port: int = 6060, allowed_hosts=()) -> None:
    """Serve until interrupted (what ``gradguard dashboard`` runs)."""
    server, sock = _server(log_dir, host, port, allowed_hosts)
    h, p = sock.getsockname()[:2]
    print(f"gradguard dashboard: http://{h}:{p}/  (log dir {Path(log_dir).resolve()}; Ctrl+C stops)",
          flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
