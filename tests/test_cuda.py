"""The GPU path: statistics on device, no host sync per step (skipped without CUDA)."""
import math
import traceback
import warnings

import pytest
import torch
from torch import nn

import gradguard as gg

from conftest import no_host_sync

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_stats_match_cpu(dtype):
    torch.manual_seed(0)
    grads = [torch.randn(s).to(dtype) for s in [(300, 200), (200,), (7, 7, 3)]]
    grads[1][5] = math.nan
    named = []
    for i, g in enumerate(grads):
        p = nn.Parameter(torch.zeros(g.shape, dtype=dtype, device="cuda"))
        p.grad = g.cuda()
        named.append((f"p{i}", p))
    s = gg.grad_stats(named)
    assert s.norms.device.type == "cuda"
    for i, g in enumerate(grads):
        if i == 1:
            assert bool(s.nonfinite[1])
            continue
        assert s.norms[i].item() == pytest.approx(g.double().norm().item(), rel=1e-3)
        assert s.max_abs[i].item() == pytest.approx(g.double().abs().max().item(), rel=1e-3)


def test_cuda_guard_step_has_no_host_sync():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(1.0), flush_every=32)
    x, y = torch.randn(16, 32, device="cuda"), torch.randn(16, 4, device="cuda")
    for step in range(10):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step == 6:
            model[0].weight.grad[0, 0] = math.nan
        if step == 0:  # the fused optimizer's state does not exist yet: decided on the host
            guard.step(loss=loss)
            continue
        before = [p.detach().clone() for p in model.parameters()]
        with no_host_sync():
            guard.step(loss=loss)
        if step == 6:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert guard.skipped_steps == 1 and guard.events[0].step == 6


class _FlushProbe:
    """A detector that notes which training step each flush happened in (detectors are
    fed the drained rows at every flush), so the test does not guess the guard's schedule."""

    def __init__(self):
        self.current, self.flush_steps = -1, []

    def bind(self, guard):
        pass

    def update(self, steps, rows, guard):
        self.flush_steps.append(self.current)
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_cuda_guard_syncs_only_at_flushes(tmp_path):
    """30 steps, fused AdamW, GlobalNorm, default detectors, a store, flush_every=8: after
    step 0 (the fused optimizer's state is made on the host) the only host syncs are the
    flushes, one each. Counted with set_sync_debug_mode("warn"), each with its stack."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    probe = _FlushProbe()
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(1.0), log_dir=tmp_path, flush_every=8,
                     detectors=gg.default_detectors() + [probe])
    x, y = torch.randn(16, 32, device="cuda"), torch.randn(16, 4, device="cuda")
    syncs = []  # (step, stack) of every synchronizing CUDA operation

    def show(message, category, filename, lineno, file=None, line=None):
        stack = "".join(traceback.format_stack(limit=12)[:-1])
        # only syncs made inside gradguard (a mode switch may flush a deferred warning)
        if "synchroniz" in str(message).lower() and "gradguard" in stack.replace("test_cuda", ""):
            syncs.append((probe.current, stack))

    prev = torch.cuda.get_sync_debug_mode()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            for step in range(30):
                probe.current = step
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn" if step > 0 else 0)
                guard.step(loss=loss)
                torch.cuda.set_sync_debug_mode(0)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    probe.current = 30  # the flush in close() is no training step's
    guard.close()
    flushes = [s for s in probe.flush_steps if 0 < s < 30]
    assert len(flushes) == 3, probe.flush_steps  # 30 steps, a flush per 8 rows
    outside = [(s, st) for s, st in syncs if s not in flushes]
    assert not outside, f"host sync outside a flush at step {outside[0][0]}:\n{outside[0][1]}"
    assert len(syncs) == len(flushes), [s for s, _ in syncs]  # one sync per flush
    assert guard.skipped_steps == 0


def test_cuda_dead_run_budget_raises_at_a_flush_with_no_sync_between(tmp_path):
    """A run poisoned from step 3 on, fused AdamW, nonfinite_budget=10, flush_every=8: the
    steps between flushes stay sync-free, and RunIsDeadError comes at the first flush after
    the budget is spent (step 15: steps 3..12 spend it, the flush of steps 8..15 sees it),
    with every row recorded first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(1.0), log_dir=tmp_path, run_name="dead",
                     flush_every=8, nonfinite_budget=10, detectors=[])
    x, y = torch.randn(16, 32, device="cuda"), torch.randn(16, 4, device="cuda")
    raised = None
    for step in range(40):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step >= 3:
            model[0].weight.grad[0, 0] = math.nan
        try:
            if step in (0, 7, 15):  # step 0 makes the fused state; 7 and 15 flush
                guard.step(loss=loss)
            else:
                with no_host_sync():
                    guard.step(loss=loss)
        except gg.RunIsDeadError as e:
            raised = (step, e)
            break
    assert raised is not None and raised[0] == 15
    err = raised[1]
    assert (err.first_step, err.step, err.count) == (3, 15, 13)
    assert err.layers[0] == "0.weight"
    guard.close(status="failed")
    from gradguard.record import RunStore

    steps = RunStore(tmp_path).steps("dead")
    assert list(steps["step"]) == list(range(16))
    assert list(steps["skipped"]) == [0, 0, 0] + [1] * 13


def test_cuda_async_snapshot_holds_the_captured_moment_and_restores_bitwise():
    """capture_state(wait=False) on a GPU: pinned, non-blocking copies ordered before the next
    optimizer steps, so the snapshot equals a synchronous one taken at the same moment, also
    when it overwrites an older snapshot's buffers; restore_state waits and restores bitwise."""
    from gradguard.remedies import RemedyContext, capture_state, restore_state
    from gradguard.remedies.snapshot import wait_ready
    from gradguard.layout import RunInfo

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.BatchNorm1d(512), nn.Linear(512, 8)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    names, params = zip(*model.named_parameters())
    ctx = RemedyContext(opt, params, RunInfo.describe(list(names), list(params), model, 0), lambda: 0, model=model)
    x = torch.randn(64, 256, device="cuda")

    def train(n):
        for _ in range(n):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    train(2)
    old = capture_state(ctx, wait=False)
    train(3)
    ref = capture_state(ctx)                            # synchronous, the reference
    snap = capture_state(ctx, wait=False, reuse=old)    # into the old snapshot's buffers
    assert snap["model"]["0.weight"].data_ptr() == old["model"]["0.weight"].data_ptr()
    assert snap["model"]["0.weight"].is_pinned()
    train(5)                                            # moves every weight after the capture
    wait_ready(snap)
    for k, v in ref["model"].items():
        assert torch.equal(v, snap["model"][k]), k
    for k, v in ref["optimizer"]["state"].items():
        for kk, t in v.items():
            assert torch.equal(t, snap["optimizer"]["state"][k][kk]), (k, kk)
    snap2 = capture_state(ctx, wait=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(4)
    restore_state(ctx, snap2)                           # waits for snap2's copies itself
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
