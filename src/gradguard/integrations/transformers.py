"""Hugging Face ``transformers.Trainer``: ``GradGuardCallback`` and ``GuardedTrainer``.

Where it sits in the Trainer's loop (every ``gradient_accumulation_steps``)::

    training_step (forward, backward; GuardedTrainer hands the loss over) ...
      -> [max_grad_norm > 0: Trainer clips, logs "grad_norm"]
      -> on_pre_optimizer_step   <- gradguard: statistics, clipping, skip decision
      -> optimizer.step() -> on_optimizer_step  <- a withheld step is marked skipped
      -> lr_scheduler.step() unless accelerate says the step was skipped -> zero_grad

What it can do:
- statistics and events every optimizer step; ``gradguard/...`` keys in every
  training log (``state.log_history``, and every reporting integration that
  runs after it), summarising the steps since the previous log;
- the loss of every step, with ``GuardedTrainer`` (or ``GradGuardTrainerMixin``
  on your own Trainer subclass): callbacks are not given the loss, so the
  Trainer's ``training_step`` hands it over; the recorded loss is the one the
  Trainer logs (the sum of the micro-batch losses of an accumulation window).
  Loss spikes, a NaN loss with finite gradients and the loss-based remedies
  then work.  With the plain ``Trainer`` the loss column stays NaN (a warning says so);
- clip with a gradguard policy (set ``TrainingArguments(max_grad_norm=0)`` so
  the Trainer does not clip first), or leave clipping to the Trainer
  (``max_grad_norm=1.0``, ``clip=None``): then gradguard sees the gradients
  after the Trainer's clipping;
- withhold a poisoned step: every gradient is set to None before the Trainer
  calls ``optimizer.step()``, so torch optimizers leave weights and state
  bitwise unchanged; the step is then marked skipped on accelerate's optimizer
  wrapper (as its own fp16-overflow skip is), so the Trainer does not step the
  LR scheduler after it.

What it cannot do (the Trainer owns the loop):
- ``state.global_step`` still counts a withheld step (it counts batches and
  ends training at ``max_steps``); ``guard.steps - guard.skipped_steps`` is the
  number of applied updates;
- with ``max_grad_norm > 0`` a NaN/Inf gradient has already been spread over
  every tensor by the Trainer's clipping, so the event cannot name the layer
  it came from: use ``max_grad_norm=0`` and ``clip=gg.GlobalNorm(...)``;
- optimizers that change parameters without a gradient (none of torch's) are
  not held back; DeepSpeed / FSDP-sharded optimizers and fp16 (GradScaler)
  are not supported.
"""
from __future__ import annotations

import warnings

import torch

from .._extras import require

require("gradguard.integrations.transformers", "hf", "transformers")
from transformers import Trainer, TrainerCallback  # noqa: E402

from ..guard import Guard  # noqa: E402
from ._common import LogWindow, check_on_nonfinite, withhold_step

__all__ = ["GradGuardCallback", "GradGuardTrainerMixin", "GuardedTrainer"]


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

    Use it with ``GuardedTrainer`` (or ``GradGuardTrainerMixin``) so the guard sees
    each step's loss; with the plain ``Trainer`` the loss is not recorded.

    Example:
        >>> args = TrainingArguments("out", max_grad_norm=0, logging_steps=10)
        >>> cb = GradGuardCallback(clip=gg.GlobalNorm(1.0))
        >>> GuardedTrainer(model, args, train_dataset=ds, callbacks=[cb]).train()
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
        self._loss = None  # this optimizer step's loss so far (a device tensor: no sync)
        self._withheld = False  # the coming optimizer.step() is withheld
        self._marked = None  # the accelerate wrapper marked skipped by this callback
        self._warned_loss = False

    def add_loss(self, loss) -> None:
        """Add a micro-batch's loss (as ``training_step`` returns it: already divided
        for gradient accumulation) to this optimizer step's loss.  ``GuardedTrainer``
        calls it; call it yourself from a custom ``training_step``."""
        if loss is None:
            return
        loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        self._loss = loss if self._loss is None else self._loss + loss

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

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._unmark()
        self._withheld = False
        loss, self._loss = self._loss, None
        guard = self.guard
        if guard is None or not any(p.grad is not None for p in guard.params):
            return
        if loss is None and not self._warned_loss:
            self._warned_loss = True
            warnings.warn("gradguard: the Trainer gives callbacks no loss, so the loss column stays NaN "
                          "and loss-based detection is off; use gradguard.integrations.transformers."
                          "GuardedTrainer (or GradGuardTrainerMixin) in place of Trainer",
                          UserWarning, stacklevel=2)
        if guard.check(loss=loss).skipped:  # host sync: the Trainer steps next, it must know now
            withhold_step(guard.params)
            self._withheld = True

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        """Mark a withheld step skipped on accelerate's wrapper: the Trainer then leaves
        the LR scheduler alone (``accelerator.optimizer_step_was_skipped``), as it does
        after an fp16 overflow."""
        if not self._withheld:
            return
        wrapper = optimizer
        while wrapper is not None and not hasattr(wrapper, "_is_overflow"):
            wrapper = getattr(wrapper, "optimizer", None)
        if wrapper is None:
            warnings.warn("gradguard: the Trainer's optimizer is not accelerate's AcceleratedOptimizer; "
                          "the LR scheduler will advance on withheld steps", UserWarning, stacklevel=2)
            return
        self._marked = (wrapper, wrapper._is_overflow)
        wrapper._is_overflow = True

    def on_step_end(self, args, state, control, **kwargs):
        self._unmark()  # the scheduler was (not) stepped; accelerate's own flag again

    def _unmark(self) -> None:
        if self._marked is not None:
            # without a GradScaler accelerate never resets it: left True, every later
            # step would look skipped to the Trainer
            wrapper, before = self._marked
            wrapper._is_overflow = before
            self._marked = None

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


class GradGuardTrainerMixin:
    """Hands each micro-batch's training loss to the ``GradGuardCallback`` of the Trainer.

    ``class MyTrainer(GradGuardTrainerMixin, Trainer)``: put it first, so its
    ``training_step`` wraps the Trainer's (or your own override's).
    """

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, GradGuardCallback):
                cb.add_loss(loss)
        return loss


class GuardedTrainer(GradGuardTrainerMixin, Trainer):
    """``transformers.Trainer`` that passes the loss to its ``GradGuardCallback``.

    Example:
        >>> cb = GradGuardCallback(clip=gg.GlobalNorm(1.0))
        >>> GuardedTrainer(model, args, train_dataset=ds, callbacks=[cb]).train()
    """
