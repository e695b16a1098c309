"""Dashboard: the JSON API on a real uvicorn server, the page in real headless Chromium."""
from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.dashboard.server import start_server
from gradguard.guard import GLOBAL_COLS
from gradguard.record import RunStore, open_recorder

from conftest import new_page, open_page as _open

EVIL = "<img src=x onerror=alert(1)>"


class IRNN(torch.nn.Module):
    """ReLU RNN with a scaled-identity recurrence (Le et al. 2015): explodes for scale > 1."""

    def __init__(self, hidden=32, scale=1.25):
        super().__init__()
        self.inp = torch.nn.Linear(2, hidden)
        self.rec = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, 1)
        with torch.no_grad():
            self.rec.weight.copy_(scale * torch.eye(hidden))
            self.rec.bias.zero_()

    def forward(self, x):
        h = torch.zeros(x.shape[0], self.rec.out_features)
        for t in range(x.shape[1]):
            h = torch.relu(self.inp(x[:, t]) + self.rec(h))
        return self.out(h).squeeze(-1)


def adding_batch(n, T, gen):
    """Pascanu's adding problem: sum the two marked numbers of a sequence."""
    x = torch.zeros(n, T, 2)
    x[:, :, 0] = torch.rand(n, T, generator=gen)
    idx = torch.stack([torch.randint(0, T // 2, (n,), generator=gen),
                       torch.randint(T // 2, T, (n,), generator=gen)], 1)
    x[torch.arange(n)[:, None], idx, 1] = 1.0
    return x, (x[:, :, 0] * x[:, :, 1]).sum(1)


def train_irnn(log_dir, run_name, clip, steps=60, T=20, lr=0.05, hidden=16, batch=16):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = IRNN(hidden)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    guard = gg.Guard(model, opt, clip=clip, log_dir=log_dir, run_name=run_name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny model: threads only contend
    try:
        for _ in range(steps):
            x, y = adding_batch(batch, T, gen)
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            guard.step(loss=loss)
    finally:
        torch.set_num_threads(threads)
    guard.close()
    return guard


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    train_irnn(d, "unguarded", None)
    train_irnn(d, "guarded", gg.GlobalNorm(1.0))
    # A run with a hostile layer name, as if a user named a parameter that way.
    rec = open_recorder(d, run_name="evil", layers=[{"name": EVIL, "shape": [2], "order": 0},
                                                    {"name": "ok.weight", "shape": [2, 2], "order": 1}])
    rows = np.ones((20, len(GLOBAL_COLS) + 6), np.float32)
    rec.write_steps(np.arange(20), rows, GLOBAL_COLS)
    rec.write_events([gg.Event(5, "spike", "warning", [EVIL], f"spike in {EVIL}", [f"clip {EVIL}"],
                               {"x": math.nan}),
                      gg.Event(9, "rescue", "warning", [], "autopilot: loss rise at step 6",
                               data={"trigger_step": 6, "actions": [f"rolled back {EVIL}", "learning rate x0.5"]})])
    rec.close()
    return d


def test_api_serves_the_store(server, log_dir):
    store = RunStore(log_dir)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        runs = c.get("/api/runs").json()
        assert [r["name"] for r in runs] == [r["name"] for r in store.runs()]
        assert {r["name"] for r in runs} == {"unguarded", "guarded", "evil"}
        steps = c.get("/api/runs/guarded/steps").json()
        ref = store.steps("guarded", max_points=2000)
        assert steps["step"] == ref["step"].tolist()
        np.testing.assert_allclose(np.array(steps["global_norm"], float), ref["global_norm"], rtol=1e-6)
        un = c.get("/api/runs/unguarded/steps", params={"max_points": 10}).json()
        assert len(un["step"]) <= 10
        loss = np.array([np.nan if v is None else v for v in c.get("/api/runs/unguarded/steps").json()["loss"]])
        assert np.isnan(loss).any() == (~np.isfinite(store.steps("unguarded")["loss"])).any()
        heat = c.get("/api/runs/guarded/heatmap", params={"start": 10, "end": 30}).json()
        assert heat["layers"] == [l["name"] for l in store.layers("guarded")]
        assert heat["step"] == list(range(10, 31))
        assert len(heat["log10_norm"]) == len(heat["layers"]) and len(heat["log10_norm"][0]) == 21
        ref_h = store.layer_norms("guarded", 10, 30)["norm"]
        np.testing.assert_allclose(np.array(heat["log10_norm"], float).T, np.log10(ref_h), rtol=1e-5)
        ev = c.get("/api/runs/evil/events").json()
        assert ev[0]["layers"] == [EVIL] and ev[0]["data"]["x"] == "NaN"     # valid JSON, the kind kept
        assert c.get("/api/runs/evil/layers").json()[0]["name"] == EVIL
        assert c.get("/api/runs/guarded/steps", params={"start": "x"}).status_code == 400
        page = c.get("/")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        js = c.get("/static/plotly.min.js")
        assert js.status_code == 200 and len(js.content) > 1_000_000    # the real, local Plotly
        assert c.get("/", headers={"Host": "evil.example"}).status_code == 400   # DNS rebinding


@pytest.mark.parametrize("path", [
    "/api/runs/../steps", "/api/runs/..%2F..%2Fetc/steps", "/api/runs/%2e%2e/steps",
    "/api/runs/..%5C..%5Cx/events", "/api/runs/nope/steps", "/api/runs/.hidden/layers",
    "/static/..%2F..%2Frecord%2Fstore.py", "/static/../server.py", "/static/index.html.bak",
    "/api/runs/guarded%2F..%2F..%2Fx/steps",
])
def test_traversal_and_unknown_get_404(server, path):
    # A raw request line: clients would normalise '..' away before sending.
    with httpx.Client(base_url=server.url, timeout=10) as c:
        r = c.send(httpx.Request("GET", server.url + path))
    assert r.status_code == 404


def test_only_get(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.post("/api/runs").status_code == 405
        assert c.delete("/api/runs/guarded/steps").status_code == 405


def test_page_renders_and_event_click_zooms(server, browser):
    page, dialogs, errors = _open(browser, server.url + "/#runs=unguarded")
    page.wait_for_function("document.getElementById('chart-norm').data?.[0]?.name === 'unguarded'",
                           timeout=20000)
    page.wait_for_selector("#events li", timeout=20000)
    # Charts rendered by Plotly with the run's data.
    for cid in ("chart-loss", "chart-norm", "chart-clip", "chart-heat"):
        page.wait_for_selector(f"#{cid} .main-svg", timeout=20000)
    n_points = page.evaluate("document.getElementById('chart-norm').data[0].x.length")
    assert n_points == 60
    assert page.evaluate("document.getElementById('chart-heat').data[0].type") == "heatmap"
    assert page.locator("#layers tbody tr").count() == 6
    # Compare with the guarded run.
    page.check("#runlist input[value='guarded']")
    page.wait_for_function("document.getElementById('chart-loss').data.filter(t => t.mode === 'lines').length == 2")
    # Clicking an event zooms every chart to its steps and highlights its layers.
    first = page.locator("#events li").first
    step = int(first.get_attribute("data-step"))
    layers = json.loads(page.evaluate("JSON.stringify(window.__ggEventLayers = "
                                      "Array.from(document.querySelectorAll('#events li'))[0]"
                                      ".querySelector('.ev-layers')?.textContent || '')"))
    first.click()
    page.wait_for_function("document.body.dataset.zoom && document.body.dataset.zoom.length > 0")
    for cid in ("chart-loss", "chart-norm", "chart-heat"):
        lo, hi = page.evaluate(f"document.getElementById('{cid}').layout.xaxis.range")
        assert lo <= step <= hi and hi - lo < 60
    if layers:
        assert page.locator("#layers tbody tr.hl").count() >= 1
        assert page.evaluate("document.getElementById('chart-heat').layout.shapes.length") >= 1
    page.click("#reset")
    page.wait_for_function("document.body.dataset.zoom === ''")
    assert not dialogs and not errors, (dialogs, errors)
    page.close()


def test_hostile_layer_name_renders_as_text(server, browser):
    page, dialogs, errors = _open(browser, server.url + "/#runs=evil")
    page.wait_for_selector("#layers tbody tr td.name", timeout=20000)
    page.wait_for_function(f"document.querySelector('#layers td.name').textContent === {json.dumps(EVIL)}")
    assert page.locator("#events .ev-layers").first.text_content() == EVIL
    assert EVIL in page.locator("#events .ev-msg").first.text_content()
    page.wait_for_selector("#chart-heat .main-svg", timeout=20000)
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert page.evaluate("document.querySelectorAll('[onerror]').length") == 0
    # Plotly draws the name as a literal tick label too.
    ticks = page.evaluate("Array.from(document.querySelectorAll('#chart-heat .ytick text')).map(t => t.textContent)")
    assert any(EVIL in t for t in ticks), ticks
    page.wait_for_timeout(300)
    assert not dialogs and not errors, (dialogs, errors)
    page.close()


def test_live_update_shows_new_run(tmp_path, browser):
    srv = start_server(tmp_path, "127.0.0.1", 0)
    try:
        page = new_page(browser, bypass_csp=True)
        page.goto(srv.url + "/")
        page.wait_for_selector("#run")
        rec = open_recorder(tmp_path, run_name="late", layers=[{"name": "w", "shape": [1], "order": 0}])
        rec.write_steps(np.arange(5), np.ones((5, len(GLOBAL_COLS) + 3), np.float32), GLOBAL_COLS)
        rec.flush()
        page.wait_for_function("document.querySelector('#status').textContent.includes('step 4')", timeout=15000)
        assert page.locator("#status").text_content().startswith("running")
        rec.write_steps(np.arange(5, 9), np.ones((4, len(GLOBAL_COLS) + 3), np.float32), GLOBAL_COLS)
        rec.close()
        page.wait_for_function("document.querySelector('#status').textContent.includes('finished · step 8')",
                               timeout=15000)
        page.close()
    finally:
        srv.stop()


def test_cli_arguments():
    import argparse

    from gradguard import dashboard

    p = argparse.ArgumentParser()
    dashboard.add_arguments(p)
    a = p.parse_args([])
    assert (a.log_dir, a.host, a.port) == ("gradguard-runs", "127.0.0.1", 6060)
    from gradguard.tools.demo import run_demo
    import inspect
    assert inspect.signature(run_demo).parameters["log_dir"].default == dashboard.DEFAULT_LOG_DIR


def test_newer_schema_store_gives_a_clear_api_error(tmp_path):
    import sqlite3

    from gradguard.record.schema import DB_NAME

    rec = open_recorder(tmp_path, run_name="future", layers=[{"name": "w", "shape": [1], "order": 0}])
    rec.write_steps(np.arange(3), np.ones((3, len(GLOBAL_COLS) + 3), np.float32), GLOBAL_COLS)
    rec.close()
    con = sqlite3.connect(tmp_path / "future" / DB_NAME)
    con.execute("PRAGMA user_version=99")
    con.commit()
    con.close()
    srv = start_server(tmp_path, "127.0.0.1", 0)
    try:
        r = httpx.get(srv.url + "/api/runs/future/steps", timeout=10)
        assert r.status_code == 409  # the run exists but cannot be read (was 400 before issue 19)
        assert "upgrade" in r.json()["error"] and "99" in r.json()["error"]
    finally:
        srv.stop()


@pytest.mark.parametrize("old_form", [False, True], ids=["strings", "null"])
def test_layers_table_reads_non_finite_norms_in_both_json_forms(tmp_path, browser, old_form):
    """Non-finite numbers reach the page as "NaN"/"Inf" now and as null from older servers/reports."""
    rec = open_recorder(tmp_path, run_name="nf", layers=[{"name": "a", "shape": [1], "order": 0},
                                                         {"name": "b", "shape": [1], "order": 1}])
    G = len(GLOBAL_COLS)
    rows = np.ones((4, G + 6), np.float32)
    rows[:, G + 1] = np.nan          # layer b never gets a gradient: NaN norm
    rec.write_steps(np.arange(4), rows, GLOBAL_COLS)
    rec.close()
    srv = start_server(tmp_path, "127.0.0.1", 0)
    try:
        layers = httpx.get(srv.url + "/api/runs/nf/layers", timeout=10).json()
        assert layers[1]["latest"] == "NaN" and layers[0]["latest"] == 1.0
        page = new_page(browser, bypass_csp=True)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        if old_form:
            old = [{k: (None if v == "NaN" else v) for k, v in l.items()} for l in layers]
            page.route("**/api/runs/nf/layers", lambda route: route.fulfill(json=old))
        page.goto(srv.url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=20000)
        page.wait_for_function("document.querySelectorAll('#layers tbody tr').length === 2", timeout=20000)
        a, b = (page.locator("#layers tbody tr").nth(i) for i in range(2))
        assert "no grad (latest)" in b.text_content() and "no grad" not in a.text_content()
        assert b.locator("td").nth(3).text_content() == ("–" if old_form else "NaN")
        assert a.locator("td").nth(3).text_content() == "1.000"
        assert not errors, errors
        page.close()
    finally:
        srv.stop()


def test_what_a_remedy_did_is_shown_with_its_event(server, browser):
    """event.data["actions"] (a rescue's rollback, a skip) is listed under the event, as text."""
    page, dialogs, errors = _open(browser, server.url + "/#runs=evil")
    page.wait_for_selector("#events li .ev-actions", timeout=20000)
    heads = page.locator("#events > li .ev-head").all_text_contents()
    acts = [li.locator(".ev-actions li").all_text_contents() for li in page.locator("#events > li").all()]
    assert [h.split(" · ")[-1] for h in heads] == ["spike", "rescue"], heads
    assert acts == [[], [f"done: rolled back {EVIL}", "done: learning rate x0.5"]], acts
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert not dialogs and not errors, (dialogs, errors)
    page.close()
