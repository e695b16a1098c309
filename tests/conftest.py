import contextlib

import pytest
import torch
from hypothesis import settings

import gradguard._kernel as _kernel
from _helpers import assert_bitwise


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


def assert_same(a, b, path="state"):
    """Deep bitwise equality (integer views: -0.0 != 0.0, NaN payloads count); see _helpers."""
    assert_bitwise(a, b, path)
