"""``gradguard diagnose``: check a model's gradient flow before training it.

One forward and one backward pass on one batch, with forward hooks, then:

- per-layer gradient norms, first layer to last, drawn as a flow chart;
- vanishing (early layers get a tiny fraction of the largest gradient) and
  exploding (early layers get far more than the last) gradient flow;
- activation saturation: saturated sigmoid/tanh units, dead ReLUs;
- each weight's init scale against He / Xavier for its fan-in;
- the spectral radius of every recurrent weight (nn.RNN / LSTM / GRU
  ``weight_hh``): > 1 lets gradients explode over time, << 1 makes them vanish;
- depth (weight layers, normalization layers), sequence length of recurrent layers.

Each finding carries advice taken from the seeds (LSTM instead of a plain RNN,
truncated BPTT, fewer layers, ReLU/LeakyReLU/ELU, He/Xavier init,
BatchNorm/LayerNorm, gradient clipping, L1/L2 regularization, smaller batch
or learning rate).  ``diagnose()`` is the Python entry point; the CLI is a
thin wrapper whose exit status is 1 when a critical finding exists.

Example:
    >>> from gradguard.tools.diagnose import diagnose
    >>> d = diagnose(model, (x, y), torch.nn.functional.cross_entropy)
    >>> print(d.render()); d.critical
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..advice import TOPICS
from ..events import SEVERITIES

__all__ = ["diagnose", "Diagnosis", "Finding", "LayerInfo", "add_arguments", "run", "ADVICE"]

# Thresholds (documented in docs/tasks.md).
VANISH_WARN, VANISH_CRIT = 1e-2, 1e-4      # earliest layer's grad norm / largest layer's
EXPLODE_WARN, EXPLODE_CRIT = 1e2, 1e4      # earliest layer's grad norm / last layer's
SATURATED_SLOPE = 0.05                     # a unit is saturated when its slope < 5% of the max slope
SATURATION_WARN = 0.5                      # fraction of saturated units
INIT_LARGE, INIT_SMALL = 2.0, 0.3          # std vs He (large) and vs LeCun 1/sqrt(fan_in) (small)
RADIUS_HIGH, RADIUS_LOW = 1.0, 0.5
DEEP = 10                                  # weight layers

ADVICE = TOPICS  # the advice catalogue shared with the detectors (gradguard.advice)

_RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Bilinear) + _RECURRENT


@dataclass
class Finding:
    """One problem (or note) found, with advice.

    Attributes:
        severity: ``"info"`` | ``"warning"`` | ``"critical"``.
        kind: e.g. ``"vanishing"``, ``"exploding"``, ``"saturation"``, ``"dead_relu"``,
            ``"init_scale"``, ``"spectral_radius"``, ``"depth"``, ``"nonfinite"``.
        message: one sentence with the numbers.
        layers: the modules or parameters concerned.
        advice: remedies, most specific first.
    """

    severity: str
    kind: str
    message: str
    layers: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)


@dataclass
class LayerInfo:
    """One module with its own parameters, in forward order."""

    name: str
    kind: str
    grad_norm: float
    params: int
    weight_std: float | None = None
    fan_in: int | None = None
    fan_out: int | None = None
    saturated: float | None = None   # fraction of saturated units at this layer's output
    dead: float | None = None        # fraction of dead ReLU units at this layer's output


@dataclass
class Diagnosis:
    """What ``diagnose`` found.

    Attributes:
        loss: the batch's loss.
        layers: ``LayerInfo`` per module with parameters, first to last.
        findings: most severe first.
        depth: number of weight layers (Linear/Conv/recurrent).
    """

    loss: float
    layers: list[LayerInfo]
    findings: list[Finding]
    depth: int

    @property
    def critical(self) -> bool:
        return any(f.severity == "critical" for f in self.findings)

    def worst(self) -> str | None:
        """The highest severity found, or None."""
        if not self.findings:
            return None
        return max((f.severity for f in self.findings), key=SEVERITIES.index)

    def to_dict(self) -> dict:
        return {"loss": self.loss, "depth": self.depth, "critical": self.critical,
                "layers": [asdict(l) for l in self.layers], "findings": [asdict(f) for f in self.findings]}

    def flow_chart(self, width: int = 32) -> str:
        """Per-layer gradient norms, first layer (top) to last, on a log scale."""
        finite = [l.grad_norm for l in self.layers if math.isfinite(l.grad_norm) and l.grad_norm > 0]
        lo = math.log10(min(finite)) if finite else 0.0
        hi = math.log10(max(finite)) if finite else 1.0
        span = max(hi - lo, 1e-9)
        name_w = max([len(l.name) for l in self.layers] + [5])
        kind_w = max([len(l.kind) for l in self.layers] + [4])
        lines = [f"Gradient flow, first layer to last (bar: log10 |grad|, {lo:.1f} .. {hi:.1f})", "  input"]
        prev = None
        for l in self.layers:
            g = l.grad_norm
            if prev is not None:
                step = (f"x{g / prev.grad_norm:.3g}" if prev.grad_norm > 0 and math.isfinite(g)
                        and math.isfinite(prev.grad_norm) else "")
                lines.append(f"    |  {step}")
            if not math.isfinite(g):
                bar = "!" * width
            elif g <= 0:
                bar = ""
            else:
                bar = "#" * max(1, round(width * (math.log10(g) - lo) / span)) if span > 1e-9 else "#" * width
            mark = ""
            if l.saturated is not None and l.saturated >= SATURATION_WARN:
                mark = f"  saturated {100 * l.saturated:.0f}%"
            if l.dead is not None and l.dead >= SATURATION_WARN:
                mark = f"  dead {100 * l.dead:.0f}%"
            lines.append(f"  {l.name:<{name_w}} {l.kind:<{kind_w}} {bar:<{width}} {g:9.3g}{mark}")
            prev = l
        lines += ["    |", f"  loss = {self.loss:.4g}"]
        return "\n".join(lines)

    def render(self) -> str:
        """The full text report: flow chart, then findings with advice."""
        out = [self.flow_chart(), "", f"Depth: {self.depth} weight layers.", ""]
        if not self.findings:
            out.append("No problems found.")
        for f in self.findings:
            where = f" [{', '.join(f.layers[:4])}{' ...' if len(f.layers) > 4 else ''}]" if f.layers else ""
            out.append(f"{f.severity.upper():<8} {f.kind}{where}: {f.message}")
            out += [f"         -> {a}" for a in f.advice]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()


def _fan(p: Tensor) -> tuple[int, int]:
    if p.dim() < 2:
        return p.numel(), p.numel()
    receptive = p[0][0].numel() if p.dim() > 2 else 1
    return p.shape[1] * receptive, p.shape[0] * receptive


def _spectral_radius(w: Tensor) -> float:
    return float(torch.linalg.eigvals(w.detach().double().cpu()).abs().max())  # host sync: one-off


def _unit_dim(out: Tensor, module: nn.Module) -> int:
    # Features live on dim 1 for conv-style (N, C, ...) tensors, on the last dim otherwise.
    return 1 if out.dim() > 2 and not isinstance(module, _RECURRENT) else out.dim() - 1


def _activation_stats(module: nn.Module, out: Tensor) -> tuple[float | None, float | None]:
    """(saturated fraction, dead fraction) of a module's output, when it is an activation."""
    out = out.detach().float()
    if isinstance(module, nn.Sigmoid):
        slope = out * (1 - out) / 0.25
        return float((slope < SATURATED_SLOPE).float().mean()), None  # host sync: one-off
    if isinstance(module, nn.Tanh) or (isinstance(module, nn.RNN) and module.nonlinearity == "tanh"):
        slope = 1 - out * out
        return float((slope < SATURATED_SLOPE).float().mean()), None  # host sync: one-off
    if isinstance(module, (nn.ReLU, nn.ReLU6)) or (isinstance(module, nn.RNN) and module.nonlinearity == "relu"):
        d = _unit_dim(out, module)
        units = out.movedim(d, -1).reshape(-1, out.shape[d])
        return None, float((units <= 0).all(0).float().mean())  # host sync: one-off
    return None, None


def _module_label(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features}->{m.out_features})"
    if isinstance(m, _RECURRENT):
        extra = f",{m.nonlinearity}" if isinstance(m, nn.RNN) else ""
        return f"{type(m).__name__}({m.input_size}->{m.hidden_size}{extra})"
    return type(m).__name__


def diagnose(model: nn.Module, batch, loss_fn) -> Diagnosis:
    """Run one forward/backward pass on ``batch`` and report gradient-flow problems.

    Args:
        model: the ``nn.Module`` to check (its gradients are overwritten, weights untouched).
        batch: ``(inputs, target)`` -> ``loss_fn(model(inputs), target)``; anything else
            -> ``loss_fn(model(batch))``.  ``inputs`` may be a tuple (unpacked) or a dict
            (keyword arguments).
        loss_fn: returns a scalar loss tensor.
    Returns:
        a ``Diagnosis`` (``.critical``, ``.findings``, ``.render()``).

    Example:
        >>> d = diagnose(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 1)),
        ...              (torch.randn(8, 4), torch.randn(8, 1)), torch.nn.functional.mse_loss)
        >>> d.critical
        False
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    order: dict[str, int] = {}
    act: dict[str, tuple[float | None, float | None]] = {}
    seq_len: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(module, inputs, output):
        name = names[module]
        order.setdefault(name, len(order))
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, Tensor) and out.is_floating_point():
            s, d = _activation_stats(module, out)
            if s is not None or d is not None:
                act[name] = (s, d)
        if isinstance(module, _RECURRENT) and inputs and isinstance(inputs[0], Tensor):
            x = inputs[0]
            if x.dim() == 3:
                seq_len[name] = x.shape[1] if module.batch_first else x.shape[0]
            elif x.dim() == 2:
                seq_len[name] = x.shape[0]

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        model.zero_grad(set_to_none=True)
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, target = batch
            if isinstance(inputs, dict):
                out = model(**inputs)
            elif isinstance(inputs, tuple):
                out = model(*inputs)
            else:
                out = model(inputs)
            loss = loss_fn(out, target)
        else:
            loss = loss_fn(model(batch))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    findings: list[Finding] = []
    loss_v = float(loss.detach())  # host sync: one-off
    # Layers = modules owning parameters, in the order the forward pass used them.
    owners = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    reg = {n: i for i, (n, _) in enumerate(owners)}
    owners.sort(key=lambda nm: (order.get(nm[0], len(order) + reg[nm[0]]), reg[nm[0]]))
    layers: list[LayerInfo] = []
    # An activation module after a layer describes that layer's output.
    act_names = sorted(act, key=lambda n: order.get(n, 0))
    for name, m in owners:
        ps = [p for p in m.parameters(recurse=False)]
        grads = [p.grad for p in ps if p.grad is not None]
        if not grads:
            continue
        gn = math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grads))  # host sync: one-off
        w = getattr(m, "weight", None)
        if isinstance(m, _RECURRENT):
            w = m.weight_ih_l0
        info = LayerInfo(name or "(model)", _module_label(m), gn, sum(p.numel() for p in ps))
        if isinstance(w, Tensor) and w.dim() >= 2:
            info.fan_in, info.fan_out = _fan(w)
            info.weight_std = float(w.detach().float().std())  # host sync: one-off
        if name in act:
            info.saturated, info.dead = act[name]
        elif name in order:
            # The first activation run after this layer and before the next one describes its output.
            nxt_owner = min((order[o] for o, _ in owners if order.get(o, -1) > order[name]), default=1 << 30)
            after = [a for a in act_names if order[name] < order[a] < nxt_owner]
            if after:
                info.saturated, info.dead = act[after[0]]
        layers.append(info)

    depth = sum(isinstance(m, _WEIGHTED) for m in model.modules())
    n_norm = sum(isinstance(m, _NORMS) for m in model.modules())
    recurrent = [(n, m) for n, m in model.named_modules() if isinstance(m, _RECURRENT)]

    # --- non-finite
    bad = [l.name for l in layers if not math.isfinite(l.grad_norm)]
    if not math.isfinite(loss_v) or bad:
        findings.append(Finding("critical", "nonfinite",
                                f"the loss is {loss_v:.4g} and {len(bad)} layer(s) have NaN/Inf gradients "
                                "on the very first batch.", bad,
                                ["Check the inputs and labels for NaN/Inf.",
                                 "Look for log(0), division by ~0 or sqrt of a negative in the loss.",
                                 ADVICE["init"], ADVICE["lr"]]))

    # --- vanishing / exploding along depth
    weighted = [l for l in layers if l.fan_in is not None and math.isfinite(l.grad_norm)]
    if len(weighted) >= 2:
        top = max(l.grad_norm for l in weighted)
        first, last = weighted[0], weighted[-1]
        if top > 0:
            ratios = [l.grad_norm / top for l in weighted]
            low = [l.name for l, r in zip(weighted, ratios) if r < VANISH_WARN]
            r0 = ratios[0]
            if r0 < VANISH_WARN:
                sev = "critical" if r0 < VANISH_CRIT else "warning"
                sat = [l for l in layers if l.saturated is not None and l.saturated >= SATURATION_WARN]
                advice = [ADVICE["relu"], ADVICE["init"], ADVICE["norm"], ADVICE["fewer"]]
                if recurrent:
                    advice = [ADVICE["lstm"], ADVICE["tbptt"]] + advice
                findings.append(Finding(
                    sev, "vanishing",
                    f"vanishing gradients in the first layers: {first.name} gets {r0:.2g}x the largest "
                    f"layer gradient ({top:.3g}); {len(low)} of {len(weighted)} weight layers are below "
                    f"{VANISH_WARN:g}x" + (f"; {len(sat)} layer outputs are mostly saturated" if sat else "") + ".",
                    low, advice, {"ratio_first_to_max": r0}))
        if last.grad_norm > 0:
            growth = first.grad_norm / last.grad_norm
            if growth > EXPLODE_WARN:
                sev = "critical" if growth > EXPLODE_CRIT or first.grad_norm > 1e3 else "warning"
                high = [l.name for l in weighted if l.grad_norm > EXPLODE_WARN * last.grad_norm]
                findings.append(Finding(
                    sev, "exploding",
                    f"exploding gradients toward the input: {first.name} gets {growth:.3g}x the gradient "
                    f"of the last layer {last.name} ({first.grad_norm:.3g} vs {last.grad_norm:.3g}).",
                    high, [ADVICE["clip"], ADVICE["init"], ADVICE["norm"], ADVICE["fewer"], ADVICE["reg"],
                           ADVICE["lr"]], {"growth_first_to_last": growth}))

    # --- activations (one finding per kind, naming every layer concerned)
    sat = {n: s_ for n, (s_, _) in act.items() if s_ is not None and s_ >= SATURATION_WARN}
    if sat:
        worst = max(sat.values())
        findings.append(Finding("warning", "saturation",
                                f"{len(sat)} activation layer(s) have most units saturated (slope < "
                                f"{SATURATED_SLOPE:g} of its maximum), up to {100 * worst:.0f}%: almost no "
                                "gradient passes through them.",
                                sorted(sat, key=lambda n: order.get(n, 0)),
                                [ADVICE["relu"], ADVICE["init"], ADVICE["norm"]], {"fractions": sat}))
    dead = {n: d for n, (_, d) in act.items() if d is not None and d >= SATURATION_WARN}
    if dead:
        worst = max(dead.values())
        findings.append(Finding("critical" if worst >= 1.0 else "warning", "dead_relu",
                                f"{len(dead)} ReLU layer(s) have most units zero for every example in the "
                                f"batch, up to {100 * worst:.0f}%: dead units pass no gradient.",
                                sorted(dead, key=lambda n: order.get(n, 0)),
                                [ADVICE["leaky"], ADVICE["init"], ADVICE["lr"], ADVICE["norm"]],
                                {"fractions": dead}))

    # --- init scale (recurrent modules: see the spectral radius instead)
    large, small = [], []
    for l in layers:
        if l.weight_std is None or not l.fan_in or "RNN" in l.kind or "LSTM" in l.kind or "GRU" in l.kind:
            continue
        he = math.sqrt(2.0 / l.fan_in)
        xavier = math.sqrt(2.0 / (l.fan_in + l.fan_out))
        lecun = math.sqrt(1.0 / l.fan_in)
        if l.weight_std > INIT_LARGE * max(he, xavier):
            large.append((l, l.weight_std / he, l.weight_std / xavier))
        elif l.weight_std < INIT_SMALL * lecun:
            small.append((l, l.weight_std / he, l.weight_std / xavier))
    for group, what, advice in ((large, "large: weights this big make gradients grow layer by layer",
                                 [ADVICE["init"], ADVICE["reg"], ADVICE["clip"]]),
                                (small, "small: weights this small shrink gradients layer by layer",
                                 [ADVICE["init"], ADVICE["norm"]])):
        if not group:
            continue
        l0, rh, rx = group[0]
        findings.append(Finding("warning", "init_scale",
                                f"{len(group)} layer(s) start {what}; e.g. {l0.name} has weight std "
                                f"{l0.weight_std:.3g} = {rh:.2g}x He ({math.sqrt(2 / l0.fan_in):.3g}) and "
                                f"{rx:.2g}x Xavier for fan-in {l0.fan_in}.",
                                [g[0].name for g in group], advice,
                                {"layers": {g[0].name: {"std": g[0].weight_std, "vs_he": g[1], "vs_xavier": g[2]}
                                            for g in group}}))

    # --- recurrent weights
    for name, m in recurrent:
        gates = {nn.RNN: ["h"], nn.LSTM: ["i", "f", "g", "o"], nn.GRU: ["r", "z", "n"]}[type(m)]
        for pname, w in m.named_parameters(recurse=False):
            if not pname.startswith("weight_hh"):
                continue
            H = w.shape[1]
            radii = {g: _spectral_radius(w[i * H:(i + 1) * H]) for i, g in enumerate(gates)}
            rho = max(radii.values())
            full = f"{name}.{pname}" if name else pname
            T = seq_len.get(name)
            plain = isinstance(m, nn.RNN)
            relu = plain and m.nonlinearity == "relu"
            where = f" over {T} time steps" if T else ""
            detail = "" if plain else " (largest gate block; " + ", ".join(f"{g}: {r:.3g}" for g, r in radii.items()) + ")"
            if rho >= RADIUS_HIGH and plain:
                sev = "critical" if rho > 1.5 and (T or 0) >= 20 else "warning"
                why = ("a ReLU RNN has no squashing, so a radius >= 1 can grow gradients (and activations) "
                       f"like {rho:.3g}^T{where}" if relu else
                       f"a radius > 1 is what lets tanh-RNN gradients explode{where}")
                findings.append(Finding(sev, "spectral_radius",
                                        f"spectral radius of {full} is {rho:.3g}: {why}.",
                                        [full], [ADVICE["clip"], ADVICE["lstm"], ADVICE["tbptt"], ADVICE["lr"]], {"spectral_radius": rho, "seq_len": T}))
            elif rho < RADIUS_LOW and plain:
                findings.append(Finding("warning", "spectral_radius",
                                        f"spectral radius of {full} is {rho:.3g}: gradients shrink like "
                                        f"{rho:.3g}^T{where}, so long-range dependencies vanish.",
                                        [full], [ADVICE["lstm"], ADVICE["orth"], ADVICE["tbptt"]],
                                        {"spectral_radius": rho, "seq_len": T}))
            else:
                findings.append(Finding("info", "spectral_radius",
                                        f"spectral radius of {full} is {rho:.3g}{detail}.", [full],
                                        [ADVICE["clip"]] if rho >= RADIUS_HIGH else [],
                                        {"spectral_radius": rho, "gates": radii, "seq_len": T}))
        if isinstance(m, nn.RNN) and seq_len.get(name, 0) > 50:
            findings.append(Finding("warning", "long_sequence",
                                    f"{name} is a plain RNN unrolled over {seq_len[name]} steps: backprop "
                                    "through time multiplies one Jacobian per step.",
                                    [name], [ADVICE["lstm"], ADVICE["tbptt"], ADVICE["clip"]],
                                    {"seq_len": seq_len[name]}))

    # --- depth
    if depth >= DEEP and n_norm == 0:
        findings.append(Finding("warning" if not findings else "info", "depth",
                                f"{depth} weight layers and no normalization layer: each layer multiplies "
                                "the backward signal once more.", [],
                                [ADVICE["fewer"], ADVICE["norm"], ADVICE["relu"], ADVICE["init"]],
                                {"depth": depth}))

    findings.sort(key=lambda f: -SEVERITIES.index(f.severity))
    return Diagnosis(loss_v, layers, findings, depth)


# ---------------------------------------------------------------------- CLI
def _load_factory(spec: str):
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"target must be MODULE:FACTORY (e.g. mypkg.models:make_case), got {spec!r}")
    mod_name, fn_name = spec.split(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # let `gradguard diagnose mymodule:factory` find local files
    mod = importlib.import_module(mod_name)
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{mod_name} has no callable {fn_name!r}")
    made = fn()
    if not (isinstance(made, (tuple, list)) and len(made) == 3):
        raise ValueError(f"{spec}() must return (model, batch, loss_fn), got {type(made).__name__}")
    return made


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="MODULE:FACTORY",
                        help="FACTORY() returns (model, batch, loss_fn); e.g. gradguard.tools.tasks.deep:vanishing_case")
    parser.add_argument("--fail-on", choices=("critical", "warning"), default="critical",
                        help="lowest severity that makes the exit status 1 (default: critical)")
    parser.add_argument("--json", action="store_true", help="print the diagnosis as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        model, batch, loss_fn = _load_factory(args.target)
        d = diagnose(model, batch, loss_fn)
    except (ValueError, TypeError, ImportError) as e:
        print(f"gradguard diagnose: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(d.to_dict(), indent=1, default=str) if args.json else d.render())
    worst = d.worst()
    if worst is not None and SEVERITIES.index(worst) >= SEVERITIES.index(args.fail_on):
        return 1
    return 0
