"""PyTorch Lightning: ``GradGuardCallback``.

Where it sits in Lightning's loop (automatic and manual optimization alike)::

    training_step -> on_before_backward -> backward -> [AMP: scaler.unscale_]
      -> on_before_optimizer_step   <- gradguard: statistics, clipping, skip decision
      -> Lightning's gradient_clip_val clipping -> optimizer.step()

A poisoned step (NaN/Inf gradient or loss) is withheld by setting every
gradient to None before Lightning calls ``optimizer.step()``: torch optimizers
update, and create or advance state for, only parameters that have a
gradient, so weights and optimizer state stay bitwise unchanged.  With AMP the
GradScaler still backs off its scale for a step it found non-finite.

Schedulers: after a withheld step the callback makes Lightning's next call of
``LightningModule.lr_scheduler_step`` for an ``interval="step"`` scheduler a
no-op, so the LR schedule counts applied updates only ("epoch" schedulers and
``ReduceLROnPlateau`` are left alone; under manual optimization you step your
schedulers yourself: ``callback.guard.last_report.applied``).
``trainer.global_step`` still counts a withheld step (it counts the batches
that reached ``optimizer.step()``, and ``max_steps`` ends training on it).

Imports ``lightning.pytorch`` (or, if that is missing, ``pytorch_lightning``).
"""
from __future__ import annotations

import warnings

import torch

from .._extras import MissingExtra

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError:
        raise MissingExtra("gradguard.integrations.lightning", "lightning", ["lightning"]) from None

from ..guard import Guard
from ._common import check_on_nonfinite, withhold_step

__all__ = ["GradGuardCallback"]


class GradGuardCallback(Callback):
    """Watch, clip and protect every optimizer step of a Lightning ``Trainer``.

    Args:
        clip: a gradguard ``ClipPolicy`` (``gg.GlobalNorm(1.0)``, ``gg.Value(0.5)``...)
            or None.  Applied after AMP unscaling, before the optimizer step.
        on_nonfinite: ``"skip"`` | ``"raise"`` | ``"warn"`` (see ``gg.Guard``).
        log_dir: run store directory for the dashboard/report (None: none).
        log_metrics: log ``gradguard/global_norm``, ``gradguard/clip_coef`` and
            ``gradguard/skipped`` through ``LightningModule.log`` every step
            (device tensors: Lightning reads them when its logger writes).
        **guard_kwargs: passed to ``gg.Guard`` (``flush_every``, ``run_name``,
            ``detectors``, ``remedies``, ...).

    Attributes:
        guard: the ``gg.Guard`` (built when fitting starts; None before), on
            Lightning's optimizer; the callback asks it ``guard.check(loss)`` and
            Lightning steps.

    Example:
        >>> cb = GradGuardCallback(clip=gg.GlobalNorm(1.0), log_dir="gradguard-runs")
        >>> Trainer(callbacks=[cb], max_steps=100).fit(model, loader)
        >>> cb.guard.events
    """

    def __init__(self, clip=None, on_nonfinite: str = "skip", log_dir=None, *,
                 log_metrics: bool = True, **guard_kwargs):
        from ..clip import ClipPolicy

        if clip is not None and not isinstance(clip, ClipPolicy):
            raise TypeError(f"clip must be a gradguard ClipPolicy (e.g. gg.GlobalNorm(1.0)) or None, "
                            f"got {type(clip).__name__}")
        if "scaler" in guard_kwargs:
            raise TypeError("scaler: Lightning owns the GradScaler (precision='16-mixed'); "
                            "the callback runs after it unscales, so do not pass one")
        self.clip = clip
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        self.log_dir = log_dir
        self.log_metrics = bool(log_metrics)
        self.guard_kwargs = guard_kwargs
        self.guard: Guard | None = None
        self._pending_state: dict | None = None
        self._loss = None
        self._withheld = False  # the last optimizer step was withheld
        self._gated = None  # the LightningModule whose lr_scheduler_step we wrap

    @property
    def state_key(self) -> str:
        return "GradGuardCallback"

    # ------------------------------------------------------------ lifecycle
    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.gradient_clip_val:
            warnings.warn(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips again after gradguard "
                "(Lightning clips after on_before_optimizer_step). Use one: drop gradient_clip_val and "
                "pass clip=gg.GlobalNorm(...) to GradGuardCallback, or keep it and pass clip=None.",
                UserWarning, stacklevel=2)
        self._gate_schedulers(trainer, pl_module)
        if self.guard is not None:
            return
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"GradGuardCallback supports one optimizer, the LightningModule "
                             f"configured {len(optimizers)}")
        opt = optimizers[0]
        if isinstance(opt, torch.optim.LBFGS):
            raise TypeError("GradGuardCallback does not support LBFGS (its step re-evaluates the closure)")
        trained = {id(p) for g in opt.param_groups for p in g["params"]}
        pairs = [(n, p) for n, p in pl_module.named_parameters() if id(p) in trained]
        self.guard = Guard(pairs, opt, clip=self.clip, on_nonfinite=self.on_nonfinite,
                           log_dir=self.log_dir, **self.guard_kwargs)
        if self._pending_state is not None:
            self.guard.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.guard is not None:
            self.guard.flush()

    def teardown(self, trainer, pl_module, stage) -> None:
        if self._gated is not None:
            self._gated.__dict__.pop("lr_scheduler_step", None)  # the class's method again
            self._gated = None
        if self.guard is not None and stage == "fit":
            self.guard.close()

    def _gate_schedulers(self, trainer, pl_module) -> None:
        """Wrap the module's ``lr_scheduler_step`` (Lightning calls it by name for every
        scheduler) so that a per-step scheduler is not stepped after a withheld step."""
        gated = {id(c.scheduler) for c in trainer.lr_scheduler_configs
                 if c.interval == "step" and not c.reduce_on_plateau}
        if not gated or self._gated is not None:
            return
        original = pl_module.lr_scheduler_step  # bound: the user's override or Lightning's
        me = self

        def lr_scheduler_step(scheduler, metric=None):
            if id(scheduler) in gated and me._withheld:
                return None  # the optimizer step it would follow was withheld
            return original(scheduler, metric)

        pl_module.__dict__["lr_scheduler_step"] = lr_scheduler_step  # instance attribute: not in state_dict
        self._gated = pl_module

    # ----------------------------------------------------------------- step
    def on_before_backward(self, trainer, pl_module, loss) -> None:
        loss = loss.detach()
        # Under precision="16-mixed" the hook sees the scaled loss; record the real one.
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
        loss = loss / scale.to(loss.device) if scale is not None else loss
        # With accumulate_grad_batches=k Lightning divides each micro-batch's loss by k before
        # backward: their sum over the window is the optimizer step's (mean) loss.
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        guard = self.guard
        if guard is None:
            return
        loss, self._loss = self._loss, None
        self._withheld = False
        if not any(p.grad is not None for p in guard.params):
            return  # training_step returned None: Lightning steps nothing either
        report = guard.check(loss=loss)
        if report.skipped:  # host sync: Lightning steps next, it must know now
            withhold_step(guard.params)
            self._withheld = True
        if self.log_metrics:
            pl_module.log_dict({"gradguard/global_norm": report.global_norm_t.float(),
                                "gradguard/clip_coef": report.clip_coef_t.float(),
                                "gradguard/skipped": report.skipped_t.float()},
                               on_step=True, on_epoch=False, batch_size=1)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Saved by Lightning in the checkpoint under ``callbacks[state_key]``."""
        if self.guard is not None:
            return {"guard": self.guard.state_dict()}
        return {"guard": self._pending_state} if self._pending_state is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restored by Lightning from a checkpoint (before or after the guard exists)."""
        state = state_dict.get("guard")
        if state is None:
            return
        if self.guard is not None:
            self.guard.load_state_dict(state)
        else:
            self._pending_state = state
