"""The one step lane: the decision under both backends, check(), the stepping strategy,
the accelerator lane's dispatch count, and the package's import graph."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradguard as gg
from gradguard.apply import FusedStep, NoStep, PlainStep, ScalerStep, stepper_for
from gradguard.backend import DEVICE, HOST
from gradguard.decide import decide, loss_value
from gradguard.stats import compute_stats

from conftest import no_host_sync
from _helpers import mlp

SRC = Path(gg.__file__).parent


def _bits(x) -> np.ndarray:
    a = np.atleast_1d(np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x))
    return a.view(f"u{a.itemsize}") if a.dtype.kind == "f" else a


def _grads(seed: int, poison=None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(7, 5, generator=g) * 3, torch.randn(5, generator=g), torch.randn(2, 3, 4, generator=g)]
    if poison is not None:
        grads[1][2] = poison
    return grads


@pytest.mark.parametrize("poison", [None, math.nan, math.inf, -math.inf, 1e30], ids=repr)
@pytest.mark.parametrize("loss", [None, 0.5, math.nan, math.inf, 3e38, 1e39], ids=repr)
@pytest.mark.parametrize("held", [False, True])
@pytest.mark.parametrize("skip_nonfinite", [True, False])
@pytest.mark.parametrize("max_norm", [None, 0.1, 1e6])
def test_decide_is_bitwise_the_same_on_both_backends(poison, loss, held, skip_nonfinite, max_norm):
    """``decide`` is written once; numpy scalars and tensors must give the same bits."""
    names = ["a", "b", "c"]
    out = {}
    for xp in (HOST, DEVICE):
        grads = _grads(0, poison)
        stats = compute_stats(names, grads, xp=xp)
        lv, lb = loss_value(loss, xp, stats.total)
        clip = gg.GlobalNorm(max_norm) if max_norm else None
        d, vstats = decide(stats, lb, held=held, skip_nonfinite=skip_nonfinite, clip=clip, grads=grads)
        out[xp.on_host] = d, lv, vstats
    (dh, lh, sh), (dd, ld, sd) = out[True], out[False]
    for f in ("bad", "loss_bad", "skip"):
        assert _bits(getattr(dh, f)).tolist() == _bits(getattr(dd, f)).tolist(), f
    assert dh.held == dd.held == held and dh.may_skip == dd.may_skip == (held or skip_nonfinite)
    assert (dh.coef is None) == (dd.coef is None) == (max_norm is None)
    if max_norm:
        assert _bits(dh.coef).tolist() == _bits(dd.coef).tolist()
    if loss is not None:
        assert _bits(np.float32(lh)).tolist() == _bits(ld).tolist()
    assert bool(sh.flag) == bool(sd.flag)
    # The oracle: poisoned iff a gradient or the loss is NaN/Inf (or the norm overflows float32).
    # The C kernel sums squares in float64; torch's CPU fallback in float32, where 1e30**2 overflows.
    acc = torch.float64 if gg._kernel.available() else torch.float32
    total = torch.linalg.vector_norm(torch.cat([g.to(acc).flatten() for g in _grads(0, poison)]))
    want_bad = (not math.isfinite(total) or total > 3.4028234663852886e38
                or (loss is not None and not math.isfinite(np.float32(loss))))
    assert bool(dh.bad) == want_bad
    assert bool(dh.skip) == (held or (skip_nonfinite and want_bad))


def test_decide_vetoes_policy_learning_on_held_and_poisoned_steps():
    """A stateful policy must not absorb a step that will not be applied."""
    names = ["a", "b", "c"]
    for xp in (HOST, DEVICE):
        clip = gg.AutoClip(percentile=50, history=8)
        grads = _grads(1)
        decide(compute_stats(names, grads, xp=xp), None, held=True, skip_nonfinite=True, clip=clip,
               grads=grads)
        _, lb = loss_value(math.nan, xp, compute_stats(names, grads, xp=xp).total)
        decide(compute_stats(names, grads, xp=xp), lb, held=False, skip_nonfinite=True, clip=clip,
               grads=grads)
        assert int(clip.state_dict()["count"]) == 0


@pytest.mark.parametrize("bad", ["x", b"1", [1.0], True, np.bool_(True), complex(1, 0),
                                 torch.tensor([1.0, 2.0]), torch.tensor(1 + 2j), 10 ** 400])
def test_loss_value_refuses_naming_loss(bad):
    with pytest.raises((TypeError, ValueError), match="loss"):
        loss_value(bad, HOST, np.asarray(1.0, np.float32))


@pytest.mark.parametrize("good", [np.float32(2.5), np.float64(2.5), 2, torch.tensor(2.5), torch.tensor([2.5]),
                                  torch.tensor(2.5, dtype=torch.float16)])
def test_loss_value_accepts_real_scalars(good):
    for xp in (HOST, DEVICE):
        v, bad = loss_value(good, xp, np.asarray(1.0, np.float32) if xp is HOST else torch.ones(()))
        assert float(v) == float(np.float32(float(good) if not isinstance(good, torch.Tensor) else good.item()))
        assert not bool(bad)


def _model(seed=0, width=8, depth=3):
    return mlp(*[width] * (depth + 1), 2, seed=seed)


def _backward(model, i):
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(16, model[0].in_features, generator=g)
    model.zero_grad()
    model(x).square().mean().backward()


@pytest.mark.parametrize("backend", ["host", "device"])
@pytest.mark.parametrize("poison", [False, True])
def test_check_decides_clips_and_records_without_stepping(backend, poison):
    """check(): the step's statistics, clipping and row, and no optimizer step."""
    model, ref = _model(), _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(0.01), backend=backend, detectors=[])
    _backward(model, 0)
    _backward(ref, 0)
    if poison:
        model[0].bias.grad[0] = math.nan
    before = [p.detach().clone() for p in model.parameters()]
    report = guard.check(loss=1.0)
    assert report.skipped == poison and report.applied == (not poison)
    assert not opt.state  # never stepped
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    if not poison:
        total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01)
        assert report.global_norm == pytest.approx(float(total), rel=1e-6)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    assert guard.steps == 1 and guard.skipped_steps == int(poison)


def test_stepper_is_chosen_once_from_the_optimizer():
    model = _model()
    assert isinstance(stepper_for(torch.optim.SGD(model.parameters(), lr=0.1)), PlainStep)
    assert isinstance(stepper_for(torch.optim.AdamW(model.parameters(), fused=True)), FusedStep)
    scaler = torch.amp.GradScaler("cpu")
    assert isinstance(stepper_for(torch.optim.SGD(model.parameters(), lr=0.1), scaler), ScalerStep)
    guard = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(guard._stepper, PlainStep) and isinstance(guard._no_step, NoStep)


def test_only_apply_steps_the_optimizer():
    """The optimizer is stepped from one place: apply._step."""
    calls = []
    for path in SRC.rglob("*.py"):
        if "tools" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "step"
                    and isinstance(node.func.value, (ast.Name, ast.Attribute))):
                target = ast.unparse(node.func.value)
                if "opt" in target or "optimizer" in target or "scaler" in target:
                    calls.append(f"{path.relative_to(SRC)}:{node.lineno}:{target}")
    assert all(c.startswith("apply.py:") for c in calls), calls
    assert calls  # the walk did find the real call sites


def _to_host(func, args, kwargs) -> bool:
    """A dispatched copy from a non-CPU tensor into CPU memory: a device-to-host read back
    (``.to("cpu")``, ``.cpu()``, ``cpu_tensor.copy_(device_tensor)``).  On a CPU run no tensor
    is elsewhere, so it never fires there: it is for the same test on an accelerator."""
    op = str(func.overloadpacket)
    if op == "aten._to_copy":
        src, dst = args[0], kwargs.get("device")
        return dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu"
    if op == "aten.copy_":
        dst, src = args[0], args[1]
        return isinstance(src, torch.Tensor) and dst.device.type == "cpu" and src.device.type != "cpu"
    return False


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.to_host: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(str(func.overloadpacket))
        if _to_host(func, args, kwargs):
            self.to_host.append(str(func))
        return func(*args, **kwargs)


def _ops_per_step(depth: int, clip, opt_kind: str, monkeypatch, device="cpu") -> list[list[str]]:
    model = _model(depth=depth).to(device)
    params = list(model.parameters())
    opt = (torch.optim.AdamW(params, lr=1e-3, fused=True) if opt_kind == "fused"
           else torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True))  # as on CUDA
    guard = gg.Guard(model, opt, clip=clip, backend="device", flush_every=64, param_norm_every=0)
    made = []  # tensors built from Python data: on CUDA a host-to-device copy, a sync
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _n=name, **k: made.append(_n) or _real(*a, **k))
    per_step = []
    loss = torch.full((), 0.5, device=device)
    for i in range(4):
        _backward(model, i)
        made.clear()
        with _Count() as c:
            guard.step(loss=loss)
        per_step.append((c.ops, list(made) + c.to_host))
    monkeypatch.undo()
    return per_step[2:]  # steady state: the optimizer's state exists


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_kind", ["fused", "sgd"])
@pytest.mark.parametrize("clip", [None, "global"])
def test_accelerator_lane_dispatches_a_constant_number_of_ops(opt_kind, clip, device, monkeypatch):
    """The accelerator lane launches the same ops for 8 tensors as for 80 (multi-tensor
    kernels), never builds a tensor from Python data (a host-to-device copy on CUDA) and
    never copies a device tensor to the host (checked where there is a device: on CPU such a
    copy is no copy at all and dispatches nothing)."""
    policy = (lambda: gg.GlobalNorm(1.0)) if clip else (lambda: None)
    small = _ops_per_step(3, policy(), opt_kind, monkeypatch, device)
    large = _ops_per_step(39, policy(), opt_kind, monkeypatch, device)
    assert [len(ops) for ops, _ in small] == [len(ops) for ops, _ in large], (small[0][0], large[0][0])
    for ops, made in small + large:
        assert not made, made
        # unmeasured parameter norms are NaN from one fill per flush interval, not one per step
        assert "aten.fill_" not in ops, ops
    if opt_kind == "fused":
        assert small[0][0].count("aten._fused_adamw_") == 1


def test_the_sync_checks_see_a_copy_to_the_host():
    """The checks above and conftest.no_host_sync can fail: a copy out of a non-CPU tensor
    (the meta device stands in for an accelerator) is seen by the dispatch count, and by
    no_host_sync through ``.to``, ``.copy_`` and ``.cpu``; ``.to`` that stays put, or only
    changes the dtype, is not a read."""
    meta, host = torch.empty(3, device="meta"), torch.ones(3)
    for copy in (lambda: meta.to("cpu"), lambda: meta.to(host), lambda: meta.cpu(),
                 lambda: torch.empty(3).copy_(meta)):
        with _Count() as c, pytest.raises(NotImplementedError):  # a meta tensor has no data
            copy()
        assert c.to_host, c.ops
        with no_host_sync(), pytest.raises(AssertionError, match="host sync"):
            copy()
    with no_host_sync():
        host.to("cpu"), host.to(torch.float64), host.to(host), host.clone().copy_(host)
        with pytest.raises(NotImplementedError):  # past the check (no wait), then meta has no data
            meta.to("cpu", non_blocking=True)
        with pytest.raises(AssertionError, match="Tensor.cpu"):
            host.cpu()  # a request for a host copy: seen on CPU too
    assert torch.Tensor.cpu is torch._C.TensorBase.cpu and torch.Tensor.to is torch._C.TensorBase.to


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module, level) of every import statement in ``path`` (any depth)."""
    mod = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    tree = ast.parse(path.read_text())
    typing_only = set()  # imports under `if TYPE_CHECKING:` are annotations, not edges
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for b in node.body for n in ast.walk(b)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = pkg
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (base + "." + node.module if node.module else base) if node.level else node.module
            out.append(target)
            for alias in node.names:
                out.append(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return [t for t in out if t and t.startswith("gradguard")]


def _graph() -> dict[str, set[str]]:
    mods = {}
    for path in SRC.rglob("*.py"):
        mod = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        mods[mod] = path
    graph = {}
    for mod, path in mods.items():
        deps = set()
        for t in _imports(path):
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != mod:
                deps.add(t)
        graph[mod] = deps
    return graph


def test_no_import_cycle_in_the_package():
    """Including function-level imports: a cycle hidden inside a function is still a cycle.
    Shims kept for one release (old module paths) and package __init__ re-exports are edges too."""
    graph = _graph()
    # a package's __init__ importing its own submodules is not an upward edge
    for mod in graph:
        graph[mod] = {d for d in graph[mod] if not d.startswith(mod + ".")}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, cycles[:5]


def test_the_core_imports_nothing_above_it():
    """Lower modules never import the orchestrator or the tools."""
    graph = _graph()
    core = ["gradguard.stats", "gradguard.backend", "gradguard.decide", "gradguard.apply", "gradguard.buffer",
            "gradguard.clip", "gradguard.adaptive", "gradguard.layout", "gradguard.events"]
    for mod in core:
        bad = {d for d in graph.get(mod, ()) if d == "gradguard.guard" or d.startswith("gradguard.tools")
               or d.startswith("gradguard.integrations") or d.startswith("gradguard.record")}
        assert not bad, (mod, bad)


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 520}
    assert not long, long


def test_compiled_model_has_the_plain_names():
    """torch.compile wraps the model (names gain "_orig_mod."): the guard uses the plain names,
    so PerLayer patterns and guard checkpoints work on both."""
    model = _model()
    compiled = torch.compile(model)
    assert any(n.startswith("_orig_mod.") for n, _ in compiled.named_parameters())
    plain = gg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     clip=gg.PerLayer({"0.*": gg.GlobalNorm(1.0)}, default=gg.GlobalNorm(2.0)))
    guard = gg.Guard(compiled, torch.optim.SGD(compiled.parameters(), lr=0.1),
                     clip=gg.PerLayer({"0.*": gg.GlobalNorm(1.0)}, default=gg.GlobalNorm(2.0)))
    assert guard.names == plain.names
    guard.load_state_dict(plain.state_dict())


FIRST_STEP_OPTS = {
    "sgd-momentum-fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
}


@pytest.mark.parametrize("backend", ["host", "device"])
@pytest.mark.parametrize("opt_name", list(FIRST_STEP_OPTS))
def test_poisoned_first_step_leaves_no_trace(opt_name, backend):
    """Step 0 poisoned, before any optimizer state exists (a fused optimizer skipped through
    found_inf then would keep a broken momentum buffer): nothing changes, and the run equals
    one that never saw that batch, bit for bit."""
    torch.set_num_threads(1)
    model, ref = _model(), _model()
    opt, ref_opt = FIRST_STEP_OPTS[opt_name](model.parameters()), FIRST_STEP_OPTS[opt_name](ref.parameters())
    guard = gg.Guard(model, opt, clip=gg.GlobalNorm(0.5), backend=backend, detectors=[])
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model, 0)
    model[0].weight.grad[0, 0] = math.nan
    assert guard.step(loss=1.0).skipped
    assert not opt.state or all(not s for s in opt.state.values())
    assert all(torch.equal(p.detach().view(torch.int32), q.view(torch.int32))
               for p, q in zip(model.parameters(), before))
    for i in range(1, 6):
        _backward(model, i)
        guard.step(loss=1.0)
        _backward(ref, i)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)
