"""Spike detectors: a spike enters the baseline clipped to the threshold, never at its own value.

Both ``SpikeDetector`` (log global gradient norm) and ``LossSpikeDetector`` (log loss) keep a
median / MAD baseline over a window.  A value that fires is appended to that window as the
threshold it crossed, so a burst of spikes cannot drag the median (and the MAD) up to the spike
level and hide the spikes that follow.  These tests feed synthetic rows straight to the
detector (layout ``gradguard.layout``) and check every spike of a burst is reported, and that
the baseline each event reports stays the clean one, not the spikes'.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard import detect as D
from gradguard.layout import GLOBAL_COLS

NAMES = ["a.weight", "b.weight"]


def _bound(det):
    params = [nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3))]
    return gg.Guard(list(zip(NAMES, params)), torch.optim.SGD(params, lr=0.1), detectors=[det])


def _row(gnorm, loss):
    head = dict(bad=0.0, skipped=0.0, loss=loss, loss_bad=0.0, global_norm=gnorm, clip_coef=1.0,
                lr=0.1, param_norm=math.nan)
    layers = [gnorm * 0.6, gnorm * 0.8]
    return np.asarray([head[c] for c in GLOBAL_COLS] + layers + layers, np.float32)


def _series(n_clean, burst, spike, seed=0):
    """``n_clean`` values around 1 (log-normal, sigma 0.05), then ``burst`` values ``spike``."""
    rng = np.random.default_rng(seed)
    clean = np.exp(rng.normal(0.0, 0.05, n_clean))
    return np.concatenate([clean, np.full(burst, spike)])


DETECTORS = {
    "spike": lambda w: D.SpikeDetector(window=w, warmup=w, cooldown=0),
    "loss_spike": lambda w: D.LossSpikeDetector(window=w, warmup=w, cooldown=0),
}


def _feed(kind, det, values, per_flush, start=0, guard=None):
    guard = guard or _bound(det)
    rows = [_row(v, 1.0) if kind == "spike" else _row(1.0, v) for v in values]
    events = []
    for a in range(0, len(rows), per_flush):  # the same rows in flushes of any size
        chunk = rows[a:a + per_flush]
        events += det.update(list(range(start + a, start + a + len(chunk))), np.stack(chunk), guard.run)
    return events, guard


@pytest.mark.parametrize("per_flush", [1, 3, 64])
@pytest.mark.parametrize("window", [3, 5, 8, 20])
@pytest.mark.parametrize("kind", list(DETECTORS))
def test_a_burst_of_spikes_is_reported_spike_by_spike(kind, window, per_flush):
    # spikes up to just over half the window: the median of a window holding the spikes' own
    # values would be the spike level there, and the last spike would go unreported
    n_clean, burst = 2 * window, window // 2 + 1
    values = _series(n_clean, burst, 1e6)
    events, _ = _feed(kind, DETECTORS[kind](window), values, per_flush)
    assert [e.step for e in events] == list(range(n_clean, n_clean + burst))
    key = "median_norm" if kind == "spike" else "median_loss"
    for e in events:
        # the median each spike is judged against: the clean level, or at most the clipped
        # thresholds of the spikes before it -- nowhere near the spikes' own 1e6
        assert math.log(e.data[key]) < math.log(1e6) / 2, (e.step, e.data[key])


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_baseline_holds_the_threshold_not_the_spike(kind):
    det = DETECTORS[kind](8)
    values = _series(16, 1, 1e6)
    events, guard = _feed(kind, det, values, 5)
    assert [e.step for e in events] == [16]
    last = det.state_dict()["hist"][-1]
    level = math.log(last) if kind == "loss_spike" else last  # spike: log norms; loss: raw losses
    assert level < math.log(1e6) / 2, det.state_dict()["hist"]
    # ... and a second spike after it, as large, is still one
    more, _ = _feed(kind, det, [1e6], 1, start=17, guard=guard)
    assert len(more) == 1


def test_spike_detector_defaults_as_documented():
    """Defaults: no verdict before 20 finite steps (``warmup``), a spike at 5x the median
    (``ratio``) fires, 4x does not."""
    clean = list(np.ones(20))
    assert _feed("spike", D.SpikeDetector(), clean[:19] + [1e3], 64)[0] == []  # 19 steps: warm-up
    events, _ = _feed("spike", D.SpikeDetector(), clean + [1e3], 64)
    assert [e.step for e in events] == [20]
    assert _feed("spike", D.SpikeDetector(), clean + [4.0], 64)[0] == []
    assert [e.step for e in _feed("spike", D.SpikeDetector(), clean + [5.5], 64)[0]] == [20]


def test_spike_of_exactly_critical_times_the_median_is_critical():
    """'A jump of at least ``critical`` x the median is critical': the bound is inclusive."""
    values = list(np.ones(20)) + [3e3]
    (ev,), _ = _feed("spike", D.SpikeDetector(critical=1e9), values, 64)
    assert ev.severity == "info"
    ratio = ev.data["ratio"]  # the ratio as the detector computes it, to the last bit
    (at,), _ = _feed("spike", D.SpikeDetector(critical=ratio), values, 64)
    (above,), _ = _feed("spike", D.SpikeDetector(critical=math.nextafter(ratio, math.inf)), values, 64)
    assert (at.severity, above.severity) == ("critical", "info")


def test_loss_spike_default_cooldown():
    """Default ``cooldown=10``: a second jump 10 steps after a reported one is reported, 9 is not."""
    base = list(np.ones(20))
    for gap, want in ((10, [20, 30]), (9, [20])):
        values = base + [3.0] + [1.0] * (gap - 1) + [3.0] + [1.0] * 3
        events, _ = _feed("loss_spike", D.LossSpikeDetector(), values, 64)
        assert [e.step for e in events] == want, gap


@pytest.mark.parametrize("per_flush", [1, 64])
def test_loss_spike_leaves_raw_space_once_the_non_positive_loss_is_out_of_the_window(per_flush):
    """A loss <= 0 sends the judgement to raw values while it is in the window; `window` steps
    later the log-space baseline is back.  Losses around 100 (1% noise): 130 is a jump in raw
    values (12 MADs) but not in log space (below 1.5x the median)."""
    rng = np.random.default_rng(3)
    values = list(100 * np.exp(rng.normal(0, 0.01, 40)))
    values[3] = 0.0
    det = D.LossSpikeDetector(window=10, warmup=10)
    events, _ = _feed("loss_spike", det, values + [130.0], per_flush)
    assert events == []
    # the same 130 with the non-positive loss inside the window: raw space, a jump
    values[35] = 0.0
    events, _ = _feed("loss_spike", D.LossSpikeDetector(window=10, warmup=10), values + [130.0], per_flush)
    assert [e.step for e in events] == [40]
