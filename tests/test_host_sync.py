"""P4: host reads made by ``guard.step`` (counted, never timed).

Every Tensor method that pulls a value to the host (``item``, ``tolist``,
``cpu``, ``numpy``, ``bool()``, ``float()``, ``int()``, ``to(host)``) is wrapped with a
counter while ``guard.step`` runs.  Two measures:

- *calls*: every wrapped call (nested calls such as ``float`` -> ``item``
  count once).  It must not grow with the number of parameters: no
  per-parameter sync.
- *reads*: distinct source lines that made a call in one step
  (``x.cpu().numpy()`` on one line is one read).  Bounded per step.
"""
from __future__ import annotations

import math
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

import gradguard as gg

PKG = str(Path(gg.__file__).resolve().parent)
TORCH_OPTIM = str(Path(torch.optim.__file__).resolve().parent)
OPTIMIZER = "<torch.optim>"
READERS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")  # and .to(host)
# Host reads per step on CPU, any optimizer, documented in docs/benchmarks.md
# "Host reads per step": the loss value (guard.py) with the compiled kernel, this
# step's row in the buffer (record/buffer.py) without it.
CPU_READS_PER_STEP = 1


def _to_host(self, *args, **kwargs) -> bool:
    """Whether a ``Tensor.to`` call asks for the host by name (``"cpu"``, ``"cpu:0"``).

    A device given as an object is not counted: the accelerator path run on CPU moves the loss
    to its statistics' device, ``torch.device("cpu")`` there and a GPU on a GPU (no sync)."""
    dev = kwargs.get("device", args[0] if args else None)
    return isinstance(dev, str) and torch.device(dev).type == "cpu"


class SyncCounter:
    """Counts host-reading Tensor calls from the main thread, by gradguard call site."""

    def __init__(self, monkeypatch):
        self.active = False
        self.calls: list[tuple[str, str]] = []  # (method, "file:line") per outermost call
        self._depth = 0
        self._main = threading.get_ident()
        for name in READERS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        # ``x.to("cpu")`` (or ``device=``) is a device-to-host copy on an accelerator; on CPU it
        # does nothing, so it is counted by what it asks for, not by what it costs here
        monkeypatch.setattr(torch.Tensor, "to", self._wrap("to", torch.Tensor.to, _to_host))

    def _wrap(self, name, orig, asks=None):
        counter = self

        def wrapper(*args, **kwargs):
            if not counter.active or threading.get_ident() != counter._main or \
                    (asks is not None and not asks(*args, **kwargs)):
                return orig(*args, **kwargs)
            if counter._depth == 0:
                counter.calls.append((name, counter._site()))
            counter._depth += 1
            try:
                return orig(*args, **kwargs)
            finally:
                counter._depth -= 1

        wrapper.__name__ = name
        return wrapper

    @staticmethod
    def _site() -> str:
        f = sys._getframe(2)
        while f is not None:
            fn = str(Path(f.f_code.co_filename).resolve())
            if fn.startswith(TORCH_OPTIM):
                # The optimizer's own reads (non-fused Adam reads each `step` tensor):
                # the same calls happen without gradguard, so they are not ours.
                return OPTIMIZER
            if fn.startswith(PKG):
                return f"{Path(fn).relative_to(Path(PKG).parent)}:{f.f_lineno}"
            f = f.f_back
        return "<outside gradguard>"

    def step(self, guard, loss):
        """Run guard.step counted; return (calls, distinct sites) of that step."""
        start = len(self.calls)
        self.active = True
        try:
            guard.step(loss=loss)
        finally:
            self.active = False
        mine = [c for c in self.calls[start:] if c[1] != OPTIMIZER]
        return mine, {site for _, site in mine}


def _params(n_tensors: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 8) if i % 2 == 0 else (16,) for i in range(n_tensors)]
    return [(f"layer{i // 2}.{'weight' if i % 2 == 0 else 'bias'}",
             torch.nn.Parameter(torch.randn(s, generator=g))) for i, s in enumerate(shapes)]


def _grads(pairs, step: int, poison=None):
    g = torch.Generator().manual_seed(1000 + step)
    for i, (_, p) in enumerate(pairs):
        p.grad = torch.randn(p.shape, generator=g) * 0.1
        if poison is not None and i == 0:
            p.grad.view(-1)[0] = poison


def _run(monkeypatch, tmp_path, n_tensors, make_opt, steps, *, log_dir=False, flush_every=None,
         poison_at=None, poison=math.nan, host=True):
    """``host=False``: the accelerator path (decisions stay in device tensors), run on CPU."""
    pairs = _params(n_tensors)
    opt = make_opt([p for _, p in pairs])
    guard = gg.Guard(pairs, opt, clip=gg.GlobalNorm(1.0), flush_every=flush_every,
                     log_dir=tmp_path / "runs" if log_dir else None,
                     backend="host" if host else "device")
    counter = SyncCounter(monkeypatch)
    per_step = []
    try:
        for s in range(steps):
            _grads(pairs, s, poison if s == poison_at else None)
            loss = torch.tensor(math.nan if (s == poison_at and poison is None) else 1.0 / (s + 1))
            per_step.append(counter.step(guard, loss))
    finally:
        guard.close()
    return guard, per_step


def _fmt(per_step) -> str:
    return "; ".join(f"step {i}: " + ", ".join(f"{m}@{s}" for m, s in calls)
                     for i, (calls, _) in enumerate(per_step) if calls)


def test_counter_sees_every_kind_of_read(monkeypatch):
    """The instrument itself: each reader is counted once, with its call site."""
    counter = SyncCounter(monkeypatch)
    t = torch.ones(3)
    counter.active = True
    try:
        t.sum().item(), bool(t[0]), float(t[0]), int(t[0]), t.tolist(), t.cpu(), t.numpy()
        if t[1]:
            pass
        t.to("cpu"), t.to(device="cpu"), t.to("cpu:0", torch.float64), t.to(t), t.to(torch.float64), \
            t.to(dtype=torch.int32)
    finally:
        counter.active = False
    assert Counter(m for m, _ in counter.calls) == Counter(
        {"item": 1, "__bool__": 2, "__float__": 1, "__int__": 1, "tolist": 1, "cpu": 1, "numpy": 1, "to": 3})
    assert all(site == "<outside gradguard>" for _, site in counter.calls)


@pytest.mark.parametrize("log_dir", [False, True], ids=["no-store", "store"])
@pytest.mark.parametrize("poison", [None, 1e30, 1e-30, math.nan, math.inf], ids=repr)
def test_fused_adamw_no_reads_after_first_step(monkeypatch, tmp_path, log_dir, poison):
    """Accelerator path, fused AdamW, flush interval longer than the run: no host read after step 0.

    Step 0 reads the skip flag once (the fused state does not exist yet); a
    poisoned step (NaN, Inf, huge, tiny gradient or a NaN loss) reads nothing more.
    """
    steps = 8
    guard, per_step = _run(monkeypatch, tmp_path, 20, lambda ps: torch.optim.AdamW(ps, fused=True),
                           steps, log_dir=log_dir, flush_every=64, poison_at=4, poison=poison, host=False)
    assert len(per_step[0][1]) <= 1, _fmt(per_step)
    later = [c for calls, _ in per_step[1:] for c in calls]
    assert later == [], _fmt(per_step)
    # The rows were recorded all the same (drained at close).
    assert guard.steps == steps
    if poison is None or not math.isfinite(poison):
        assert guard.skipped_steps == 1
        assert [e.step for e in guard.events if e.kind == "nonfinite"] == [4]


def _nonfused(name):
    return {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
            "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3)}[name]


@pytest.mark.parametrize("log_dir", [False, True], ids=["no-store", "store"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_nonfused_cpu_reads_per_step_bounded(monkeypatch, tmp_path, opt, log_dir):
    """Non-fused optimizer on CPU, default detectors, flush every step."""
    guard, per_step = _run(monkeypatch, tmp_path, 20, _nonfused(opt), 6, log_dir=log_dir,
                           poison_at=3)
    for calls, sites in per_step:
        assert len(sites) <= CPU_READS_PER_STEP, _fmt(per_step)
    # Where they come from: the guard's skip decision and the buffer drain, nothing else.
    files = {s.rsplit(":", 1)[0] for _, sites in per_step for s in sites}
    assert files <= {"gradguard/decide.py", "gradguard/apply.py"}, _fmt(per_step)
    assert guard.skipped_steps == 1


def test_nonfused_cpu_one_read_per_step(monkeypatch, tmp_path):
    _, per_step = _run(monkeypatch, tmp_path, 20, _nonfused("sgd"), 4)
    assert all(len(sites) <= 1 for _, sites in per_step), _fmt(per_step)


def test_nonfused_long_flush_reads_only_skip_flag(monkeypatch, tmp_path):
    """Accelerator path, flush_every > steps: the only per-step read left is the skip decision."""
    _, per_step = _run(monkeypatch, tmp_path, 20, _nonfused("adam"), 5, flush_every=64, host=False)
    for calls, sites in per_step:
        assert len(calls) == 1 and len(sites) == 1, _fmt(per_step)
        assert next(iter(sites)).startswith("gradguard/apply.py"), _fmt(per_step)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "no-kernel"])
@pytest.mark.parametrize("flush_every", [None, 1, 64], ids=["default", "1", "64"])
@pytest.mark.parametrize("poison", [None, math.nan, math.inf], ids=repr)
@pytest.mark.parametrize("opt", ["fused-adamw", "sgd"])
def test_cpu_one_read_per_step(monkeypatch, tmp_path, flush_every, poison, opt, kernel):
    """CPU, fused or not, flushing or not, poisoned or not: one read per step.

    With the compiled kernel the statistics are host numbers already and the one read is
    the loss value (decide.py); without it, torch's CPU statistics are viewed as numpy
    (backend.py: host memory, no copy) besides that loss read."""
    if not kernel:
        monkeypatch.setattr(gg._kernel, "_fn", None)
    elif not gg._kernel.available():
        pytest.skip("compiled statistics kernel not built")
    make = (lambda ps: torch.optim.AdamW(ps, fused=True)) if opt == "fused-adamw" else _nonfused("sgd")
    guard, per_step = _run(monkeypatch, tmp_path, 20, make, 20, log_dir=True, flush_every=flush_every,
                           poison_at=5, poison=poison)
    lines = {c[1] for calls, _ in per_step for c in calls}
    if kernel:
        assert all(len(calls) == 1 for calls, _ in per_step), _fmt(per_step)
        assert len(lines) == 1 and next(iter(lines)).startswith("gradguard/decide.py"), lines
    else:
        assert {ln.rsplit(":", 1)[0] for ln in lines} <= {"gradguard/decide.py", "gradguard/backend.py"}, lines
    assert guard.steps == 20 and guard.skipped_steps == 1  # poison None: a NaN loss


def test_cpu_no_loss_no_read(monkeypatch, tmp_path):
    """Without a loss the CPU path reads nothing: every decision comes from the kernel's numbers."""
    if not gg._kernel.available():
        pytest.skip("compiled statistics kernel not built")
    pairs = _params(20)
    opt = torch.optim.AdamW([p for _, p in pairs], fused=True)
    guard = gg.Guard(pairs, opt, clip=gg.GlobalNorm(0.1), log_dir=tmp_path)
    counter = SyncCounter(monkeypatch)
    for s in range(20):
        _grads(pairs, s, math.nan if s == 7 else None)
        counter.active = True
        try:
            guard.step()
        finally:
            counter.active = False
    guard.close()
    assert counter.calls == [] and guard.skipped_steps == 1


@pytest.mark.parametrize("make_opt,flush_every", [
    (lambda ps: torch.optim.AdamW(ps, fused=True), 64),
    (lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9), None),
    (lambda ps: torch.optim.Adam(ps, lr=1e-3), None),
], ids=["fused-adamw", "sgd", "adam"])
def test_reads_do_not_grow_with_parameter_count(monkeypatch, tmp_path, make_opt, flush_every):
    """Zero per-parameter host syncs: 10 and 200 tensors make the same calls."""
    counts = {}
    for n in (10, 200):
        _, per_step = _run(monkeypatch, tmp_path / str(n), n, make_opt, 4, log_dir=True,
                           flush_every=flush_every, poison_at=2)
        counts[n] = [Counter(m for m, _ in calls) for calls, _ in per_step]
        monkeypatch.undo()
    assert counts[10] == counts[200], counts


@pytest.mark.parametrize("log_dir", [False, True], ids=["no-store", "store"])
def test_running_variances_are_measured_without_reads(monkeypatch, tmp_path, log_dir):
    """Accelerator path on a BatchNorm model, buffers measured every step (param_norm_every=1):
    the running-variance block adds no host read; the rows hold it all the same."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    guard = gg.Guard(model, opt, flush_every=64, param_norm_every=1, backend="device",
                     log_dir=tmp_path / "runs" if log_dir else None)
    rows = []
    guard.add_row_observer(lambda s, r: rows.extend(r))
    counter = SyncCounter(monkeypatch)
    per_step = []
    try:
        for s in range(6):
            opt.zero_grad()
            loss = model(torch.randn(8, 1, 6, 6)).pow(2).mean()
            loss.backward()
            per_step.append(counter.step(guard, loss.detach()))
    finally:
        guard.close()
    assert len(per_step[0][1]) <= 1, _fmt(per_step)
    assert [c for calls, _ in per_step[1:] for c in calls] == [], _fmt(per_step)
    assert guard.run.buffers == ("1.running_var", "4.running_var") and len(rows) == 6
    assert all(math.isfinite(v) and v > 0 for r in rows for v in guard.run.layout.buffer_norms(r))
