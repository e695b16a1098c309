"""Keras 3: ``GuardedOptimizer`` and ``GradGuardLogger``.

``GuardedOptimizer(inner)`` wraps any Keras optimizer the way Keras' own
``LossScaleOptimizer`` does: ``model.fit`` hands it the gradients through
``apply``; it runs a ``gg.Guard`` on them (statistics, clipping, skip
decision) and calls ``inner.apply`` only for a step that is not poisoned.  A
withheld step leaves weights, optimizer slots and ``iterations`` unchanged, so
a ``LearningRateSchedule`` (a function of ``iterations``) does not advance.
The loss of each step reaches the guard through ``scale_loss``, which Keras'
``train_step`` calls with it before the backward (a custom ``train_step``
should call ``optimizer.scale_loss(loss)`` too).

Clipping semantics (use gradguard's policy instead of the inner optimizer's):

=========================  ===========================
Keras optimizer argument   gradguard policy
=========================  ===========================
``clipvalue=v``            ``gg.Value(v)``
``clipnorm=c``             ``gg.PerTensorNorm(c)``
``global_clipnorm=c``      ``gg.GlobalNorm(c)`` (adds torch's 1e-6 to the norm)
=========================  ===========================

Backend: ``KERAS_BACKEND=torch`` (the gradients are torch tensors, and the
Guard is gradguard's torch core); importing this module before Keras sets it
when unset.  Other backends raise a clear error.
"""
from __future__ import annotations

import os
import sys

# The guard is gradguard's torch core, so this integration needs Keras' torch backend.
# If Keras is not imported yet and no backend was chosen, choose torch (Keras' own
# default, TensorFlow, is then not needed); an explicit other choice gets a clear error.
if "keras" not in sys.modules:
    os.environ.setdefault("KERAS_BACKEND", "torch")

from .._extras import require  # noqa: E402

require("gradguard.integrations.keras", "keras", "keras")
import keras  # noqa: E402

from ..guard import Guard
from ._common import GroupsView, LogWindow, check_on_nonfinite

__all__ = ["GuardedOptimizer", "GradGuardLogger"]


def _check_backend() -> None:
    if keras.backend.backend() != "torch":
        raise NotImplementedError(
            f"gradguard's Keras integration needs KERAS_BACKEND=torch (this process uses "
            f"{keras.backend.backend()!r}); set the environment variable before importing keras")


class _Groups:
    """What the Guard reads through a GroupsView: one param group, lr kept current."""

    def __init__(self, params):
        self.param_groups = [{"params": params, "lr": float("nan")}]
        self.state = {}
        self.defaults = {}

    def zero_grad(self, set_to_none=True):
        for p in self.param_groups[0]["params"]:
            p.grad = None


class GuardedOptimizer(keras.optimizers.Optimizer):
    """Wrap a Keras optimizer so every ``apply`` goes through a gradguard Guard.

    Args:
        inner_optimizer: the Keras optimizer that updates the weights (leave its
            ``clipvalue``/``clipnorm``/``global_clipnorm`` unset).
        clip: a gradguard ``ClipPolicy`` (see the table above) or None.
        on_nonfinite: ``"skip"`` | ``"raise"`` | ``"warn"`` (see ``gg.Guard``).
        log_dir: run store directory for the dashboard/report (None: none).
        name: the optimizer's name.
        **guard_kwargs: passed to ``gg.Guard`` (``flush_every``, ``run_name``,
            ``detectors``, ...).

    Attributes:
        guard: the ``gg.Guard``, built with the variables on the first step
            (or ``build``); layer names are the variables' paths.
        window: summary of the steps since ``GradGuardLogger`` last read it.

    Example:
        >>> opt = GuardedOptimizer(keras.optimizers.SGD(0.01), clip=gg.Value(0.5))
        >>> model.compile(optimizer=opt, loss="mse")
        >>> model.fit(x, y, callbacks=[GradGuardLogger()])
    """

    def __init__(self, inner_optimizer, clip=None, on_nonfinite: str = "skip", log_dir=None, *,
                 name=None, **guard_kwargs):
        _check_backend()
        from ..clip import ClipPolicy

        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"inner_optimizer must be a keras.optimizers.Optimizer, "
                            f"got {type(inner_optimizer).__name__}")
        if clip is not None and not isinstance(clip, ClipPolicy):
            raise TypeError(f"clip must be a gradguard ClipPolicy (e.g. gg.Value(0.5)) or None, "
                            f"got {type(clip).__name__}")
        own = {k: getattr(inner_optimizer, k, None) for k in ("clipvalue", "clipnorm", "global_clipnorm")}
        if clip is not None and any(own.values()):
            set_ = ", ".join(f"{k}={v}" for k, v in own.items() if v)
            raise ValueError(f"inner_optimizer has {set_} and clip={clip!r} was given: the gradients "
                             "would be clipped twice; keep one")
        if "scaler" in guard_kwargs:
            raise TypeError("scaler: not used with Keras (use keras.optimizers.LossScaleOptimizer)")
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.clip = clip
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        self.log_dir = log_dir
        self.guard_kwargs = dict(guard_kwargs)
        self.guard: Guard | None = None
        self.window = LogWindow()
        self._loss = None  # this step's loss, handed over by scale_loss

    def build(self, var_list):
        self.inner_optimizer.build(var_list)
        super().build(var_list)
        if self.guard is None:
            self._build_guard(var_list)

    def _build_guard(self, var_list) -> None:
        names, seen = [], set()
        for i, v in enumerate(var_list):
            n = getattr(v, "path", None) or v.name
            names.append(n if n not in seen else f"{n}#{i}")
            seen.add(names[-1])
        params = [v.value for v in var_list]
        self._groups = _Groups(params)
        self.guard = Guard(list(zip(names, params)), GroupsView(self._groups), clip=self.clip,
                           on_nonfinite=self.on_nonfinite, log_dir=self.log_dir, **self.guard_kwargs)
        self.guard.add_row_observer(self.window)
        self._vars = list(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads, trainable_variables=None):
        """Guard the gradients, then let the inner optimizer apply them unless poisoned."""
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        tvs = list(trainable_variables) if trainable_variables is not None else self._vars
        if len(tvs) != len(self._vars) or any(a is not b for a, b in zip(tvs, self._vars)):
            raise ValueError("GuardedOptimizer was built for other variables; one optimizer per model")
        grads = list(grads)
        # The guard reads (and clips in place) each parameter's .grad; in model.fit
        # on torch these are already the same tensors.
        for v, g in zip(tvs, grads):
            p = v.value
            if p.grad is not g:
                p.grad = g
        lr = self.inner_optimizer.learning_rate
        self._groups.param_groups[0]["lr"] = keras.ops.convert_to_tensor(lr)  # device tensor: no sync
        loss, self._loss = self._loss, None
        if not self.guard.check(loss=loss).skipped:  # host sync: Keras applies next, it must know now
            self.inner_optimizer.apply([v.value.grad for v in tvs], tvs)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise NotImplementedError("GuardedOptimizer runs on KERAS_BACKEND=torch (stateful apply); "
                                  "stateless_apply is the JAX path")

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        # Optimizer.__init__ sets it before inner_optimizer exists.
        if "inner_optimizer" in self.__dict__:
            self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        # Keras' train_step hands every step's loss (the one its "loss" metric averages)
        # to scale_loss before the backward: the guard records it from here.
        self._loss = loss.detach() if hasattr(loss, "detach") else loss
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        from keras.saving import serialize_keras_object

        return {"name": self.name, "inner_optimizer": serialize_keras_object(self.inner_optimizer),
                "on_nonfinite": self.on_nonfinite}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        from keras.saving import deserialize_keras_object

        inner = deserialize_keras_object(config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)


class GradGuardLogger(keras.callbacks.Callback):
    """Put gradguard's numbers into Keras ``logs`` (so ``History``, CSVLogger, TensorBoard see them).

    At each epoch end: ``gradguard/global_norm_max``, ``gradguard/global_norm_mean``,
    ``gradguard/clip_coef_min``, ``gradguard/skipped``, ``gradguard/nonfinite``,
    ``gradguard/steps`` over the epoch, and ``gradguard/events_total``.
    With ``per_batch=True`` also ``gradguard/global_norm``, ``gradguard/clip_coef``
    and ``gradguard/skipped`` of each batch (one host read per batch).

    Args:
        optimizer: the ``GuardedOptimizer`` (None: ``self.model.optimizer``).
        per_batch: add the last step's values to each batch's logs.
    """

    def __init__(self, optimizer: GuardedOptimizer | None = None, per_batch: bool = False):
        super().__init__()
        self._optimizer = optimizer
        self.per_batch = bool(per_batch)

    def _opt(self) -> GuardedOptimizer:
        opt = self._optimizer or getattr(self.model, "optimizer", None)
        if not isinstance(opt, GuardedOptimizer):
            raise TypeError(f"GradGuardLogger needs the model compiled with a GuardedOptimizer, "
                            f"got {type(opt).__name__}")
        return opt

    def on_train_batch_end(self, batch, logs=None):
        opt = self._opt()
        if not self.per_batch or logs is None or opt.guard is None or opt.guard.last_report is None:
            return
        r = opt.guard.last_report
        logs.update({"gradguard/global_norm": r.global_norm, "gradguard/clip_coef": r.clip_coef,
                     "gradguard/skipped": float(r.skipped)})  # host sync: per_batch was asked for

    def on_epoch_end(self, epoch, logs=None):
        opt = self._opt()
        if logs is None or opt.guard is None:
            return
        opt.guard.flush()
        logs.update(opt.window.read())
        logs["gradguard/events_total"] = len(opt.guard.events)

    def on_train_end(self, logs=None):
        opt = self._opt()
        if opt.guard is not None:
            opt.guard.flush()
