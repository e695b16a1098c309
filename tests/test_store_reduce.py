"""``schema.reduce_groups``: the reshaped fast path equals ``ufunc.reduceat`` bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from gradguard.record.schema import AGG_FIELDS, raw_aggregates, reduce_groups

AWKWARD = [np.nan, np.inf, -np.inf, 1e30, 1e-30, 0.0, -0.0]


def _agg(n, L=5, seed=0):
    rng = np.random.default_rng(seed)
    norms = rng.lognormal(0, 3, (n, L)).astype(np.float32)
    idx = rng.integers(0, norms.size, norms.size // 4)
    norms.flat[idx] = rng.choice(AWKWARD, len(idx))
    glob = rng.normal(0, 1, (n, 3)).astype(np.float32)
    glob.flat[rng.integers(0, glob.size, glob.size // 4)] = np.nan
    return raw_aggregates(np.arange(n, dtype=np.int64) * 3 + 7, glob, norms, norms * 2)


@pytest.mark.parametrize("n, starts", [
    (64, np.arange(0, 64, 8)),                     # aligned, equal groups
    (61, np.r_[0, np.arange(3, 61, 8)]),           # ragged head and tail
    (100, np.r_[0, 5, np.arange(13, 100, 29)]),    # unequal interior -> reduceat
    (10, np.arange(0, 10, 3)),
    (9, np.array([0, 4, 8])),                      # too few groups -> reduceat
    (40, np.arange(0, 40, 1)),                     # groups of one
    (50, np.r_[0, np.arange(2, 50, 16)]),
])
def test_fast_path_equals_reduceat(n, starts):
    agg = _agg(n)
    got = reduce_groups(agg, starts)
    for k, v in agg.items():
        want = AGG_FIELDS[k].reduceat(v, starts, axis=0)
        assert got[k].dtype == want.dtype and got[k].shape == want.shape
        np.testing.assert_array_equal(got[k], want)
        # NaN-skipping min/max: a group keeps NaN only when all its values are NaN
        if k in ("nmax", "nmin"):
            assert np.isnan(got[k]).sum() == np.isnan(want).sum()
