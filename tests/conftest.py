import contextlib
import os

import pytest
import torch
from hypothesis import settings

import gradguard._kernel as _kernel
from _helpers import Zygote, assert_bitwise


# Under pytest-xdist each worker gets its share of the cores for torch's intra-op pool (one
# thread each with `make test`'s one worker per core).  Left at torch's default, every worker
# runs one thread per core, and OpenMP threads spinning against each other and Chromium cost a
# seventh of the suite's wall time (116 s -> 102 s on the 2-core machine, 2026-12-01).  The
# environment variable carries it to the interpreters tests start (distributed ranks, the
# zygote's children).
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# Hypothesis runs derandomized: the same examples on every run, so the suite cannot pass on
# one run and fail on the next (a failure found by exploring is a bug to turn into a test).
settings.register_profile("gradguard", derandomize=True)
settings.load_profile("gradguard")


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Global torch settings a test changes (threads, default dtype, grad mode) are restored
    after it, so that no test depends on the order the suite runs in."""
    threads, dtype, grad = torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)


@pytest.fixture(params=["kernel", "torch"])
def stats_path(request, monkeypatch):
    """Run a test through the compiled CPU kernel and through the pure-torch path."""
    if request.param == "kernel":
        if not _kernel.available():
            pytest.skip("compiled statistics kernel not built")
    else:
        monkeypatch.setattr(_kernel, "_fn", None)
    return request.param


def _to_host(src: torch.Tensor, dst_device) -> bool:
    """A copy from ``src`` to ``dst_device`` is a device-to-host read back."""
    return dst_device is not None and torch.device(dst_device).type == "cpu" and src.device.type != "cpu"


@contextlib.contextmanager
def no_host_sync():
    """Fail on any Tensor -> Python read (item/bool/float/int/tolist/numpy), on ``Tensor.cpu()``
    (a request for a host copy: flagged on any device, so that a CPU run sees it too), and on a
    blocking device-to-host copy through ``Tensor.to`` or ``Tensor.copy_`` (only visible where the
    tensor is on an accelerator: on CPU ``.to("cpu")`` copies nothing).  A ``non_blocking=True``
    copy is allowed: it does not wait (whoever reads it waits on an event)."""
    names = ["item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu"]
    missing = object()
    saved = {n: torch.Tensor.__dict__.get(n, missing) for n in names + ["to", "copy_"]}
    real = {n: getattr(torch.Tensor, n) for n in ("to", "copy_")}

    def boom(name):
        def f(self, *a, **k):
            raise AssertionError(f"host sync: Tensor.{name} called")
        return f

    def to(self, *a, **k):
        device, _, non_blocking, _ = torch._C._nn._parse_to(*a, **k)
        if not non_blocking and _to_host(self, device):
            raise AssertionError(f"host sync: Tensor.to copies a {self.device} tensor to the host")
        return real["to"](self, *a, **k)

    def copy_(self, src, non_blocking=False):
        if not non_blocking and isinstance(src, torch.Tensor) and _to_host(src, self.device):
            raise AssertionError(f"host sync: Tensor.copy_ copies a {src.device} tensor to the host")
        return real["copy_"](self, src, non_blocking)

    try:
        for n in names:
            setattr(torch.Tensor, n, boom(n))
        torch.Tensor.to, torch.Tensor.copy_ = to, copy_
        yield
    finally:
        for n, f in saved.items():  # as it was: a method of the class, or inherited from TensorBase
            if f is missing:
                delattr(torch.Tensor, n)
            else:
                setattr(torch.Tensor, n, f)


def assert_same(a, b, path="state"):
    """Deep bitwise equality (integer views: -0.0 != 0.0, NaN payloads count); see _helpers."""
    assert_bitwise(a, b, path)


# ---------------------------------------------------------------- headless browser
CHROMIUM = "/usr/bin/chromium"
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    """A real headless Chromium (playwright), one per test module."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} missing: `make test` installs it (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(log_dir):
    """The dashboard's HTTP server on 127.0.0.1 over the module's ``log_dir`` fixture."""
    from gradguard.dashboard.server import start_server

    srv = start_server(log_dir, "127.0.0.1", 0)
    yield srv
    srv.stop()


_PAGES: list = []  # pages opened by the running test


@pytest.fixture(autouse=True)
def _close_pages():
    """Close every page a test opened through ``new_page``: a live dashboard page polls its
    server and redraws every 2 s, so pages left open slow every later test of the module."""
    yield
    while _PAGES:
        page = _PAGES.pop()
        if not page.is_closed():
            page.close()


def new_page(browser, **options):
    """``browser.new_page(**options)``, closed when the test ends."""
    page = browser.new_page(**options)
    _PAGES.append(page)
    return page


def open_page(browser, url):
    """A page of ``url`` once the dashboard says it is ready: (page, dialogs, page errors).

    bypass_csp: escaping must hold on its own (and wait_for_function needs eval)."""
    page = new_page(browser, viewport={"width": 1400, "height": 1200}, bypass_csp=True)
    dialogs, errors = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=20000)
    return page, dialogs, errors


@pytest.fixture(scope="session")
def fresh_python(tmp_path_factory):
    """``fresh_python.run(code, env=None, cwd=None)``: ``python -c code`` in a fresh interpreter
    (a child forked from one that imported only torch and numpy: ~0.5 s instead of ~2.5 s)."""
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


# The suite's longest files, longest first: seconds of test time in one `make test` run on the
# 2-core machine (2026-12-01).  Under `--dist loadfile` a worker takes the next file in
# collection order whenever it runs short, so the order is the schedule: longest first is the
# classic greedy (LPT) one.  xdist's own reorder (files with the most tests first) left the three
# distributed tests and the report's two browser tests for the very end, with one worker idle;
# `make test` turns it off (`--no-loadscope-reorder`).  A file missing here keeps its place after
# these; a stale figure only costs balance, never a result.
_LONGEST = {
    "test_dashboard_compare.py": 22, "test_dashboard.py": 19, "test_detect.py": 18,
    "test_autopilot.py": 13, "test_distributed.py": 12, "test_integration_transformers.py": 11,
    "test_detection_bench.py": 15,  # eight blind sets replayed (14.7 s alone, measured 2026-12-02)
    "test_triton_stats.py": 7, "test_tools_and_extras.py": 5, "test_adaptive.py": 4,
    "test_store_reliability.py": 4, "test_properties_adaptive.py": 4, "test_properties.py": 4,
    "test_demo.py": 4, "test_integration_lightning.py": 4, "test_resume.py": 3, "test_lane.py": 3,
}


def pytest_collection_modifyitems(config, items):
    # a stable sort: tests keep their order within a file
    items.sort(key=lambda item: -_LONGEST.get(item.path.name, 0))
