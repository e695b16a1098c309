"""The learning rate of every param group reaches the store and the sinks (lr_group1, ...)."""
from __future__ import annotations

from functools import partial
import math

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.layout import GLOBAL_COLS
from gradguard.lr_groups import GroupLRs

from _helpers import mlp


class Collect:
    """A sink that keeps what the recorder hands it."""

    def __init__(self):
        self.cols, self.rows = None, []

    def open(self, run_name, layers, config):
        pass

    def write_steps(self, steps, rows, global_cols):
        self.cols = tuple(global_cols)
        self.rows.append(np.array(rows))

    def write_events(self, events):
        pass

    def close(self):
        pass


_model = partial(mlp, 4, 8, 1)


def _backward(model, i, poison=False):
    g = torch.Generator().manual_seed(i)
    model.zero_grad()
    loss = ((model(torch.randn(8, 4, generator=g)) - 1) ** 2).mean()
    loss.backward()
    if poison:
        model[0].weight.grad[0, 0] = math.nan


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("backend", ["host", "device"])
def test_every_group_lr_is_recorded(tmp_path, backend, tensor_lr):
    model = _model()
    lr = (lambda v: torch.tensor(v)) if tensor_lr else (lambda v: v)
    groups = [{"params": [model[0].weight], "lr": lr(0.1)}, {"params": [model[0].bias], "lr": lr(0.05)},
              {"params": list(model[2].parameters()), "lr": lr(0.01)}]
    opt = torch.optim.Adam(groups)
    # per-group factors: the groups' ratios change every step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda k: 0.9 ** k, lambda k: 0.5 ** k, lambda k: 1.0 + k])
    sink = Collect()
    guard = gg.Guard(model, opt, scheduler=sched, backend=backend, log_dir=tmp_path, run_name="g",
                     sinks=[sink], flush_every=4, detectors=[])
    used = []
    for i in range(10):
        _backward(model, i, poison=i == 3)
        used.append([float(g["lr"]) for g in opt.param_groups])
        guard.step()
    guard.close()
    used = np.array(used)
    steps = gg.RunStore(tmp_path).steps("g")
    assert [k for k in steps if k.startswith("lr")] == ["lr", "lr_group1", "lr_group2"]
    for j, col in enumerate(["lr", "lr_group1", "lr_group2"]):
        np.testing.assert_allclose(steps[col], used[:, j], rtol=1e-6, err_msg=col)
    assert used[3].tolist() == used[4].tolist()  # the withheld step moved no group's lr
    assert sink.cols == GLOBAL_COLS + ("lr_group1", "lr_group2")
    np.testing.assert_allclose(np.concatenate(sink.rows)[:, len(GLOBAL_COLS)], used[:, 1], rtol=1e-6)
    assert not guard._group_lrs._by_step  # nothing kept after the flush


def test_one_group_store_is_unchanged(tmp_path):
    model = _model()
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), log_dir=tmp_path, run_name="one")
    for i in range(3):
        _backward(model, i)
        guard.step()
    guard.close()
    cols = [k for k in gg.RunStore(tmp_path).steps("one") if k != "step"]
    assert tuple(cols) == GLOBAL_COLS


def test_without_a_store_nothing_accumulates():
    model = _model()
    opt = torch.optim.SGD([{"params": [model[0].weight]}, {"params": [p for n, p in model.named_parameters()
                                                                       if n != "0.weight"]}], lr=0.1)
    guard = gg.Guard(model, opt, flush_every=2)
    for i in range(5):
        _backward(model, i)
        guard.step()
    guard.flush()
    assert not guard._group_lrs._by_step


def test_splice_fills_unread_steps_with_nan():
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]},
                           {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.5}], lr=0.1)
    glr = GroupLRs(opt)
    glr.read(7)
    rows = np.arange(2 * (len(GLOBAL_COLS) + 4), dtype=np.float32).reshape(2, -1)
    out, cols = glr.splice([7, 8], rows, GLOBAL_COLS)
    assert cols == GLOBAL_COLS + ("lr_group1",)
    assert out[0, len(GLOBAL_COLS)] == 0.5 and math.isnan(out[1, len(GLOBAL_COLS)])
    np.testing.assert_array_equal(np.delete(out, len(GLOBAL_COLS), axis=1), rows)
