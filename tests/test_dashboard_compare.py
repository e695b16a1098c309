"""Comparing runs in the dashboard and the report; heatmap groups at 150+ tensors; the sortable
layer table; numeric log-axis labels; the log dir on the page.  A real uvicorn server on
127.0.0.1 and real headless Chromium, as in test_dashboard.py."""
from __future__ import annotations

import argparse
from html import escape
import json
import math
import re

import httpx
import numpy as np
import pytest

import gradguard as gg
from gradguard import report
from gradguard.dashboard.server import start_server
from gradguard.layout import GLOBAL_COLS
from gradguard.record import RunStore, open_recorder
from conftest import new_page, open_page
from test_dashboard import train_irnn

BLOCKS, PER_BLOCK = 20, 8          # 160 tensors + 2: GPT-2-like names, past the grouping threshold
SUB = ("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
       "mlp.up.weight", "mlp.up.bias", "mlp.down.weight", "mlp.down.bias")


def _big_run(log_dir):
    """A run with 162 tensors whose norms differ per tensor (10**(block/4) * (1 + j)), and one
    event naming a tensor of block 7."""
    names = ["model.embed.weight"] + [f"model.layers.{b}.{s}" for b in range(BLOCKS) for s in SUB] + ["lm_head.weight"]
    rec = open_recorder(log_dir, run_name="big", layers=[{"name": n, "shape": [4], "order": i}
                                                         for i, n in enumerate(names)])
    G, L, n = len(GLOBAL_COLS), len(names), 40
    rows = np.ones((n, G + 3 * L), np.float32)
    norms = np.array([1.0] + [10 ** (b / 4) * (1 + j) for b in range(BLOCKS) for j in range(PER_BLOCK)] + [3.0])
    rows[:, G:G + L] = norms[None, :] * np.linspace(1, 2, n)[:, None]
    rows[:, GLOBAL_COLS.index("global_norm")] = np.logspace(-3, 3, n)     # six decades
    rows[:, GLOBAL_COLS.index("loss")] = np.logspace(1, -2, n)
    rec.write_steps(np.arange(n), rows, GLOBAL_COLS)
    rec.write_events([gg.Event(20, "spike", "warning", ["model.layers.7.mlp.up.weight"], "spike", [])])
    rec.close()
    return names


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    train_irnn(d, "unguarded", None)
    train_irnn(d, "guarded", gg.GlobalNorm(1.0))
    return d


def _open(browser, url):
    page, _, errors = open_page(browser, url)
    return page, errors


def _series(page, cid):
    """(kind, run, colour) of every trace of a chart."""
    return page.evaluate(f"""document.getElementById('{cid}').data.map(t =>
        [t.type === 'heatmap' ? 'heatmap' : t.mode, t.meta ?? null, t.line?.color ?? t.marker?.color ?? null])""")


def _wait_runs(page, n):
    page.wait_for_function(f"document.getElementById('chart-heat').data?.filter(t => t.type === 'heatmap').length === {n}"
                           f" && document.getElementById('chart-loss').data.filter(t => t.mode === 'lines').length === {n}",
                           timeout=20000)


def test_api_lists_skipped_steps_and_the_log_dir(server, log_dir):
    store = RunStore(log_dir)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        runs = {r["name"]: r for r in c.get("/api/runs").json()}
        assert c.get("/api/info").json() == {"log_dir": str(log_dir.resolve())}
    for name in ("unguarded", "guarded"):
        ref = int((store.steps(name)["skipped"] > 0).sum())       # every raw row
        assert runs[name]["skipped"] == ref == store.skipped_steps(name)


def test_first_view_compares_and_every_panel_overlays(server, browser, log_dir):
    page, errors = _open(browser, server.url + "/")
    _wait_runs(page, 2)
    store = RunStore(log_dir)
    info = {r["name"]: r for r in store.runs()}
    # The run list: every run, runs with events first, with status, steps and events.
    rows = page.locator("#runlist tbody tr")
    assert rows.count() == 2
    listed = [rows.nth(i).get_attribute("data-run") for i in range(2)]
    with_events = [n for n in listed if info[n]["n_events"] > 0]
    assert listed[:len(with_events)] == with_events
    for i, name in enumerate(listed):
        cells = rows.nth(i).locator("td")
        assert cells.nth(2).text_content() == info[name]["status"]
        assert cells.nth(3).text_content() == str(info[name]["last_step"])
        assert cells.nth(5).text_content() == str(info[name]["n_events"])
    assert page.locator("#runlist input:checked").count() == 2
    colour = {n: page.evaluate(f"getComputedStyle(document.querySelector('#runlist tr[data-run=\"{n}\"] .swatch'))"
                               ".backgroundColor") for n in listed}
    assert len(set(colour.values())) == 2
    # Every panel has one series per run, each in its run's colour.
    rgb = lambda hexc: "rgb(" + ", ".join(str(int(hexc[i:i + 2], 16)) for i in (1, 3, 5)) + ")"
    for cid in ("chart-loss", "chart-norm", "chart-clip"):
        lines = [(run, c) for kind, run, c in _series(page, cid) if kind == "lines"]
        assert sorted(r for r, _ in lines) == sorted(listed)
        assert all(rgb(c) == colour[r] for r, c in lines), (cid, lines, colour)
    # The legend sits above each plot area, never over a line at the top of it (a clip
    # coefficient of 1 was hidden behind it).
    for cid in ("chart-loss", "chart-norm", "chart-clip", "chart-lr"):
        legend, plot = page.evaluate(f"""[...['.legend', '.nsewdrag'].map(sel =>
            document.querySelector('#{cid} ' + sel).getBoundingClientRect().toJSON())]""")
        assert legend["bottom"] <= plot["top"] + 1, (cid, legend, plot)
    heat = [run for kind, run, _ in _series(page, "chart-heat") if kind == "heatmap"]
    assert sorted(heat) == sorted(listed)
    titles = page.evaluate("document.getElementById('chart-heat').layout.annotations.map(a => [a.text, a.font.color])")
    assert sorted(t for t, _ in titles) == sorted(listed) and all(rgb(c) == colour[t] for t, c in titles)
    # Events of both runs, each tagged with its run; markers on each run's own curve.
    ev_runs = page.evaluate("Array.from(document.querySelectorAll('#events > li')).map(li => li.dataset.run)")
    assert sorted(set(ev_runs)) == sorted(with_events)
    assert len(ev_runs) == sum(info[n]["n_events"] for n in listed)
    markers = [run for kind, run, _ in _series(page, "chart-loss") if kind == "markers" and run]
    assert set(with_events) <= set(markers)
    # The layer table gains a max-norm column per compared run.
    heads = page.locator("#layers thead th").all_text_contents()
    assert sum(h.startswith("max norm · ") for h in heads) == 1
    # Unticking a run leaves one series per panel.
    page.uncheck(f"#runlist input[value='{listed[1]}']")
    _wait_runs(page, 1)
    assert page.locator(f"#runlist input[value='{listed[0]}']").is_disabled()   # the last one stays
    assert "#runs=" + listed[0] == page.evaluate("location.hash")
    assert not errors, errors
    page.close()


def test_layer_table_sorts_and_filters(server, browser, log_dir):
    ref = RunStore(log_dir).layer_summary("unguarded")
    page, errors = _open(browser, server.url + "/#runs=unguarded")
    page.wait_for_function(f"document.querySelectorAll('#layers tbody tr').length === {len(ref)}", timeout=20000)

    def column(i):
        return page.locator("#layers tbody tr").evaluate_all(f"rs => rs.map(r => r.cells[{i}].textContent)")

    def ref_order(key, sign):   # NaN (no value) last either way, ties in depth order
        v = lambda l: float(l[key])
        return [l["name"] for l in sorted(ref, key=lambda l: (math.isnan(v(l)), 0 if math.isnan(v(l)) else sign * v(l),
                                                              l["order"]))]

    assert column(1) == [l["name"] for l in ref]                     # depth order at first
    # each tensor's parameter norm, latest and over the first measured (the store's numbers)
    for i, key in ((7, "weight"), (8, "weight_growth")):  # "–": no growth to show (a start at 0)
        np.testing.assert_allclose([math.nan if t == "–" else float(t) for t in column(i)],
                                   [float(l[key]) for l in ref], rtol=1e-3)
    assert len({l["weight"] for l in ref}) == len(ref) and any(l["weight_growth"] != 1 for l in ref)
    flagged = [("weights ×10" in t) for t in column(9)]
    assert flagged == [l["weight_growth"] >= 10 for l in ref]
    for key in ("max", "latest", "min", "weight", "weight_growth"):
        page.click(f"#layers th[data-key='{key}']")
        assert column(1) == ref_order(key, -1), key
        assert page.get_attribute(f"#layers th[data-key='{key}']", "data-sort") == "desc"
        page.click(f"#layers th[data-key='{key}']")
        assert column(1) == ref_order(key, 1), key
    assert len({tuple(ref_order(k, 1)) for k in ("max", "latest", "min")} | {tuple(l["name"] for l in ref)}) > 1
    page.click("#layers th[data-key='name']")
    assert column(1) == sorted(l["name"] for l in ref)
    page.fill("#layer-filter", "rec.")
    assert column(1) == sorted(l["name"] for l in ref if "rec." in l["name"]) and len(column(1)) == 2
    assert page.locator("#n-layers").text_content() == f"(2 of {len(ref)})"
    assert not errors, errors
    page.close()


NUMBER = re.compile(r"^-?\d+(\.\d+)?(e-?\d+)?$")


@pytest.mark.parametrize("cid", ["chart-loss", "chart-norm"])
def test_log_axis_labels_read_as_numbers(tmp_path, browser, cid):
    _big_run(tmp_path)
    srv = start_server(tmp_path, "127.0.0.1", 0)
    try:
        page, errors = _open(browser, srv.url + "/")
        page.wait_for_selector(f"#{cid} .ytick text", timeout=20000)
        ticks = page.evaluate(f"""Array.from(document.querySelectorAll('#{cid} .ytick text')).map(t =>
            [t.textContent, t.getBoundingClientRect().top])""")
        labels = [t for t, _ in sorted(ticks, key=lambda t: -t[1])]     # bottom to top
        assert len(labels) >= 4 and all(NUMBER.match(t) for t in labels), labels
        values = [float(t) for t in labels]
        assert values == sorted(values) and len(set(values)) == len(values), labels   # increase upwards
        lo, hi = (1e-3, 1e3) if cid == "chart-norm" else (1e-2, 10)
        assert values[0] <= lo * 1.0001 and values[-1] >= hi * 0.9999, labels         # the data's decades
        assert not errors, errors
        page.close()
    finally:
        srv.stop()


def test_heatmap_groups_many_tensors_by_module(tmp_path, browser):
    names = _big_run(tmp_path)
    srv = start_server(tmp_path, "127.0.0.1", 0)
    try:
        heat = httpx.get(srv.url + "/api/runs/big/heatmap", timeout=10).json()
        page, errors = _open(browser, srv.url + "/")
        page.wait_for_selector("#chart-heat .main-svg", timeout=20000)
        get = lambda: page.evaluate("""(() => { const d = document.getElementById('chart-heat');
            return {ticks: d.layout.yaxis.ticktext, z: d.data[0].z, text: d.data[0].text.map(r => r[0])}; })()""")
        g = get()
        groups = ["model.embed"] + [f"model.layers.{b}" for b in range(BLOCKS)] + ["lm_head"]
        assert g["ticks"] == [f"▸ {k} ({PER_BLOCK if k.startswith('model.layers') else 1})" for k in groups]
        # A group's row is the max over its tensors, bucket by bucket.
        z = np.array([[np.nan if v is None else v for v in r] for r in heat["log10_norm"]])
        blk3 = [names.index(f"model.layers.3.{s}") for s in SUB]
        np.testing.assert_allclose(np.array(g["z"][4], float), z[blk3].max(0), rtol=1e-9)
        # Expanding a group (its button) shows its tensors under it, hover with the full name.
        page.click("#heat-groups button[data-group='model.layers.3']")
        page.wait_for_function("document.getElementById('chart-heat').layout.yaxis.ticktext.length === 30")
        g = get()
        assert g["ticks"][4] == f"▾ model.layers.3 ({PER_BLOCK})"
        assert [t.strip() for t in g["ticks"][5:13]] == list(SUB)
        assert g["text"][5:13] == [f"model.layers.3.{s}" for s in SUB]
        np.testing.assert_allclose(np.array(g["z"][5:13], float), z[blk3], rtol=1e-9)
        # Clicking the group's row in the heatmap itself folds it again (in view: a mouse
        # click lands only inside the viewport).
        page.evaluate("document.getElementById('chart-heat').scrollIntoView({block: 'center'})")
        box = page.evaluate("""(() => { const d = document.getElementById('chart-heat'), L = d._fullLayout;
            const r = d.getBoundingClientRect();
            return [r.left + L.xaxis._offset + L.xaxis._length / 2, r.top + L.yaxis._offset + L.yaxis.l2p(4)]; })()""")
        page.mouse.click(*box)
        page.wait_for_function(f"document.getElementById('chart-heat').layout.yaxis.ticktext.length === {len(groups)}")
        # An event on a tensor of a folded group opens that group and outlines the tensor.
        page.locator("#events li").first.click()
        page.wait_for_function("document.getElementById('chart-heat').layout.shapes.length === 1")
        g = get()
        row = page.evaluate("document.getElementById('chart-heat').layout.shapes[0].y0 + 0.5")
        assert g["text"][int(row)] == "model.layers.7.mlp.up.weight"
        assert not errors, errors
        page.close()
    finally:
        srv.stop()


def test_page_names_the_log_dir_even_when_empty(tmp_path, browser):
    srv = start_server(tmp_path / "nothing-here", "127.0.0.1", 0)
    try:
        page, errors = _open(browser, srv.url + "/")
        path = str((tmp_path / "nothing-here").resolve())
        assert page.locator("#logdir").text_content() == "log dir: " + path
        assert page.locator("#empty").is_visible() and path in page.locator("#empty").text_content()
        assert "gradguard demo" in page.locator("#empty").text_content()
        assert not errors, errors
        page.close()
    finally:
        srv.stop()


# ------------------------------------------------------------------ report
def test_multi_run_report_content(log_dir, tmp_path):
    p = argparse.ArgumentParser()
    report.add_arguments(p)
    out = tmp_path / "cmp.html"
    assert report.run(p.parse_args([str(log_dir / "unguarded"), str(log_dir / "guarded"), "-o", str(out)])) == 0
    html = out.read_text()
    data = json.loads(html.split('id="gg-data">')[1].split("</script>")[0])
    assert data["report"] == {"runs": ["unguarded", "guarded"]}
    assert [r["name"] for r in data["api/runs"]] == ["unguarded", "guarded"]
    store = RunStore(log_dir)
    for name in ("unguarded", "guarded"):
        assert data[f"api/runs/{name}/steps"]["step"] == store.steps(name, max_points=4000)["step"].tolist()
        assert len(data[f"api/runs/{name}/events"]) == store.info(name)["n_events"]
        assert f"Summary of run {name}" in html
    table = html.split('id="compare-summary"')[1].split("</table>")[0]
    assert table.count("<tr>") == 3            # header + one row per run
    for name in ("unguarded", "guarded"):
        row = table.split(f'<td class="name">{name}</td>')[1].split("</tr>")[0]
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        assert cells[1:4] == [str(store.info(name)["rows"]), str(store.skipped_steps(name)),
                              str(store.info(name)["n_events"])]
        evs = store.events(name)
        lead = next((e for e in evs if e.severity == "critical"), evs[0] if evs else None)
        assert cells[4] == (f"step {lead.step} · {escape(lead.kind)}: {escape(lead.message)}"
                            if lead else "none")
    # The same run twice is one run; names with --log-dir; errors are one line and exit 2.
    assert report.run(p.parse_args(["guarded", "guarded", "--log-dir", str(log_dir), "-o", str(out)])) == 0
    assert json.loads(out.read_text().split('id="gg-data">')[1].split("</script>")[0])["report"]["runs"] == ["guarded"]
    other = tmp_path / "elsewhere"
    train_irnn(other, "x", None, steps=3)
    assert report.run(p.parse_args([str(log_dir / "guarded"), str(other / "x"), "-o", str(out)])) == 2
    assert report.run(p.parse_args([str(log_dir / "guarded"), str(log_dir / "nope"), "-o", str(out)])) == 2


@pytest.mark.parametrize("bad", [[], [3], "", None])
def test_write_report_rejects_bad_run_lists(log_dir, tmp_path, bad):
    with pytest.raises(ValueError, match="run"):
        report.write_report(log_dir, bad, tmp_path / "r.html")


def test_multi_run_report_overlays_offline(log_dir, tmp_path, browser):
    out = report.write_report(log_dir, ["unguarded", "guarded"], tmp_path / "cmp.html")
    page = new_page(browser, viewport={"width": 1300, "height": 1100})
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(out.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=20000)
    _wait_runs(page, 2)
    for cid in ("chart-loss", "chart-norm", "chart-clip"):
        assert sorted(r for k, r, _ in _series(page, cid) if k == "lines") == ["guarded", "unguarded"]
    assert page.locator("#runlist tbody tr").count() == 2
    assert page.locator("#compare-summary tbody tr").count() == 2
    assert [u for u in requests if not u.startswith("file:")] == []
    assert not errors, errors
    page.close()


@pytest.mark.parametrize("n, every", [(0, 1), (1, 1), (700, 1), (700, 7), (700, 10 ** 6), (1000, 3)])
def test_skipped_steps_counts_every_raw_row(tmp_path, n, every):
    """Across chunk boundaries (256 rows), with NaN elsewhere in the row, against a plain count."""
    rec = open_recorder(tmp_path, run_name="s", layers=[{"name": "w", "shape": [1], "order": 0}])
    G = len(GLOBAL_COLS)
    rows = np.ones((n, G + 3), np.float32)
    rows[:, GLOBAL_COLS.index("skipped")] = (np.arange(n) % every == every - 1)
    rows[::5, GLOBAL_COLS.index("loss")] = np.nan
    if n:
        rec.write_steps(np.arange(n), rows, GLOBAL_COLS)
    rec.close()
    assert RunStore(tmp_path).skipped_steps("s") == sum(1 for i in range(n) if i % every == every - 1)


def test_skipped_steps_without_the_column_is_zero(tmp_path):
    cols = tuple(c for c in GLOBAL_COLS if c != "skipped")
    rec = open_recorder(tmp_path, run_name="old", layers=[{"name": "w", "shape": [1], "order": 0}])
    rec.write_steps(np.arange(3), np.ones((3, len(cols) + 2), np.float32), cols)
    rec.close()
    assert RunStore(tmp_path).skipped_steps("old") == 0
    with pytest.raises(KeyError):
        RunStore(tmp_path).skipped_steps("nope")


def test_run_list_order_running_then_events_then_newest(tmp_path, browser):
    def run(name, events=(), close=True):
        rec = open_recorder(tmp_path, run_name=name, layers=[{"name": "w", "shape": [1], "order": 0}])
        rec.write_steps(np.arange(4), np.ones((4, len(GLOBAL_COLS) + 2), np.float32), GLOBAL_COLS)
        rec.write_events(list(events))
        if close:
            rec.close()
        else:
            rec.flush()
        return rec

    run("old-with-events", [gg.Event(2, "spike", "warning", ["w"], "spike", [])])
    run("quiet")
    live = run("live", close=False)
    srv = start_server(tmp_path, "127.0.0.1", 0)
    try:
        page, errors = _open(browser, srv.url + "/")
        order = page.locator("#runlist tbody tr").evaluate_all("rs => rs.map(r => r.dataset.run)")
        assert order == ["live", "old-with-events", "quiet"]
        assert page.evaluate("GG_STATE.selected") == ["live", "old-with-events"]
        assert not errors, errors
        page.close()
    finally:
        srv.stop()
        live.close()


def test_lr_panel_shows_every_param_group(browser, tmp_path):
    """Two param groups (the second at 10x lr) under a scheduler: the lr panel has group 0 solid
    and group 1 dashed, with the values the store recorded (the rates each step used)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters()},
                           {"params": model[2].parameters(), "lr": 0.1}], lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)
    guard = gg.Guard(model, opt, log_dir=tmp_path, run_name="groups", scheduler=sched, detectors=[])
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    for _ in range(12):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(loss)
    guard.close()
    stored = RunStore(tmp_path).steps("groups")
    np.testing.assert_allclose(stored["lr"], 0.01 * 0.9 ** np.arange(12), rtol=1e-6)
    np.testing.assert_allclose(stored["lr_group1"], 0.1 * 0.9 ** np.arange(12), rtol=1e-6)
    srv = start_server(tmp_path, "127.0.0.1", 0)
    try:
        page, errors = _open(browser, srv.url + "/")
        page.wait_for_function("document.getElementById('chart-lr').data?.length === 2", timeout=20000)
        traces = page.evaluate("document.getElementById('chart-lr').data.map(t => [t.name, t.line.dash, t.y])")
        assert [(n, d) for n, d, _ in traces] == [("groups · group 0", "solid"), ("groups · group 1", "dash")]
        np.testing.assert_allclose(traces[0][2], stored["lr"], rtol=1e-6)
        np.testing.assert_allclose(traces[1][2], stored["lr_group1"], rtol=1e-6)
        assert errors == []
    finally:
        srv.stop()
