"""Clipping policies and the functional drop-ins for torch's clip utilities.

Every policy is a small object: either ``coefficient(grads, stats)`` (one scalar
for every gradient, applied by the guard) or ``clip_(params, grads, stats)`` (scales
or clamps the gradients in place and returns the per-tensor coefficients).  The coefficient is always clamped, never branched
on (``if coef < 1`` would read it back to the host).  A step whose gradients
hold NaN/Inf in the policy's scope is left untouched: torch would turn every
gradient into NaN, which destroys the evidence and, without a skip, the model.

Semantics users know (torch and Keras):
- ``GlobalNorm``  = ``torch.nn.utils.clip_grad_norm_`` = Keras ``global_clipnorm``
- ``PerTensorNorm`` = Keras ``clipnorm`` (each tensor on its own)
- ``Value``       = ``torch.nn.utils.clip_grad_value_`` = Keras ``clipvalue``
- ``PerLayer``    = different policies for different parameter-name patterns
"""
from __future__ import annotations

import fnmatch
import math
import numbers
import operator
from collections.abc import Iterable

import torch
from torch import Tensor

from .backend import DEVICE, norm_coefficient
from .shards import dtensor_type as _dtensor_type
from .stats import GradStats, compute_stats

__all__ = [
    "ClipPolicy", "GlobalNorm", "PerTensorNorm", "Value", "PerLayer",
    "clip_grad_norm_", "clip_grad_value_", "check_threshold", "check_norm_type",
]



def check_threshold(name: str, value, *, allow_inf: bool = True) -> float:
    """A positive threshold, or a ValueError/TypeError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, Tensor) and value.numel() == 1:
            value = float(value)  # host sync: configuration time, not per step
        else:
            raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        accepted = "a positive number" + (" or inf" if allow_inf else " (finite)")
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return value


def check_norm_type(norm_type) -> float:
    if isinstance(norm_type, str) and norm_type.lower() == "inf":
        return math.inf
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
        raise TypeError(f"norm_type must be a number > 0 or inf, got {type(norm_type).__name__}")
    norm_type = float(norm_type)
    if math.isnan(norm_type) or norm_type <= 0:
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type!r}")
    return norm_type


_dtype, _get_device = operator.attrgetter("dtype"), Tensor.get_device


def _by_device_dtype(grads: list[Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``grads`` per (device, dtype).  Runs every step: the usual single group
    is found in C-level passes, not a Python loop per tensor."""
    # (get_device: an int, cheaper than building a torch.device per tensor; a mix of device
    # types with one index would fail loudly in the foreach call, never silently)
    if grads and len(set(map(_get_device, grads))) == 1 and len(set(map(_dtype, grads))) == 1:
        return {(grads[0].device, grads[0].dtype): range(len(grads))}
    groups: dict[tuple, list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault((g.device, g.dtype), []).append(i)
    return groups


def _members(grads: list[Tensor], idx) -> list[Tensor]:
    return grads if len(idx) == len(grads) else [grads[i] for i in idx]


def _scale_(grads: list[Tensor], coef: Tensor) -> None:
    """grads *= coef (a 0-dim tensor), one foreach launch per (device, dtype)."""
    for (device, _), idx in _by_device_dtype(grads).items():
        torch._foreach_mul_(_members(grads, idx), coef.to(device, non_blocking=True))


def _scale_each_(grads: list[Tensor], coefs: Tensor) -> None:
    """grads[i] *= coefs[i], one foreach launch per (device, dtype)."""
    for (device, _), idx in _by_device_dtype(grads).items():
        c = coefs.to(device, non_blocking=True)
        torch._foreach_mul_(_members(grads, idx), list(c.unbind()) if len(idx) == len(grads)
                            else [c[i] for i in idx])


class ClipPolicy:
    """Base class of clipping policies (abstract).

    A policy is one of two kinds:
    - a single scalar multiplier for every gradient (``GlobalNorm``, ``AutoClip``,
      ``ZClip``): it implements ``coefficient``, and the guard applies the
      coefficient the cheapest way the optimizer allows (folded into a fused
      optimizer's ``grad_scale``, or one ``_foreach_mul_``);
    - anything else (per tensor, per element, per unit): it implements ``clip_``,
      which changes the gradients in place and returns per-tensor coefficients.
    Stateful policies also implement ``state_dict`` / ``load_state_dict``.
    """

    def bind(self, names: list[str]) -> None:
        """Called once with every parameter name the guard watches."""

    def coefficient(self, grads: list[Tensor], stats: GradStats):
        """The one coefficient for every gradient, as a 0-dim array in ``stats.xp``'s
        backend, or None when the policy is not a single scalar (then ``clip_`` runs).
        Stateful policies update their state here (only from steps ``stats.flag``
        does not veto)."""
        return None

    def clip_(self, params: list[Tensor], grads: list[Tensor], stats: GradStats) -> Tensor:
        """Clip ``grads`` in place; (P,) coefficients applied (1 = untouched)."""
        coef = self.coefficient(grads, stats)
        if coef is None:
            raise NotImplementedError(f"{type(self).__name__} implements neither coefficient nor clip_")
        coef = stats.xp.tensor(coef)
        _scale_(grads, coef)
        return coef.expand(len(grads))

    def check_sharded(self) -> None:
        """Raise ValueError if the policy cannot work on per-rank shards (FSDP2)."""

    @staticmethod
    def scale_(grads: list[Tensor], coef: Tensor) -> None:
        """grads *= coef (0-dim), one foreach launch per (device, dtype)."""
        _scale_(grads, coef)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    def config(self) -> dict:
        return {"policy": type(self).__name__}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "policy")
        return f"{type(self).__name__}({args})"


def _total_norm(grads: list[Tensor], stats: GradStats, norm_type: float):
    """The total p-norm in ``stats.xp``'s backend (p = 2: the statistics' global norm)."""
    if norm_type == 2.0 or len(stats) == 0:
        return stats.total
    if math.isinf(norm_type):
        total = stats.max_abs.max()
    else:
        norms = []
        for (device, dtype), idx in _by_device_dtype(grads).items():
            acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
            norms += torch._foreach_norm(_members(grads, idx), norm_type, dtype=acc)
        total = torch.linalg.vector_norm(
            torch.stack([n.to(stats.device, torch.float64) for n in norms]), norm_type)
        total = total.to(stats.global_norm.dtype)
    return stats.xp.asarray(total)


def _norm_coef(max_norm, total: Tensor) -> Tensor:
    """``norm_coefficient`` on tensors (kept for the functional API and adaptive policies)."""
    return norm_coefficient(max_norm, total, DEVICE)


class GlobalNorm(ClipPolicy):
    """Scale all gradients together so their total norm is at most ``max_norm``.

    ``coef = min(1, max_norm / (total + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``
    and Keras ``global_clipnorm``.  With a fused Adam/AdamW/SGD the guard folds
    ``1/coef`` into the optimizer's ``grad_scale``: no extra pass over memory.

    Args:
        max_norm: threshold (> 0; ``inf`` measures without clipping).
        norm_type: p of the p-norm (> 0 or ``inf``); 2 needs no extra pass.
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0):
        self.max_norm = check_threshold("max_norm", max_norm)
        self.norm_type = check_norm_type(norm_type)

    def coefficient(self, grads, stats):
        if self.norm_type == 2.0:  # the statistics' own total, and its non-finite flag
            return norm_coefficient(self.max_norm, stats.total, stats.xp, bad=stats.total_bad)
        return norm_coefficient(self.max_norm, _total_norm(grads, stats, self.norm_type), stats.xp)

    def config(self):
        return {"policy": "GlobalNorm", "max_norm": self.max_norm, "norm_type": self.norm_type}


class PerTensorNorm(ClipPolicy):
    """Clip each gradient tensor's L2 norm to ``max_norm`` on its own (Keras ``clipnorm``).

    ``g <- g * max_norm / max(||g||, max_norm)`` per tensor.  Not the same as
    ``GlobalNorm``: a model with many tensors can keep a large total norm.
    """

    def __init__(self, max_norm: float):
        self.max_norm = check_threshold("max_norm", max_norm)

    def clip_(self, params, grads, stats):
        norms = stats.norms
        # where(), not max_norm / max(norm, max_norm): with max_norm = inf that is inf/inf = NaN
        coefs = torch.where(norms > self.max_norm, self.max_norm / norms, torch.ones_like(norms))
        coefs = torch.where(stats.bad, torch.ones_like(coefs), coefs)
        _scale_each_(grads, coefs)
        return coefs

    def config(self):
        return {"policy": "PerTensorNorm", "max_norm": self.max_norm}


class Value(ClipPolicy):
    """Clamp every gradient element to ``[-clip_value, clip_value]`` (Keras ``clipvalue``).

    The returned coefficient of a tensor is ``min(1, clip_value / max|g|)``: the
    share of its largest element that survives.
    """

    def __init__(self, clip_value: float):
        self.clip_value = check_threshold("clip_value", clip_value)

    def clip_(self, params, grads, stats):
        bad = stats.bad
        bounds = {}
        for g in grads:
            key = (g.device, g.dtype)
            if key not in bounds:
                # Built in the grad's dtype from the Python float: exactly torch's bound.
                v = torch.full((), self.clip_value, dtype=g.dtype, device=g.device)
                h = torch.where(bad.to(g.device, non_blocking=True), torch.full_like(v, math.inf), v)
                bounds[key] = (-h, h)
            lo_b, hi_b = bounds[key]
            g.clamp_(min=lo_b, max=hi_b)
        coefs = (self.clip_value / stats.max_abs).clamp(max=1.0)
        return torch.where(bad | ~torch.isfinite(coefs), torch.ones_like(coefs), coefs)

    def config(self):
        return {"policy": "Value", "clip_value": self.clip_value}


class PerLayer(ClipPolicy):
    """Choose a policy by parameter-name pattern (shell-style globs, first match wins).

    The seeds' "wider range for the output layer":

        gg.PerLayer({"head.*": gg.GlobalNorm(5.0)}, default=gg.GlobalNorm(1.0))

    A ``GlobalNorm`` inside a rule takes the norm over that rule's tensors only.
    Parameters matching no rule use ``default`` (None: not clipped).  A pattern
    that matches no parameter is an error: it is almost always a typo.
    """

    def __init__(self, rules: dict, default: ClipPolicy | None = None):
        if not isinstance(rules, dict) or not rules:
            raise TypeError("rules must be a non-empty dict {pattern: ClipPolicy}")
        for pattern, policy in rules.items():
            if not isinstance(pattern, str) or not pattern:
                raise TypeError(f"rules: pattern {pattern!r} must be a non-empty string")
            if not isinstance(policy, ClipPolicy):
                raise TypeError(f"rules[{pattern!r}] must be a ClipPolicy, got {type(policy).__name__}")
        if default is not None and not isinstance(default, ClipPolicy):
            raise TypeError(f"default must be a ClipPolicy or None, got {type(default).__name__}")
        self.rules = dict(rules)
        self.default = default
        self._cache: dict[tuple, list] = {}

    def _rule_of(self, name: str):
        for pattern in self.rules:
            if fnmatch.fnmatchcase(name, pattern):
                return pattern
        return None

    def bind(self, names):
        hit = {self._rule_of(n) for n in names}
        unused = [p for p in self.rules if p not in hit]
        if unused:
            sample = ", ".join(repr(n) for n in list(names)[:4])
            raise ValueError(f"rules: pattern {unused[0]!r} matches no parameter (names look like {sample})")
        for pattern, policy in self.rules.items():
            policy.bind([n for n in names if self._rule_of(n) == pattern])
        if self.default is not None:
            self.default.bind([n for n in names if self._rule_of(n) is None])

    def _groups(self, names: list[str]):
        key = tuple(names)
        if key not in self._cache:
            by_rule: dict = {}
            for i, n in enumerate(names):
                by_rule.setdefault(self._rule_of(n), []).append(i)
            groups = []
            for rule, idx in by_rule.items():
                policy = self.rules[rule] if rule is not None else self.default
                if policy is not None:
                    groups.append((policy, idx))
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = groups
        return self._cache[key]

    def clip_(self, params, grads, stats):
        coefs = torch.ones(len(grads), dtype=stats.norms.dtype, device=stats.device)
        for policy, idx in self._groups(stats.names):
            sub = stats.subset(idx)
            c = policy.clip_([params[i] for i in idx], [grads[i] for i in idx], sub)
            coefs.index_copy_(0, torch.as_tensor(idx, device=stats.device), c.to(coefs.dtype))
        return coefs

    def check_sharded(self):
        for pol in [*self.rules.values(), *([self.default] if self.default is not None else [])]:
            pol.check_sharded()

    def state_dict(self):
        return {"rules": {p: pol.state_dict() for p, pol in self.rules.items()},
                "default": self.default.state_dict() if self.default is not None else None}

    def load_state_dict(self, state_dict):
        rules = state_dict.get("rules", {})
        if set(rules) != set(self.rules):
            raise ValueError(f"state_dict: PerLayer rules {sorted(rules)} do not match {sorted(self.rules)}")
        for p, sd in rules.items():
            self.rules[p].load_state_dict(sd)
        if self.default is not None and state_dict.get("default") is not None:
            self.default.load_state_dict(state_dict["default"])

    def config(self):
        return {"policy": "PerLayer", "rules": {p: pol.config() for p, pol in self.rules.items()},
                "default": self.default.config() if self.default is not None else None}


# ---------------------------------------------------------------- functional


def _grads_of(parameters) -> tuple[list[str], list[Tensor]]:
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    if not isinstance(parameters, Iterable):
        raise TypeError(f"parameters must be a Tensor or an iterable of Tensors, got {type(parameters).__name__}")
    names, grads = [], []
    for i, p in enumerate(parameters):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameters[{i}] is a {type(p).__name__}, not a Tensor")
        if p.grad is not None:
            names.append(str(i))
            grads.append(p.grad)
    return names, grads


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach=None) -> Tensor:
    """Drop-in for ``torch.nn.utils.clip_grad_norm_`` that never destroys gradients.

    Same numbers as torch on finite gradients.  When the total norm is NaN/Inf
    the gradients are left untouched (torch turns them all into NaN) and the
    non-finite norm is returned, so the caller can skip the step.
    ``foreach`` is accepted for signature compatibility; foreach kernels are
    always used where available.

    Returns:
        The total norm of the gradients before clipping (0-dim tensor).
    """
    max_norm = check_threshold("max_norm", max_norm)
    policy = GlobalNorm(max_norm, norm_type)
    names, grads = _grads_of(parameters)
    if not grads:
        return torch.tensor(0.0)
    stats = compute_stats(names, grads, xp=DEVICE)
    total = _total_norm(grads, stats, policy.norm_type)
    if error_if_nonfinite and not bool(torch.isfinite(total)):  # host sync: only when asked to raise
        raise RuntimeError(f"The total norm of order {policy.norm_type} for gradients is non-finite, "
                           "so it cannot be clipped. Set error_if_nonfinite=False to return it instead.")
    _scale_(grads, _norm_coef(max_norm, total))
    return total


def clip_grad_value_(parameters, clip_value: float, foreach=None) -> Tensor:
    """Drop-in for ``torch.nn.utils.clip_grad_value_`` that never destroys gradients.

    Clamps every element to ``[-clip_value, clip_value]`` like torch, unless a
    gradient holds NaN/Inf: then nothing is touched.  Returns the pre-clip total
    L2 norm (torch returns None), so a non-finite step is visible.
    """
    clip_value = check_threshold("clip_value", clip_value)
    names, grads = _grads_of(parameters)
    if not grads:
        return torch.tensor(0.0)
    stats = compute_stats(names, grads, xp=DEVICE)
    Value(clip_value).clip_([], grads, stats)
    return stats.global_norm


def refuse_unitwise_on_shards(clip: ClipPolicy, params: list[Tensor]) -> None:
    """Refuse a policy that cannot clip sharded (DTensor) parameters correctly (FSDP2)."""
    dt = _dtensor_type()
    if dt is not None and any(isinstance(p, dt) for p in params):
        clip.check_sharded()
