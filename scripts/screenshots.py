"""Regenerate the dashboard screenshots of the docs (docs/img/dashboard*.png) from real runs.

    python scripts/screenshots.py [--out docs/img] [--chromium /usr/bin/chromium] [--keep DIR [--reuse]]

1. `gradguard demo` (digits, default seed): the unguarded and the guarded run, shown as the
   dashboard's first view compares them -> dashboard.png (whole page).
2. A GPT-2 with 13 blocks (160 gradient tensors; transformers' GPT2LMHeadModel, tiny width),
   trained for a few steps on this file's own bytes under a guard: the heatmap groups its
   tensors by module; one block is expanded -> dashboard_groups.png; the layer table sorted
   by max norm -> dashboard_layers.png.
Each shot is taken in headless Chromium (playwright) against the real server on 127.0.0.1.
Needs the [dashboard] and [demo] extras, transformers, playwright and a Chromium binary.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import torch

import gradguard as gg
from gradguard.dashboard.server import start_server
from gradguard.tools.demo import run_demo

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def train_gpt2(log_dir: Path, steps: int = 60, layers: int = 13) -> str:
    """A tiny GPT-2 (byte vocabulary) on this file's bytes; returns the run name."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=layers, n_head=2)
    model = GPT2LMHeadModel(cfg)
    data = torch.tensor(list(Path(__file__).read_bytes()), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(1.0), log_dir=log_dir, run_name=f"gpt2-{layers}-blocks")
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(data) - 65, (8,), generator=gen)
        x = torch.stack([data[i:i + 64] for i in idx])
        opt.zero_grad()
        loss = model(x, labels=x).loss
        loss.backward()
        guard.step(loss=loss)
    guard.close()
    return guard.recorder.run_name if guard.recorder is not None else f"gpt2-{layers}-blocks"


def shoot(url: str, chromium: str, actions) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=ARGS)
        try:
            page = b.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']", timeout=30000)
            page.wait_for_selector("#chart-heat .main-svg", timeout=30000)
            page.wait_for_timeout(500)    # Plotly's last relayout
            actions(page)
        finally:
            b.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "img"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--keep", default=None, help="write the runs here (default: a temporary directory)")
    ap.add_argument("--reuse", action="store_true", help="with --keep: shoot the runs already there")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.keep or tmp)
        demo_dir, big_dir = root / "gradguard-runs", root / "gpt2"   # the default dir, as users see it
        if a.reuse and a.keep and demo_dir.is_dir() and big_dir.is_dir():
            run = sorted(p.name for p in big_dir.iterdir())[-1]
        else:
            run_demo(log_dir=str(demo_dir), show_progress=False, out=io.StringIO())
            run = train_gpt2(big_dir)

        srv = start_server(demo_dir)
        try:
            def first_view(page):
                page.set_viewport_size({"width": 1400, "height": 1600})
                page.wait_for_function("document.getElementById('chart-heat').data.filter(t => t.type === 'heatmap')"
                                       ".length === 2", timeout=30000)
                page.wait_for_timeout(500)
                page.screenshot(path=str(out / "dashboard.png"), full_page=False)
            shoot(srv.url + "/", a.chromium, first_view)
        finally:
            srv.stop()

        srv = start_server(big_dir)
        try:
            def groups(page):
                page.click("#heat-groups button[data-group='transformer.h.5']")
                page.wait_for_timeout(1000)
                page.evaluate("window.scrollTo(0, 0)")   # bounding boxes in page coordinates
                box = page.locator("#heat-groups").bounding_box()
                heat = page.locator("#chart-heat").bounding_box()
                page.screenshot(path=str(out / "dashboard_groups.png"), full_page=True,
                                clip={"x": heat["x"], "y": box["y"], "width": heat["width"],
                                      "height": heat["y"] + heat["height"] - box["y"]})
                page.click("#layers th[data-key='max']")
                page.locator("#layers tbody tr").nth(0).wait_for()
                page.evaluate("window.scrollTo(0, 0)")
                sec = page.locator("section.layers").bounding_box()   # the header and the top rows
                page.screenshot(path=str(out / "dashboard_layers.png"), full_page=True,
                                clip={"x": sec["x"], "y": sec["y"], "width": sec["width"], "height": 520})
            shoot(srv.url + "/#runs=" + run, a.chromium, groups)
        finally:
            srv.stop()
    for name in ("dashboard.png", "dashboard_groups.png", "dashboard_layers.png"):
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
