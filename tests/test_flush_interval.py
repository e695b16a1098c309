"""The flush interval: ``Guard(flush_every=N)`` hands rows to the detectors (and the store) in
batches of exactly N steps, on the host lane and on the device lane alike; the host lane also
flushes a poisoned step at once (reading the decision there is free), the device lane keeps to
its interval (an early flush would be a host sync).  A probe detector records each batch."""
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.layout import COL

STEPS = 20


class Probe:
    """A detector that records the steps (and the ``bad`` column) of every flush it sees."""

    def __init__(self):
        self.batches, self.bad = [], []

    def bind(self, run):
        self.run = run

    def update(self, steps, rows, run):
        self.batches.append(list(steps))
        self.bad += [s for s, r in zip(steps, rows) if r[COL["bad"]] > 0]
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass


def _run(backend, flush_every, poison=()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = Probe()
    guard = gg.Guard(model, opt, flush_every=flush_every, backend=backend, detectors=[probe])
    assert guard.flush_every == flush_every
    g = torch.Generator().manual_seed(1)
    for i in range(STEPS):
        opt.zero_grad()
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if i in poison:
            model[0].weight.grad[0, 0] = math.nan
        report = guard.step(loss=loss)
        assert report.stats.xp.on_host is (backend == "host")  # the lane asked for ran
        ends = [b[-1] for b in probe.batches]
        assert not ends or ends[-1] <= i  # a flush only ever covers steps already taken
    flushed_before_close = [list(b) for b in probe.batches]
    guard.close()
    return flushed_before_close, probe


def _chunks(steps, n):
    return [steps[a:a + n] for a in range(0, len(steps), n)]


@pytest.mark.parametrize("flush_every", [1, 2, 3, 7, 8, 19, 20, 21])
@pytest.mark.parametrize("backend", ["host", "device"])
def test_flush_every_n_steps_exactly(backend, flush_every):
    before_close, probe = _run(backend, flush_every)
    every = _chunks(list(range(STEPS)), flush_every)
    full = [c for c in every if len(c) == flush_every]
    assert before_close == full  # due flushes: every N steps, at the N-th
    assert probe.batches == every  # close() hands over the rest
    assert probe.bad == []


@pytest.mark.parametrize("flush_every", [3, 8])
def test_poisoned_step_flushes_at_once_on_the_host_lane_only(flush_every):
    poison = (4, 11)
    _, host = _run("host", flush_every, poison)
    _, device = _run("device", flush_every, poison)
    assert device.batches == _chunks(list(range(STEPS)), flush_every)
    # host lane: a flush at each poisoned step, the interval restarting after it
    want, start = [], 0
    for p in (*poison, STEPS - 1):
        while start + flush_every <= p:
            want.append(list(range(start, start + flush_every)))
            start += flush_every
        want.append(list(range(start, p + 1)))
        start = p + 1
    assert host.batches == want
    assert host.bad == device.bad == list(poison)
    # batched differently, every step reaches the detectors once on both lanes
    assert sum(host.batches, []) == sum(device.batches, []) == list(range(STEPS))
