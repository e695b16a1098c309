"""Rollback's schedule: when it takes a snapshot (every ``every`` steps, at a clean flush, never
during held batches) and its arguments; what the tests of test_act.py leave implicit."""
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.remedies import Rollback


def _setup(rb, flush_every):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, opt, remedies={"nonfinite": rb}, detectors=[], flush_every=flush_every,
                     backend="device")  # device lane: a poisoned step waits for its flush too
    return model, opt, guard


def _run(rb, flush_every, steps, poison=()):
    model, opt, guard = _setup(rb, flush_every)
    seen = []  # (steps taken, hold left, snapshot step) after each step
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if i in poison:
            model[2].weight.grad[0, 0] = math.nan
        guard.step()
        seen.append((guard.steps, guard.hold_steps, rb.snapshot_step))
    return seen


@pytest.mark.parametrize("flush_every, every", [(4, 2), (4, 3), (3, 8), (1, 5)])
def test_snapshot_at_the_first_clean_flush_at_least_every_steps_after_the_last(flush_every, every):
    """A snapshot at the first flush, then at each flush ``every`` or more steps after the last
    one -- also when the flush interval jumps past ``every`` exactly."""
    rb = Rollback(every=every, skip_batches=0)
    seen = _run(rb, flush_every, 24)
    snaps = sorted({s for _, _, s in seen if s is not None})
    flushes = [n for n in range(1, 25) if n % flush_every == 0]
    want, last = [], None
    for n in flushes:
        if last is None or n - last >= every:
            want.append(n)
            last = n
    assert snaps == want


def test_no_snapshot_while_batches_are_held():
    """Held steps are not progress: no snapshot is taken at a flush while a hold lasts (even
    with one held step left), only at the first flush after it."""
    rb = Rollback(every=1, skip_batches=3)
    seen = _run(rb, 1, 12, poison=(5,))
    assert rb.rollbacks == 1
    held = [n for n, h, _ in seen if h > 0]
    assert held == [6, 7, 8]  # rolled back at the flush of step 5 (the 6th): 3 batches withheld
    snap = {n: s for n, _, s in seen}
    assert snap[6] == snap[7] == snap[8] == 5  # the last clean state, kept through the hold
    assert snap[9] == 9  # the hold spent: the next flush takes one (of the rolled-back state)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_rollback_arguments_name_the_argument(bad):
    for name in ("every", "skip_batches", "max_rollbacks"):
        with pytest.raises((ValueError, TypeError), match=name):
            Rollback(**{name: bad})
    with pytest.raises(ValueError, match="every"):
        Rollback(every=0)
    Rollback(skip_batches=0, max_rollbacks=0)  # zero: allowed (no hold; no rollback at all)
