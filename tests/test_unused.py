"""UnusedDetector on synthetic rows: the default patience, and the row that completes the count
is part of it (its gradients count as seen)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.layout import GLOBAL_COLS

NAMES = ["a.weight", "b.weight", "c.bias"]


def _rows(n, b_at=()):
    """``n`` rows: ``a`` has a gradient on every step, ``b`` only at the steps ``b_at``, ``c`` never
    (a NaN norm: no gradient)."""
    head = dict(bad=0.0, skipped=0.0, loss=1.0, loss_bad=0.0, global_norm=1.0, clip_coef=1.0, lr=0.1,
                param_norm=math.nan)
    out = []
    for i in range(n):
        norms = [1.0, 0.5 if i in b_at else math.nan, math.nan]
        out.append([head[c] for c in GLOBAL_COLS] + norms + norms)
    return np.asarray(out, np.float32)


def _feed(det, rows, per_flush):
    params = [nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))]
    guard = gg.Guard(list(zip(NAMES, params)), torch.optim.SGD(params, lr=0.1), detectors=[det])
    events = []
    for a in range(0, len(rows), per_flush):
        chunk = rows[a:a + per_flush]
        events += det.update(list(range(a, a + len(chunk))), chunk, guard.run)
    return events


@pytest.mark.parametrize("per_flush", [1, 7, 128])
def test_default_patience_is_100_steps(per_flush):
    assert _feed(gg.UnusedDetector(), _rows(99), per_flush) == []
    (ev,) = _feed(gg.UnusedDetector(), _rows(120), per_flush)
    assert ev.step == 99 and ev.data["steps"] == 100 and "in 100 steps" in ev.message
    assert ev.layers == ["b.weight", "c.bias"]


@pytest.mark.parametrize("per_flush", [1, 5, 64])
def test_the_row_completing_the_count_counts(per_flush):
    """``b`` has a gradient only on the 20th step, the one that spends the patience: it was used."""
    (ev,) = _feed(gg.UnusedDetector(patience=20), _rows(30, b_at=(19,)), per_flush)
    assert (ev.step, ev.layers, ev.data["steps"]) == (19, ["c.bias"], 20)
