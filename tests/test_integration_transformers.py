"""GradGuardCallback inside a real transformers.Trainer on a tiny random GPT-2 (no hub access)."""
import math
import warnings
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import gradguard as gg  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _trainer():
    """The Trainer, gradguard's integration and the callback built on them
    (tests/_transformers_kit.py), imported when this module's first test runs rather than at
    collection: every xdist worker collects every file, and these take ~4 s of CPU to import."""
    global GradGuardCallback, GuardedTrainer, Snapshot
    import _transformers_kit as kit
    GradGuardCallback, GuardedTrainer, Snapshot = kit.GradGuardCallback, kit.GuardedTrainer, kit.Snapshot

BAD_STEP = 4  # optimizer step (0-based) whose forward returns NaN logits


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(cfg)


class Data(torch.utils.data.Dataset):
    def __init__(self, n=40):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 40, (n, 12), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def poison_at(model, step):
    """Forward hook making the logits NaN at one forward call (batch = optimizer step here)."""
    calls = {"n": 0}

    def hook(mod, inp, out):
        calls["n"] += 1
        return out * math.nan if calls["n"] == step + 1 else out

    model.lm_head.register_forward_hook(hook)


def make_trainer(tmp_path, model, callbacks, steps=10, max_grad_norm=0.0):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, logging_steps=2,
        learning_rate=1e-2, weight_decay=0.1, max_grad_norm=max_grad_norm, report_to=[],
        save_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=callbacks)


def test_train_skips_poisoned_step_and_logs(tmp_path):
    model = tiny_model()
    poison_at(model, BAD_STEP)
    cb, snap = GradGuardCallback(clip=gg.GlobalNorm(0.5)), Snapshot(BAD_STEP)
    tr = make_trainer(tmp_path, model, [cb, snap])
    tr.train()

    assert all(torch.isfinite(p).all() for p in model.parameters())
    g = cb.guard
    assert g.steps == 10 and g.skipped_steps == 1
    ev = [e for e in g.events if e.kind == "nonfinite"]
    assert [e.step for e in ev] == [BAD_STEP]
    assert ev[0].layers  # the culprit tensors are named (Trainer did not clip first)
    (w0, s0), (w1, s1) = snap.before, snap.after
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
    for a, b in zip(s0, s1):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    train_logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(train_logs) == 5
    for h in train_logs:
        assert h["gradguard/steps"] == 2
        assert h["gradguard/global_norm_max"] > 0 and math.isfinite(h["gradguard/global_norm_mean"])
        assert 0 < h["gradguard/clip_coef_min"] <= 1
    assert [h["gradguard/skipped"] for h in train_logs] == [0, 0, 1, 0, 0]
    assert [h["gradguard/skipped_total"] for h in train_logs] == [0, 0, 1, 1, 1]
    # The policy clipped: pre-clip norms of a fresh GPT-2 are far above 0.5.
    assert min(h["gradguard/clip_coef_min"] for h in train_logs) < 1


def test_clipping_matches_trainer_max_grad_norm(tmp_path):
    """gradguard's GlobalNorm(c) with max_grad_norm=0 trains the same weights as max_grad_norm=c."""
    m1, m2 = tiny_model(1), tiny_model(1)
    make_trainer(tmp_path / "a", m1, [GradGuardCallback(clip=gg.GlobalNorm(0.3))], steps=4).train()
    make_trainer(tmp_path / "b", m2, [], steps=4, max_grad_norm=0.3).train()
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    m3 = tiny_model(1)
    make_trainer(tmp_path / "c", m3, [], steps=4).train()  # unclipped: must differ
    assert any(not torch.allclose(a, c, rtol=1e-4) for a, c in zip(m1.parameters(), m3.parameters()))


def test_delegated_clipping_still_skips(tmp_path):
    model = tiny_model()
    poison_at(model, 2)
    cb = GradGuardCallback(clip=None)
    make_trainer(tmp_path, model, [cb], steps=5, max_grad_norm=1.0).train()
    assert cb.guard.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_warns_when_both_clip(tmp_path):
    with pytest.warns(UserWarning, match="max_grad_norm"):
        make_trainer(tmp_path, tiny_model(), [GradGuardCallback(clip=gg.GlobalNorm(1.0))], steps=1,
                     max_grad_norm=1.0).train()


def test_guard_state_round_trip(tmp_path):
    model = tiny_model()
    poison_at(model, 1)
    cb = GradGuardCallback()
    make_trainer(tmp_path, model, [cb], steps=3).train()
    cb2 = GradGuardCallback()
    make_trainer(tmp_path, tiny_model(), [cb2], steps=1).train()
    cb2.guard.load_state_dict(cb.guard.state_dict())
    assert cb2.guard.state_dict() == cb.guard.state_dict()


@pytest.mark.parametrize("bad, exc", [({"clip": 0.5}, TypeError), ({"on_nonfinite": "nan"}, ValueError)])
def test_bad_arguments(bad, exc):
    with pytest.raises(exc):
        GradGuardCallback(**bad)


def test_default_detectors_are_kept(tmp_path):
    """The logging window is a row observer, not a detector: the guard keeps its default
    detectors (before, passing the window as `detectors` replaced them)."""
    cb = GradGuardCallback()
    make_trainer(tmp_path, tiny_model(), [cb], steps=2).train()
    assert [type(d).__name__ for d in cb.guard.detectors] == [type(d).__name__ for d in gg.default_detectors()]
    assert cb.window in cb.guard._observers


# ------------------------------------------------------------ the loss, the scheduler


def guarded_trainer(tmp_path, model, callbacks, steps, accumulate=1, scheduler=False):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, logging_steps=1,
        learning_rate=1e-2, max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0, gradient_accumulation_steps=accumulate,
        logging_nan_inf_filter=False)
    optimizers = (None, None)
    if scheduler:  # a schedule that depends on the scheduler's step count only (not max_steps)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        optimizers = (opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8 ** s))
    return GuardedTrainer(model=model, args=args, train_dataset=Data(), callbacks=callbacks,
                          optimizers=optimizers)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_store_loss_is_the_logged_loss(tmp_path, accumulate):
    cb = GradGuardCallback(log_dir=tmp_path / "runs", run_name="hf")
    tr = guarded_trainer(tmp_path, tiny_model(), [cb], steps=5, accumulate=accumulate)
    tr.train()
    logged = [h["loss"] for h in tr.state.log_history if "loss" in h]
    stored = gg.RunStore(tmp_path / "runs").steps("hf")["loss"]
    assert len(logged) == 5 and np.isfinite(stored).all()
    np.testing.assert_allclose(stored, logged, rtol=1e-5)


def test_plain_trainer_warns_that_the_loss_is_missing(tmp_path):
    cb = GradGuardCallback()
    with pytest.warns(UserWarning, match="GuardedTrainer"):
        make_trainer(tmp_path, tiny_model(), [cb], steps=2).train()
    assert cb.guard.last_report.loss is None


def test_nan_loss_with_finite_gradients_is_skipped(tmp_path):
    """Only the loss tells this step apart: its value is NaN, its gradients are not."""
    class NanLoss(GuardedTrainer):
        def compute_loss(self, model, inputs, **kw):
            loss = super().compute_loss(model, inputs, **kw)
            return loss + (math.nan if self.state.global_step == 2 else 0.0) * loss.detach()

    cb = GradGuardCallback()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, logging_steps=1,
        max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    model = tiny_model()
    NanLoss(model=model, args=args, train_dataset=Data(), callbacks=[cb]).train()
    assert cb.guard.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("bad_step", [0, 3])
def test_scheduler_does_not_advance_on_a_withheld_step(tmp_path, bad_step):
    steps = 6
    model = tiny_model()
    poison_at(model, bad_step)
    cb = GradGuardCallback(log_dir=tmp_path / "runs", run_name="poisoned")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch's "scheduler before optimizer" included
        tr = guarded_trainer(tmp_path / "p", model, [cb], steps=steps, scheduler=True)
        tr.train()
    assert cb.guard.skipped_steps == 1
    applied = cb.guard.steps - cb.guard.skipped_steps
    assert tr.lr_scheduler.last_epoch == applied == steps - 1
    ref_cb = GradGuardCallback(log_dir=tmp_path / "runs", run_name="ref")
    guarded_trainer(tmp_path / "r", tiny_model(), [ref_cb], steps=steps - 1, scheduler=True).train()
    store = gg.RunStore(tmp_path / "runs")
    lr, ref = store.steps("poisoned")["lr"], store.steps("ref")["lr"]
    # the withheld step leaves the lr where it was: without its row, the reference sequence
    np.testing.assert_allclose(np.delete(lr, bad_step + 1), ref, rtol=1e-6)
    assert lr[bad_step] == lr[bad_step + 1]
    # and the Trainer's own logs say the same
    logged = [h["learning_rate"] for h in tr.state.log_history if "learning_rate" in h]
    np.testing.assert_allclose(logged, lr, rtol=1e-6)
