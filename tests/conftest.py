import contextlib

import pytest
import torch

import gradguard._kernel as _kernel


@pytest.fixture(params=["kernel", "torch"])
def stats_path(request, monkeypatch):
    """Run a test through the compiled CPU kernel and through the pure-torch path."""
    if request.param == "kernel":
        if not _kernel.available():
            pytest.skip("compiled statistics kernel not built")
    else:
        monkeypatch.setattr(_kernel, "_fn", None)
    return request.param


@contextlib.contextmanager
def no_host_sync():
    """Fail on any Tensor -> Python read (item/bool/float/int/tolist/numpy)."""
    names = ["item", "__bool__", "__float__", "__int__", "tolist", "numpy"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def boom(name):
        def f(self, *a, **k):
            raise AssertionError(f"host sync: Tensor.{name} called")
        return f

    try:
        for n in names:
            setattr(torch.Tensor, n, boom(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
