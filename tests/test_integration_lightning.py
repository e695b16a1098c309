"""GradGuardCallback inside a real lightning.pytorch Trainer (CPU, tiny model)."""
import importlib.util
import math
import warnings

import numpy as np

import pytest
import torch

if importlib.util.find_spec("lightning") is None:
    pytest.skip("needs lightning", allow_module_level=True)

import gradguard as gg  # noqa: E402
from _helpers import assert_bitwise  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _lightning():
    """Lightning and the classes built on it (tests/_lightning_kit.py), imported when this
    module's first test runs rather than at collection: every xdist worker collects every
    file, and importing Lightning takes ~4 s of CPU."""
    global pl, GradGuardCallback, Tiny, Snapshot, Scheduled
    import _lightning_kit as kit
    pl, GradGuardCallback, Tiny, Snapshot, Scheduled = kit.pl, kit.GradGuardCallback, kit.Tiny, kit.Snapshot, kit.Scheduled


BAD_STEP = 7


def loader(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * 4, 4, generator=g)
    y = x.sum(1, keepdim=True) * 3
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def trainer(tmp_path, callbacks, steps=20, **kw):
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path),
                      log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, callbacks=callbacks, **kw)


@pytest.mark.parametrize("poison", ["loss", "inf"])
def test_fit_skips_poisoned_step_bitwise(tmp_path, poison):
    torch.manual_seed(0)
    model = Tiny(bad_steps={BAD_STEP}, poison=poison)
    cb, snap = GradGuardCallback(clip=gg.GlobalNorm(1.0)), Snapshot(BAD_STEP)
    trainer(tmp_path, [cb, snap]).fit(model, loader())

    assert all(torch.isfinite(p).all() for p in model.parameters())
    guard = cb.guard
    assert guard.steps == 20 and guard.skipped_steps == 1
    ev = [e for e in guard.events if e.kind == "nonfinite"]
    assert [e.step for e in ev] == [BAD_STEP]
    assert_bitwise(snap.before, snap.after, "weights and optimizer state")
    # The steps around it did train: Adam's step counter advanced on every other step.
    steps = {float(st["step"]) for st in model.trainer.optimizers[0].state.values()}
    assert steps == {19.0}


def test_metrics_reach_the_logger(tmp_path):
    torch.manual_seed(0)
    model = Tiny(bad_steps={3})
    cb = GradGuardCallback(clip=gg.GlobalNorm(0.5))
    t = trainer(tmp_path, [cb], steps=6)
    t.fit(model, loader())
    import csv

    rows = list(csv.DictReader(open(t.logger.log_dir + "/metrics.csv")))
    skipped = [r["gradguard/skipped"] for r in rows if r.get("gradguard/skipped")]
    assert [float(s) for s in skipped] == [0, 0, 0, 1, 0, 0]
    coefs = [float(r["gradguard/clip_coef"]) for r in rows if r.get("gradguard/clip_coef")]
    assert min(coefs) < 1.0 and max(coefs) <= 1.0
    norms = [float(r["gradguard/global_norm"]) for r in rows if r.get("gradguard/global_norm")]
    assert math.isnan(norms[3]) and all(math.isfinite(n) and n > 0 for i, n in enumerate(norms) if i != 3)


def test_clipping_matches_torch_reference(tmp_path):
    """Same run by hand with clip_grad_norm_: the callback clips before the step."""
    torch.manual_seed(1)
    model = Tiny(opt="sgd", lr=0.1)
    ref = Tiny(opt="sgd", lr=0.1)
    ref.load_state_dict(model.state_dict())
    trainer(tmp_path, [GradGuardCallback(clip=gg.GlobalNorm(0.25))], steps=5).fit(model, loader())

    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for i, (x, y) in enumerate(loader()):
        if i == 5:
            break
        opt.zero_grad()
        ((ref.net(x) - y) ** 2).mean().backward()
        total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.25)
        assert total > 0.25  # the threshold really bites
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_state_round_trips_through_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Tiny(bad_steps={BAD_STEP})
    cb = GradGuardCallback(clip=gg.GlobalNorm(1.0))
    t = trainer(tmp_path, [cb])
    t.fit(model, loader())
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(ckpt)
    saved = cb.guard.state_dict()

    cb2 = GradGuardCallback(clip=gg.GlobalNorm(1.0))
    model2 = Tiny(bad_steps={22})
    t2 = trainer(tmp_path, [cb2], steps=25)
    t2.fit(model2, loader(n=40), ckpt_path=ckpt)
    g = cb2.guard
    assert g.steps == 25
    assert g.skipped_steps == 2
    assert [e.step for e in g.events if e.kind == "nonfinite"] == [BAD_STEP, 22]
    assert g.state_dict()["events"][0] == saved["events"][0]


def test_warns_about_gradient_clip_val(tmp_path):
    model = Tiny()
    with pytest.warns(UserWarning, match="gradient_clip_val"):
        trainer(tmp_path, [GradGuardCallback(clip=gg.GlobalNorm(1.0))], steps=2,
                gradient_clip_val=1.0).fit(model, loader())


def test_no_warning_without_gradient_clip_val(tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient_clip_val.*")
        trainer(tmp_path, [GradGuardCallback()], steps=2).fit(Tiny(), loader())


def test_raise_mode_stops_fit(tmp_path):
    with pytest.raises(gg.NonFiniteGradientError):
        trainer(tmp_path, [GradGuardCallback(on_nonfinite="raise")], steps=5).fit(
            Tiny(bad_steps={2}), loader())


@pytest.mark.parametrize("bad, exc", [({"clip": 1.0}, TypeError), ({"on_nonfinite": "ignore"}, ValueError),
                                      ({"scaler": object()}, TypeError)])
def test_bad_arguments(bad, exc):
    with pytest.raises(exc):
        GradGuardCallback(**bad)


def test_importing_gradguard_imports_no_framework(fresh_python):
    code = ("import sys, gradguard, gradguard.integrations; "
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'keras') if m in sys.modules]; "
            "assert not bad, bad")
    r = fresh_python.run(code)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("bad", [0, 4])
def test_scheduler_counts_applied_steps_only(tmp_path, bad):
    steps = 8
    torch.manual_seed(0)
    model = Scheduled(bad_steps={bad})
    cb = GradGuardCallback(log_dir=tmp_path / "runs", run_name="poisoned")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch's "scheduler before optimizer" included
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer(tmp_path / "p", [cb], steps=steps).fit(model, loader())
    sched = model.trainer.lr_scheduler_configs[0].scheduler
    assert cb.guard.skipped_steps == 1
    assert sched.last_epoch == cb.guard.steps - cb.guard.skipped_steps == steps - 1
    assert "lr_scheduler_step" not in model.__dict__  # unwrapped after fit
    torch.manual_seed(0)
    ref_cb = GradGuardCallback(log_dir=tmp_path / "runs", run_name="ref")
    trainer(tmp_path / "r", [ref_cb], steps=steps - 1).fit(Scheduled(), loader())
    store = gg.RunStore(tmp_path / "runs")
    lr, ref = store.steps("poisoned")["lr"], store.steps("ref")["lr"]
    np.testing.assert_allclose(np.delete(lr, bad + 1), ref, rtol=1e-6)
    assert lr[bad] == lr[bad + 1]


def test_epoch_schedulers_are_not_gated(tmp_path):
    model = Scheduled(interval="epoch", bad_steps={1})
    cb = GradGuardCallback()
    trainer(tmp_path, [cb], steps=25).fit(model, loader())  # 20 batches an epoch
    assert model.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 1
    assert cb._gated is None


@pytest.mark.parametrize("accumulate", [1, 3])
def test_store_loss_is_the_logged_loss(tmp_path, accumulate):
    """The recorded loss is the optimizer step's: the mean of its micro-batches' losses (without
    accumulation, the loss Lightning logs)."""
    class Logged(Tiny):
        seen = []

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            self.seen.append(loss.item())
            return loss

    cb = GradGuardCallback(log_dir=tmp_path / "runs", run_name="pl", log_metrics=False)
    model = Logged()
    trainer(tmp_path, [cb], steps=4, accumulate_grad_batches=accumulate).fit(model, loader())
    stored = gg.RunStore(tmp_path / "runs").steps("pl")["loss"]
    np.testing.assert_allclose(stored, np.reshape(model.seen, (4, accumulate)).mean(1), rtol=1e-5)
    if accumulate == 1:
        import csv

        rows = list(csv.DictReader(open(next(tmp_path.glob("lightning_logs/*/metrics.csv")))))
        logged = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
        np.testing.assert_allclose(stored, logged, rtol=1e-6)
