"""``gradguard replay DUMP``: re-run a flight-recorded step and name the op that made the first NaN.

The forward runs under a ``TorchFunctionMode`` that checks every op's output
for NaN/Inf and remembers which module was running; the backward runs under
``torch.autograd.detect_anomaly(check_nan=True)``, whose error names the
backward function that produced the first NaN, mapped back to the module that
created it in the forward.

A dump is read with ``torch.load(weights_only=True)``: tensors, numbers,
strings and containers only, so a crafted ``flight-*.pt`` cannot run code.
The model comes from ``--factory MODULE:FN`` (its weights from the dump).
The model object and ``loss_fn`` the dump may hold as pickles are unpickled
only with ``trust_pickle=True`` (``--trust-pickle``): unpickling runs
arbitrary code, so only for dumps you wrote yourself.
"""
from __future__ import annotations

import importlib
import io
import pickle
import re
import sys

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["add_arguments", "run", "replay", "ReplayResult"]


class _Watch(TorchFunctionMode):
    """Records the module stack, the first op with a non-finite output, and grad_fn -> module."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.first: dict | None = None
        self.nodes: list[tuple[str, str]] = []  # (grad_fn name, module path) in creation order

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        where = self.stack[-1] if self.stack else "<top level>"
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                if t.grad_fn is not None:
                    self.nodes.append((t.grad_fn.name(), where))
                if self.first is None and not bool(torch.isfinite(t).all()):  # host sync: replay only
                    ins = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
                    self.first = {"op": getattr(func, "__name__", str(func)), "module": where,
                                  "inputs": [_describe(a) for a in ins[:2]], "output": _describe(t)}
        return out


def _describe(t: torch.Tensor) -> str:
    t = t.detach().float()
    fin = t[torch.isfinite(t)]
    rng = f"min {fin.min().item():.3g}, max {fin.max().item():.3g}" if fin.numel() else "no finite values"  # host sync: replay tool, not training
    return (f"shape {tuple(t.shape)}: {int(torch.isnan(t).sum())} NaN, {int(torch.isinf(t).sum())} Inf, "
            f"{rng}")


class ReplayResult(dict):
    """``phase`` ("forward" | "backward" | None), ``op``, ``module``, ``module_type``, ``detail``."""

    def __str__(self) -> str:
        if self.get("phase") is None:
            return "replay: no NaN/Inf appeared in the forward or the backward of this step."
        mod = f"module {self['module']} ({self['module_type']})" if self.get("module_type") else \
            f"module {self['module']}"
        return f"replay: first NaN/Inf in the {self['phase']} at op {self['op']} in {mod}. {self['detail']}"


def _load_model(dump: dict, factory: str | None, trust_pickle: bool = False):
    if factory:  # weights only: the pickled model and loss_fn in the dump are never unpickled
        mod_name, _, fn = factory.partition(":")
        out = getattr(importlib.import_module(mod_name), fn)()
        model, loss_fn = (out if isinstance(out, tuple) else (out, None))
    elif dump.get("model_pickle") is not None and trust_pickle:
        model = torch.load(io.BytesIO(dump["model_pickle"]), weights_only=False)
        loss_fn = None
    elif dump.get("model_pickle") is not None:
        raise ValueError("the dump holds a pickled model, and unpickling runs arbitrary code: pass "
                         "--factory MODULE:FN returning (model, loss_fn) (safe: weights only), or "
                         "--trust-pickle if you wrote this dump yourself")
    else:
        raise ValueError("the dump holds no pickled model: pass --factory MODULE:FN returning "
                         "(model, loss_fn)")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"the model is a {type(model).__name__}, not a torch.nn.Module")
    if dump.get("loss_fn") is not None and loss_fn is None and trust_pickle:
        loss_fn = torch.load(io.BytesIO(dump["loss_fn"]), weights_only=False)
    model.load_state_dict(dump["model"])
    return model, loss_fn


def replay(dump_or_path, factory: str | None = None, device: str = "cpu",
           trust_pickle: bool = False) -> ReplayResult:
    """Re-run the dumped step; return where the first NaN/Inf appeared.

    Args:
        dump_or_path: a flight-recorder dump (path or loaded dict).
        factory: ``"module:function"`` returning ``(model, loss_fn)``; the
            dump then only gives the weights and the batch.
        device: where to run (default ``"cpu"``).
        trust_pickle: load the dump with ``weights_only=False`` and unpickle
            the model object and ``loss_fn`` it holds.  Unpickling runs
            arbitrary code: only for dumps you wrote yourself.
    Returns:
        ReplayResult; ``str(result)`` is the sentence ``gradguard replay`` prints.
    """
    if isinstance(dump_or_path, dict):
        dump = dump_or_path
    else:
        try:
            dump = torch.load(dump_or_path, map_location="cpu", weights_only=not trust_pickle)
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{dump_or_path} is not a plain flight-recorder dump (it needs code to "
                             f"load: {str(exc).splitlines()[0]}); if you wrote it yourself, pass "
                             "--trust-pickle") from None
    if not isinstance(dump, dict):
        raise ValueError(f"{dump_or_path} is not a flight-recorder dump (got {type(dump).__name__})")
    if dump.get("batch") is None:
        raise ValueError("the dump holds no batch: pass guard.step(loss, batch=batch) to record it")
    model, loss_fn = _load_model(dump, factory, trust_pickle)
    model.to(device).train()
    batch = _to(dump["batch"], device)
    names = {m: n or "<root>" for n, m in model.named_modules()}
    watch = _Watch()
    hooks = []
    def enter(m, args):
        watch.stack.append(names[m])

    def leave(m, args, out):
        watch.stack.pop()

    for m in model.modules():
        hooks.append(m.register_forward_pre_hook(enter))
        hooks.append(m.register_forward_hook(leave))
    types = {n or "<root>": type(m).__name__ for n, m in model.named_modules()}
    res = ReplayResult(phase=None, op=None, module=None, module_type=None, detail="", step=dump["step"])
    try:
        with torch.autograd.detect_anomaly(check_nan=True), watch:
            if loss_fn is not None:
                loss = loss_fn(model, batch)
            else:
                out = model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
                loss = out.float().sum()
        if watch.first is not None:
            f = watch.first
            res.update(phase="forward", op=f["op"], module=f["module"], module_type=types.get(f["module"]),
                       detail=f"Input {f['inputs'][0] if f['inputs'] else '?'}; output {f['output']}.")
            return res
        with torch.autograd.detect_anomaly(check_nan=True):
            try:
                loss.backward()
            except RuntimeError as exc:
                m = re.search(r"Function '(\w+)' returned nan values", str(exc))
                if not m:
                    raise
                fn = m.group(1)
                # backward runs in reverse creation order: the last node of that name is the first hit
                where = next((w for n, w in reversed(watch.nodes) if n == fn), "<unknown>")
                res.update(phase="backward", op=fn, module=where, module_type=types.get(where),
                           detail=f"autograd: {str(exc).splitlines()[0]}")
    finally:
        for h in hooks:
            h.remove()
    return res


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def add_arguments(parser) -> None:
    parser.add_argument("dump", help="a flight-recorder dump (flight-<step>-<kind>.pt)")
    parser.add_argument("--factory", default=None,
                        help="MODULE:FN returning (model, loss_fn); the dump gives only the weights "
                             "and the batch (the safe way)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load the model object and loss_fn pickled in the dump. Unpickling runs "
                             "arbitrary code: a crafted dump could do anything your account can. "
                             "Only for dumps you wrote yourself; without it the dump is read with "
                             "torch.load(weights_only=True)")
    parser.add_argument("--device", default="cpu", help="where to run the step (default cpu)")


def run(args) -> int:
    """Print where the first NaN/Inf appears; exit 1 if one does, 0 if the step is clean."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode's own traceback warnings
        try:
            res = replay(args.dump, args.factory, args.device, trust_pickle=args.trust_pickle)
        except (ValueError, FileNotFoundError) as exc:
            print(f"gradguard replay: {exc}", file=sys.stderr)
            return 2
    print(res)
    return 0 if res.get("phase") is None else 1
