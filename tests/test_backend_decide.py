"""The step decision and its two array backends, against references.

``decide`` and ``norm_coefficient`` are written once for numpy scalars (HOST, CPU) and 0-dim
tensors (DEVICE, accelerators); both must give torch's ``clip_grad_norm_`` coefficient
bit for bit, and the decision's truth table (poisoned / held / skip) must be exactly the one
documented.  These run in milliseconds: they are the first thing ``scripts/mutate.py`` runs
against a mutant of ``decide.py`` or ``backend.py``.
"""
from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.backend import DEVICE, HOST, norm_coefficient
from gradguard.decide import StepReport, decide, loss_value
from gradguard.stats import compute_stats

from _helpers import assert_bitwise, bits

AWKWARD = [0.0, -0.0, 1e-45, 1e-38, 1e-7, 0.5, 1.0, 1.0 - 2 ** -24, 3.0, 1e6, 3.4e38,
           math.inf, -math.inf, math.nan]
MAX_NORMS = [1e-3, 0.5, 1.0, 2.0, 1e30, math.inf]
BACKENDS = {"host": HOST, "device": DEVICE}


def _arr(xp, value, dtype=np.float32):
    return xp.asarray(np.asarray(value, dtype))


def _torch_coef(max_norm: float, total: float, dtype=torch.float32) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s coefficient, its own expression, on a 0-dim total."""
    t = torch.tensor(total, dtype=dtype)
    return torch.clamp(max_norm / (t + 1e-6), max=1.0)


@pytest.mark.parametrize("xp", list(BACKENDS))
@pytest.mark.parametrize("max_norm", MAX_NORMS)
@pytest.mark.parametrize("total", AWKWARD)
def test_norm_coefficient_is_torchs_bit_for_bit(xp, max_norm, total):
    xp = BACKENDS[xp]
    got = torch.as_tensor(np.asarray(xp.to_host(norm_coefficient(max_norm, _arr(xp, total), xp))))
    want = _torch_coef(max_norm, total)
    if not math.isfinite(total):  # a NaN/Inf total never scales: 1, not torch's 0 or NaN
        want = torch.tensor(1.0)
    assert got.dtype == torch.float32 and got.shape == ()
    assert_bitwise(got, want)


@pytest.mark.parametrize("total", [0.0, 1e-7, 0.3, 1.0, 7.5, 1e20, math.inf, math.nan])
def test_norm_coefficient_takes_the_given_flag(total):
    """``bad`` given by the caller replaces the finiteness test (the statistics' own flag)."""
    for xp in BACKENDS.values():
        t = _arr(xp, total)
        forced = np.asarray(xp.to_host(norm_coefficient(0.5, t, xp, bad=xp.flag(True, t))))
        assert forced == np.float32(1.0)
        kept = np.asarray(xp.to_host(norm_coefficient(0.5, t, xp, bad=xp.flag(False, t))))
        want = _torch_coef(0.5, total)
        assert bits(torch.as_tensor(kept)) == bits(want) or (math.isnan(want) and np.isnan(kept))


def test_norm_coefficient_array_threshold():
    """AutoClip passes its threshold as an array: same numbers as a float threshold."""
    for xp, total, thr in itertools.product(BACKENDS.values(), [0.1, 2.0, 9e9], [0.05, 1.0, 4.0]):
        a = norm_coefficient(_arr(xp, thr), _arr(xp, total), xp)
        b = norm_coefficient(thr, _arr(xp, total), xp)
        assert np.asarray(xp.to_host(a)).tobytes() == np.asarray(xp.to_host(b)).tobytes()


@pytest.mark.parametrize("x", AWKWARD)
def test_backend_primitives_agree_with_numpy(x):
    """HOST and DEVICE: the same IEEE results for every awkward float32."""
    for xp in BACKENDS.values():
        a = _arr(xp, x)
        assert bool(xp.to_host(xp.nonfinite(a))) == (not math.isfinite(x))
        assert np.asarray(xp.to_host(xp.minimum(a, 1.0))).tobytes() == np.minimum(np.float32(x), np.float32(1)).tobytes()
        with np.errstate(all="ignore"):
            assert np.asarray(xp.to_host(xp.reciprocal(a))).tobytes() == np.reciprocal(np.float32(x)).tobytes()
        for cond in (True, False):
            got = np.asarray(xp.to_host(xp.where(xp.flag(cond, a), 1.0, a)))
            assert got.dtype == np.float32, "a Python number takes the array's dtype"
            assert got.tobytes() == (np.float32(1.0) if cond else np.float32(x)).tobytes()
        assert bool(xp.to_host(xp.flag(True, a))) is True and bool(xp.to_host(xp.flag(False, a))) is False
        s = xp.scalar(2.5, a)
        assert np.asarray(xp.to_host(s)).dtype == np.float32 and float(xp.to_host(s)) == 2.5
        assert torch.as_tensor(np.asarray(xp.to_host(a))).dtype == xp.tensor(a).dtype == torch.float32


def test_host_where_on_arrays_keeps_dtype_and_picks_elementwise():
    cond = np.array([True, False, True])
    x = np.array([1.0, 2.0, 3.0], np.float64)
    got = HOST.where(cond, x, 0.0)
    assert got.dtype == np.float64 and got.tolist() == [1.0, 0.0, 3.0]
    got = DEVICE.where(torch.from_numpy(cond), torch.from_numpy(x), torch.zeros(3, dtype=torch.float64))
    assert got.tolist() == [1.0, 0.0, 3.0]


def test_asarray_like_casts():
    like = np.asarray(1.0, np.float64)
    assert HOST.asarray(3, like).dtype == np.float64
    t = torch.ones((), dtype=torch.float64)
    assert DEVICE.asarray(np.float32(2.0), t).dtype == torch.float64
    assert DEVICE.asarray(torch.ones(()), t).dtype == torch.float64
    assert DEVICE.asarray(torch.ones(()), None).dtype == torch.float32


# ------------------------------------------------------------------ decide


def _stats(xp, poisoned: bool):
    g = [torch.tensor([3.0, 4.0]), torch.tensor([[12.0]])]  # global norm 13
    if poisoned:
        g[1][0, 0] = math.nan
    return compute_stats(["a", "b"], g, xp=xp), g


class _Recorder(gg.GlobalNorm):
    """GlobalNorm that records the verdict its statistics carried."""

    def coefficient(self, grads, stats):
        self.seen_flag = bool(stats.xp.to_host(stats.flag))
        return super().coefficient(grads, stats)


CASES = list(itertools.product([False, True], [None, False, True], [False, True], [False, True],
                               [None, False, True]))


@pytest.mark.parametrize("xp", list(BACKENDS))
@pytest.mark.parametrize("poisoned, loss_bad, held, skip_nonfinite, other_rank", CASES)
def test_decide_truth_table(xp, poisoned, loss_bad, held, skip_nonfinite, other_rank):
    """bad = NaN grad | NaN loss | another rank's NaN; skip = held | (bad & skip mode);
    the policy sees bad | held; the coefficient is the un-vetoed torch one."""
    xp = BACKENDS[xp]
    stats, grads = _stats(xp, poisoned)
    lb = None if loss_bad is None else xp.flag(loss_bad, stats.total)
    agree = None if other_rank is None else (lambda b: b | xp.flag(other_rank, stats.total))
    policy = _Recorder(1.0)
    d, seen = decide(stats, lb, held=held, skip_nonfinite=skip_nonfinite, clip=policy, grads=grads,
                     agree=agree)
    bad = poisoned or bool(loss_bad) or bool(other_rank)
    h = lambda v: bool(xp.to_host(v))  # noqa: E731
    assert h(d.bad) is bad
    assert h(d.loss_bad) is bool(loss_bad)
    assert d.held is held and d.may_skip is (held or skip_nonfinite)
    assert h(d.skip) is (held or (skip_nonfinite and bad))
    assert policy.seen_flag is (bad or held) and h(seen.flag) is (bad or held)
    assert h(stats.flag) is poisoned, "decide must not change the caller's statistics"
    want = torch.tensor(1.0) if poisoned else _torch_coef(1.0, 13.0)
    assert_bitwise(torch.as_tensor(np.asarray(xp.to_host(d.coef))), want)


@pytest.mark.parametrize("xp", list(BACKENDS))
def test_decide_without_policy(xp):
    xp = BACKENDS[xp]
    stats, grads = _stats(xp, False)
    d, _ = decide(stats, None, held=False, skip_nonfinite=True, clip=None, grads=grads)
    assert d.coef is None and not bool(xp.to_host(d.skip)) and d.may_skip


# -------------------------------------------------------------- loss_value

LOSSES = [0.25, 3, np.float64(2.5), np.float32(-1.0), torch.tensor(0.75), torch.tensor([1.5]),
          torch.tensor(7, dtype=torch.int64), torch.tensor(0.5, dtype=torch.float64),
          torch.tensor(2.0, dtype=torch.bfloat16), 1e39, -1e39, math.nan, math.inf,
          torch.tensor(math.inf), 10 ** 400 // 10 ** 360]


@pytest.mark.parametrize("xp", list(BACKENDS))
@pytest.mark.parametrize("loss", LOSSES, ids=lambda v: repr(v)[:24])
def test_loss_value_is_float32_and_flags_nonfinite(xp, loss):
    xp = BACKENDS[xp]
    like = xp.asarray(np.float32(0.0)) if xp.on_host else torch.zeros(())
    with warnings.catch_warnings():  # a loss beyond float32 is Inf, without numpy's overflow warning
        warnings.simplefilter("error")
        v, bad = loss_value(loss, xp, like)
    f = float(loss.float()) if torch.is_tensor(loss) else float(loss)
    want = np.float32(f) if abs(f) <= 3.4028234663852886e38 or f != f else np.float32(math.copysign(math.inf, f))
    got = np.asarray(xp.to_host(v))
    assert got.dtype == np.float32 and got.tobytes() == np.asarray(want).tobytes()
    assert bool(xp.to_host(bad)) is (not math.isfinite(want))


@pytest.mark.parametrize("bad, err", [(True, TypeError), (np.bool_(False), TypeError), ("1.0", TypeError),
                                      (torch.tensor([1.0, 2.0]), ValueError),
                                      (torch.tensor(1 + 2j), TypeError), (torch.tensor(True), TypeError),
                                      (torch.empty((), device="meta"), ValueError), (10 ** 400, ValueError)])
def test_loss_value_rejects_with_the_argument_named(bad, err):
    for xp in BACKENDS.values():
        with pytest.raises(err, match="loss"):
            loss_value(bad, xp, xp.asarray(np.float32(0.0)) if xp.on_host else torch.zeros(()))
    assert loss_value(None, HOST, None) == (None, None)


@pytest.mark.parametrize("xp", list(BACKENDS))
def test_step_report_reads_the_decision(xp):
    xp = BACKENDS[xp]
    stats, _ = _stats(xp, False)
    coef = xp.asarray(np.float32(0.25))
    r = StepReport(3, stats, coef, xp.flag(True, stats.total), xp.asarray(np.float32(1.5)), xp)
    assert (r.step, r.global_norm, r.clip_coef, r.skipped, r.applied, r.loss) == (3, 13.0, 0.25, True, False, 1.5)
    assert float(r.clip_coef_t) == 0.25 and bool(r.skipped_t) and float(r.loss_t) == 1.5
    assert float(r.global_norm_t) == 13.0
    r = StepReport(0, stats, coef, xp.flag(False, stats.total), None, xp)
    assert r.applied is True and r.loss is None and r.loss_t is None
    assert repr(r) == "StepReport(step=0, global_norm=13, clip_coef=0.25, skipped=False)"


@pytest.mark.parametrize("x", [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, 3.0])
def test_host_reciprocal_never_warns(x):
    """numpy warns on 1/0, 1/inf overflow and NaN; the decision runs every step, and a
    warning per poisoned step (or a warnings-as-errors run failing) is not acceptable."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = HOST.reciprocal(np.float32(x))
        arr = HOST.reciprocal(np.array([x, 0.0, 2.0], np.float32))
    with np.errstate(all="ignore"):
        want = np.reciprocal(np.float32(x))
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
    assert arr.tobytes() == np.array([want, np.inf, 0.5], np.float32).tobytes()


@pytest.mark.parametrize("max_norm", [math.inf, 1.0, 3e38])
@pytest.mark.parametrize("total", [math.inf, -math.inf, math.nan, 0.0, 1e-38, 3e38])
def test_norm_coefficient_never_warns(total, max_norm):
    """``GlobalNorm(inf)`` ("measure, never clip") on a poisoned step multiplies the reciprocal
    of an infinite total (0) by an infinite threshold: NaN, then masked by the ``where``; a
    tiny total times a huge threshold overflows.  Neither may warn (a warnings-as-errors run
    would fail on every poisoned step); the coefficient is torch's on both backends."""
    for xp in BACKENDS.values():
        t = _arr(xp, total)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = np.asarray(xp.to_host(norm_coefficient(max_norm, t, xp)))
        want = 1.0 if not math.isfinite(total) else _torch_coef(max_norm, total)
        assert bits(torch.as_tensor(got)) == bits(torch.as_tensor(np.float32(want)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert HOST.mul(np.float32(0.0), math.inf) != HOST.mul(np.float32(0.0), math.inf)  # NaN, silently
        assert HOST.mul(np.float32(3e38), 10.0) == np.inf


def test_host_where_broadcasts_an_array_condition():
    """An array condition with scalar branches is elementwise (torch.where's rule), not a
    Python branch on the array's truth."""
    cond = np.array([True, False, True])
    got = HOST.where(cond, np.float32(1.0), np.float32(2.0))
    assert got.dtype == np.float32 and got.tolist() == [1.0, 2.0, 1.0]
    got = HOST.where(cond, 0.5, np.array([7.0, 8.0, 9.0], np.float64))
    assert got.dtype == np.float64 and got.tolist() == [0.5, 8.0, 0.5]
    # a scalar condition with an array branch broadcasts too (torch.where(True, 1.0, t) is full)
    got = HOST.where(np.bool_(True), 1.0, np.array([7.0, 8.0], np.float32))
    assert got.dtype == np.float32 and got.tolist() == [1.0, 1.0]
    got = HOST.where(np.bool_(False), np.array([7.0, 8.0], np.float32), 3.0)
    assert got.tolist() == [3.0, 3.0]
    want = torch.where(torch.from_numpy(cond), torch.tensor(1.0), torch.tensor(2.0))
    assert DEVICE.where(torch.from_numpy(cond), torch.tensor(1.0), torch.tensor(2.0)).tolist() == want.tolist()
