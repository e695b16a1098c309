"""Hugging Face ``transformers.Trainer``: ``GradGuardCallback``.

Where it sits in the Trainer's loop (every ``gradient_accumulation_steps``)::

    backward ... -> [max_grad_norm > 0: Trainer clips, logs "grad_norm"]
      -> on_pre_optimizer_step   <- gradguard: statistics, clipping, skip decision
      -> optimizer.step() -> on_optimizer_step -> lr_scheduler.step() -> zero_grad

What it can do:
- statistics and events every optimizer step; ``gradguard/...`` keys in every
  training log (``state.log_history``, and every reporting integration that
  runs after it), summarising the steps since the previous log;
- clip with a gradguard policy (set ``TrainingArguments(max_grad_norm=0)`` so
  the Trainer does not clip first), or leave clipping to the Trainer
  (``max_grad_norm=1.0``, ``clip=None``): then gradguard sees the gradients
  after the Trainer's clipping;
- withhold a poisoned step: every gradient is set to None before the Trainer
  calls ``optimizer.step()``, so torch optimizers leave weights and state
  bitwise unchanged.

What it cannot do (the Trainer owns the loop):
- the learning-rate scheduler still advances on a withheld step, and
  ``state.global_step`` counts it;
- with ``max_grad_norm > 0`` a NaN/Inf gradient has already been spread over
  every tensor by the Trainer's clipping, so the event cannot name the layer
  it came from: use ``max_grad_norm=0`` and ``clip=gg.GlobalNorm(...)``;
- the loss is not passed to callbacks: a NaN loss is caught through the NaN
  gradients it produces;
- optimizers that change parameters without a gradient (none of torch's) are
  not held back; DeepSpeed / FSDP-sharded optimizers are not supported.
"""
from __future__ import annotations

import warnings

import torch

from .._extras import require

require("gradguard.integrations.transformers", "hf", "transformers")
from transformers import TrainerCallback  # noqa: E402

from ..guard import Guard  # noqa: E402
from ._common import LogWindow, check_on_nonfinite, withhold_step

__all__ = ["GradGuardCallback"]


def _torch_optimizer(opt):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` wrappers."""
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"GradGuardCallback needs a torch optimizer, the Trainer has {type(opt).__name__}")
    return opt


class GradGuardCallback(TrainerCallback):
    """Watch, clip and protect every optimizer step of a ``transformers.Trainer``.

    Args:
        clip: a gradguard ``ClipPolicy`` or None.  With a policy, set
            ``TrainingArguments(max_grad_norm=0)``; a warning says so otherwise.
        on_nonfinite: ``"skip"`` | ``"raise"`` | ``"warn"`` (see ``gg.Guard``).
        log_dir: run store directory for the dashboard/report (None: none).
        **guard_kwargs: passed to ``gg.Guard`` (``flush_every``, ``run_name``,
            ``detectors``, ``remedies``, ...).

    Attributes:
        guard: the ``gg.Guard`` (built in ``on_train_begin``).

    Logged keys (per training log, over the steps since the previous one):
        ``gradguard/global_norm_max``, ``gradguard/global_norm_mean`` (finite
        steps, pre-clip), ``gradguard/clip_coef_min``, ``gradguard/skipped``,
        ``gradguard/nonfinite``, ``gradguard/steps``; and run totals
        ``gradguard/skipped_total``, ``gradguard/events_total``.

    Example:
        >>> args = TrainingArguments("out", max_grad_norm=0, logging_steps=10)
        >>> cb = GradGuardCallback(clip=gg.GlobalNorm(1.0))
        >>> Trainer(model, args, train_dataset=ds, callbacks=[cb]).train()
    """

    def __init__(self, clip=None, on_nonfinite: str = "skip", log_dir=None, **guard_kwargs):
        from ..clip import ClipPolicy

        if clip is not None and not isinstance(clip, ClipPolicy):
            raise TypeError(f"clip must be a gradguard ClipPolicy (e.g. gg.GlobalNorm(1.0)) or None, "
                            f"got {type(clip).__name__}")
        if "scaler" in guard_kwargs:
            raise TypeError("scaler: the Trainer (accelerate) owns the GradScaler; do not pass one")
        self.clip = clip
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        self.log_dir = log_dir
        self.guard_kwargs = guard_kwargs
        self.guard: Guard | None = None
        self.window = LogWindow()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.clip is not None and args.max_grad_norm and args.max_grad_norm > 0:
            warnings.warn(
                f"TrainingArguments(max_grad_norm={args.max_grad_norm}) clips before gradguard does: "
                "set max_grad_norm=0 to let gradguard's policy clip (and see pre-clip statistics), "
                "or pass clip=None to leave clipping to the Trainer.", UserWarning, stacklevel=2)
        if self.guard is not None:
            return
        opt = _torch_optimizer(optimizer)
        trained = {id(p) for g in opt.param_groups for p in g["params"]}
        pairs = [(n, p) for n, p in model.named_parameters() if id(p) in trained]
        self.guard = Guard(pairs, opt, clip=self.clip, on_nonfinite=self.on_nonfinite,
                           log_dir=self.log_dir, **self.guard_kwargs)
        self.guard.add_row_observer(self.window)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        guard = self.guard
        if guard is None or not any(p.grad is not None for p in guard.params):
            return
        if guard.check().skipped:  # host sync: the Trainer steps next, it must know now
            withhold_step(guard.params)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.guard is None or logs is None or any(k.startswith("eval_") for k in logs):
            return
        self.guard.flush()
        metrics = self.window.read()
        metrics["gradguard/skipped_total"] = self.guard.skipped_steps
        metrics["gradguard/events_total"] = len(self.guard.events)
        logs.update(metrics)  # integrations called after this callback see them
        # Trainer.log appended a copy of `logs` to the history before calling back.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self.guard is not None:
            self.guard.close()
