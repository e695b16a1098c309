"""examples/accelerate_loop.py, run in-process with the real accelerate package on CPU."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")

import gradguard as gg  # noqa: E402

_path = Path(__file__).resolve().parents[1] / "examples" / "accelerate_loop.py"
_spec = importlib.util.spec_from_file_location("accelerate_loop", _path)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_guard_step_is_the_plain_accelerate_loop(accumulate):
    """guard.step (GlobalNorm, clip_grad_norm_ off) trains the same weights, with the same lr
    schedule, as accelerator.clip_grad_norm_ + optimizer.step() + scheduler.step()."""
    got, guard, _, lrs, losses = example.train(steps=5, accumulate=accumulate, clip=0.5)
    ref, _, _, ref_lrs, ref_losses = example.train(steps=5, accumulate=accumulate, clip=0.5, guarded=False)
    assert guard.steps == 5 and guard.skipped_steps == 0
    assert lrs == ref_lrs and len(set(lrs)) == 5
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for (n, a), b in zip(got.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7, msg=n)
    assert guard.last_report.clip_coef < 1  # the threshold bites (else the comparison proves little)
    unclipped, *_ = example.train(steps=5, accumulate=accumulate, clip=1e9, guarded=False)
    assert any(not torch.allclose(a, c) for a, c in zip(got.parameters(), unclipped.parameters()))


@pytest.mark.parametrize("accumulate, bad_step", [(1, 0), (3, 2)])
def test_nan_batch_is_withheld_and_the_scheduler_waits(tmp_path, accumulate, bad_step):
    steps = 6
    nan_batch = bad_step * accumulate + accumulate - 1  # the window's last micro-batch
    model, guard, sched, lrs, losses = example.train(steps=steps, accumulate=accumulate, nan_batch=nan_batch,
                                                     log_dir=tmp_path, run_name="acc")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert guard.skipped_steps == 1 and [e.step for e in guard.events if e.kind == "nonfinite"] == [bad_step]
    assert sched.last_epoch == guard.steps - guard.skipped_steps == steps - 1
    *_, ref_lrs, _ = example.train(steps=steps - 1, accumulate=accumulate, guarded=False)
    np.testing.assert_allclose(np.delete(lrs, bad_step + 1), ref_lrs, rtol=1e-12)
    stored = gg.RunStore(tmp_path).steps("acc")
    np.testing.assert_allclose(stored["loss"], losses, rtol=1e-6)  # NaN at the poisoned step, in both
    assert math.isnan(stored["loss"][bad_step])
    np.testing.assert_allclose(stored["lr"], lrs, rtol=1e-6)
