"""Static report: one HTML file, no network, same figures; opened in real headless Chromium."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

import gradguard as gg
from gradguard import report
from gradguard.guard import GLOBAL_COLS
from gradguard.record import open_recorder

EVIL = "</script><img src=x onerror=alert(1)>"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def run_dir(tmp_path):
    rec = open_recorder(tmp_path / "logs", run_name="r+1",
                        layers=[{"name": EVIL, "shape": [3], "order": 0}, {"name": "b", "shape": [1], "order": 1}])
    n = 300
    rows = np.ones((n, len(GLOBAL_COLS) + 6), np.float32)  # 2 layers: norms, max |g|, parameter norms
    rows[:, GLOBAL_COLS.index("global_norm")] = np.linspace(1, 2, n)
    rows[200, GLOBAL_COLS.index("global_norm")] = 1e6
    rows[:, len(GLOBAL_COLS)] = np.logspace(0, 3, n)
    rec.write_steps(np.arange(n), rows, GLOBAL_COLS)
    rec.write_events([gg.Event(200, "spike", "critical", [EVIL], f"norm spike in {EVIL}", ["lower the lr"])])
    rec.close()
    return tmp_path / "logs" / "r+1"


def test_cli_writes_self_contained_file(run_dir, tmp_path):
    p = argparse.ArgumentParser()
    report.add_arguments(p)
    out = tmp_path / "rep.html"
    assert report.run(p.parse_args([str(run_dir), "-o", str(out)])) == 0
    html = out.read_text()
    assert "<script src" not in html and "http://" not in html.split("<script>")[0]
    assert html.count("</script>") == 3 and "lower the lr" in html
    data = html.split('id="gg-data">')[1].split("</script>")[0]
    payload = json.loads(data)
    steps = payload["api/runs/r%2B1/steps"]
    assert max(steps["global_norm"]) == 1e6 and len(steps["step"]) == 300
    assert report.run(p.parse_args([str(run_dir.parent / "nope"), "-o", str(out)])) == 2


def test_report_renders_offline_in_chromium(run_dir, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} missing: `make test` installs it (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    out = report.write_report(run_dir.parent, "r+1", tmp_path / "rep.html")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = b.new_page(viewport={"width": 1300, "height": 1100})
        requests, dialogs, errors = [], [], []
        page.on("request", lambda r: requests.append(r.url))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(out.as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=20000)
        page.wait_for_selector("#chart-heat .main-svg")
        assert page.evaluate("document.getElementById('chart-norm').data[0].x.length") == 300
        assert page.locator("#layers td.name").first.text_content() == EVIL
        page.locator("#events li").first.click()
        page.wait_for_function("document.body.dataset.zoom && document.body.dataset.zoom.length > 0")
        lo, hi = page.evaluate("document.getElementById('chart-norm').layout.xaxis.range")
        assert lo < 200 < hi and hi - lo < 100
        assert page.locator("#layers tbody tr.hl").count() == 1
        assert page.evaluate("document.querySelectorAll('img').length") == 0
        assert [u for u in requests if not u.startswith("file:")] == []       # works offline
        assert not dialogs and not errors, (dialogs, errors)
        b.close()
