"""Mutation testing of gradguard's core modules without a dependency: does a test fail when the code is wrong?

A small AST mutation runner (no dependency).  For each module below it makes single-point
mutants of the source -- a comparison flipped (``<`` -> ``<=``, ``==`` -> ``!=``, ``is`` ->
``is not``, ...), ``and``/``or`` swapped, ``not`` removed, an arithmetic operator swapped,
a numeric constant changed, ``True``/``False`` swapped, a statement dropped -- and runs that
module's own test files against each, in a fresh interpreter with a timeout.  A mutant is
*killed* when the tests fail (or time out, or crash), *survived* when they pass.

``make mutate`` runs cosmic-ray (``scripts/mutate_cr.py``, on this same ``TARGETS`` table);
this runner is the fallback without that dependency (``make mutate-ast``).  It states exactly
what it mutates, only inside function bodies, so its mutants are fewer and rarely equivalent.

Each mutant is written into a private copy of ``src/`` (the compiled kernel travels with it),
so the working tree is never modified, and an interrupted run leaves nothing behind.

    python scripts/mutate.py                      # every module, every mutant
    python scripts/mutate.py --module clip --sample 30 --seed 1
    python scripts/mutate.py --list               # the mutants, without running anything
    python scripts/mutate.py --shard 1/4          # the first quarter of the mutants

Prints one line per surviving mutant (``file:line  description``) and the score per module.
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = "src/gradguard"

# module (under src/gradguard) -> the test files that claim it.  Only these run per mutant:
# the score says whether the module's *own* tests notice a wrong line.
TARGETS: dict[str, list[str]] = {
    "decide.py": ["tests/test_backend_decide.py", "tests/test_apply_paths.py", "tests/test_honest_skips.py",
                  "tests/test_regressions.py", "tests/test_host_sync.py", "tests/test_guard.py"],
    "backend.py": ["tests/test_backend_decide.py", "tests/test_clip.py", "tests/test_honest_skips.py"],
    "clip.py": ["tests/test_clip.py", "tests/test_properties.py"],
    "apply.py": ["tests/test_apply_paths.py", "tests/test_honest_skips.py", "tests/test_regressions.py",
                 "tests/test_host_sync.py"],
    # the sharded (DTensor) path: only real process groups reach it (test_distributed, last: slow)
    "stats.py": ["tests/test_stats.py", "tests/test_distributed.py"],
    # detectors: synthetic-row tests first, then the training scenarios of test_detect
    "detect/spike.py": ["tests/test_spike_baseline.py", "tests/test_detect.py"],
    "detect/loss_spike.py": ["tests/test_spike_baseline.py", "tests/test_detect.py"],
    "detect/unused.py": ["tests/test_unused.py", "tests/test_detect.py", "tests/test_resume.py"],
    "detect/poisoned.py": ["tests/test_dead_run.py", "tests/test_detect.py"],
    **{f"detect/{m}.py": ["tests/test_detect.py"] for m in (
        "exploding", "vanishing", "divergence", "over_clipping", "weight_growth", "_window")},
    # the nonfinite event: the detector tests, then the guard's (a GradScaler, the re-run's finding)
    "detect/nonfinite.py": ["tests/test_detect.py", "tests/test_guard.py"],
    "detect/base.py": ["tests/test_detect.py", "tests/test_reliability.py"],
    # BatchNorm running statistics: which buffers, their row block, the detector on real runs
    "detect/running_stats.py": ["tests/test_running_stats.py"],
    "layout.py": ["tests/test_running_stats.py", "tests/test_detect.py"],
    # the event order (the detector tests, the store), the errors (dead runs, the guard)
    "events.py": ["tests/test_detect.py", "tests/test_store.py", "tests/test_dead_run.py", "tests/test_guard.py"],
    # remedies
    "remedies/rollback.py": ["tests/test_rollback_schedule.py", "tests/test_act.py", "tests/test_honest_skips.py",
                             "tests/test_resume.py"],
    "remedies/snapshot.py": ["tests/test_act.py", "tests/test_honest_skips.py", "tests/test_apply_paths.py"],
    "remedies/actions.py": ["tests/test_act.py", "tests/test_remedies.py"],
    "remedies/table.py": ["tests/test_act.py", "tests/test_remedies.py"],
    "remedies/context.py": ["tests/test_act.py", "tests/test_remedies.py"],
    "remedies/flight.py": ["tests/test_act.py", "tests/test_replay.py"],
    "remedies/autopilot.py": ["tests/test_autopilot.py"],
    # the store writer (SQLite): committed rows, resume, failures
    "record/store_writer.py": ["tests/test_store.py", "tests/test_resume.py", "tests/test_store_reliability.py",
                               "tests/test_running_stats.py"],
}
# (the fast, targeted files come first: with -x a killed mutant costs seconds)


CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
            ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
            ast.In: ast.NotIn, ast.NotIn: ast.In}
BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
            ast.FloorDiv: ast.Div, ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult,
            ast.BitOr: ast.BitAnd, ast.BitAnd: ast.BitOr}
SYM = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
       ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in", ast.Add: "+",
       ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**",
       ast.BitOr: "|", ast.BitAnd: "&"}


@dataclass
class Mutant:
    module: str
    index: int      # position among the module's mutation points (walk order)
    line: int
    what: str

    @property
    def where(self) -> str:
        return f"{PKG}/{self.module}:{self.line}"


def _skipped_nodes(tree: ast.Module) -> set[int]:
    """Nodes not to mutate: docstrings, ``__all__``, annotations, f-strings of messages,
    ``raise`` statements (their messages and types are checked by error tests, not here),
    and ``if TYPE_CHECKING`` blocks."""
    skip: set[int] = set()

    def mark(n):
        for sub in ast.walk(n):
            skip.add(id(sub))

    # only code that runs: function bodies (module/class-level constants, dataclass fields and
    # decorators broken on purpose only fail the import -- noise that would inflate the score)
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for stmt in (node.body if isinstance(node.body, list) else [node.body]):
                inside.update(id(sub) for sub in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) not in inside:
            skip.add(id(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                mark(body[0])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
                if a.annotation is not None:
                    mark(a.annotation)
            if node.returns is not None:
                mark(node.returns)
        if isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                for t in node.targets):
            mark(node)
        if isinstance(node, (ast.Raise, ast.Import, ast.ImportFrom, ast.JoinedStr)):
            mark(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            mark(node)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "warn":
            mark(node)
    return skip


def _points(tree: ast.Module):
    """Yield ``(node, kind, description, apply)`` for every mutation point, in walk order.

    ``apply(node)`` mutates that node in place (on a deep copy of the tree)."""
    skip = _skipped_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                new = CMP_SWAP.get(type(op))
                if new:
                    yield node, f"`{SYM[type(op)]}` -> `{SYM[new]}`", \
                        (lambda n, i=i, new=new: n.ops.__setitem__(i, new()))
        elif isinstance(node, ast.BoolOp):
            new = ast.Or if isinstance(node.op, ast.And) else ast.And
            yield node, f"`{'and' if new is ast.Or else 'or'}` -> `{'or' if new is ast.Or else 'and'}`", \
                (lambda n, new=new: setattr(n, "op", new()))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.Invert)):
            yield node, "`not`/`~` removed", (lambda n: setattr(n, "_drop", True))
        elif isinstance(node, ast.BinOp) and type(node.op) in BIN_SWAP:
            new = BIN_SWAP[type(node.op)]
            yield node, f"`{SYM[type(node.op)]}` -> `{SYM[new]}`", (lambda n, new=new: setattr(n, "op", new()))
        elif isinstance(node, ast.AugAssign) and type(node.op) in BIN_SWAP:
            new = BIN_SWAP[type(node.op)]
            yield node, f"`{SYM[type(node.op)]}=` -> `{SYM[new]}=`", (lambda n, new=new: setattr(n, "op", new()))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float) \
                and not isinstance(node.value, bool):
            v = node.value
            nv = {0: 1, 1: 0}.get(v, v + 1) if isinstance(v, int) else (1.0 if v == 0 else v * 2)
            yield node, f"constant {v!r} -> {nv!r}", (lambda n, nv=nv: setattr(n, "value", nv))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            yield node, f"`{node.value}` -> `{not node.value}`", (lambda n: setattr(n, "value", not n.value))
        if isinstance(node, ast.Return) and (node.value is None or isinstance(node.value, ast.Constant)
                                             and node.value.value is None):
            continue  # dropping `return None` gives `return None`: not a mutant
        if isinstance(node, (ast.Expr, ast.Assign, ast.AugAssign, ast.Return, ast.AnnAssign)) \
                and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            kind = type(node).__name__.lower()
            yield node, f"statement dropped ({kind})", (lambda n: setattr(n, "_drop", True))


class _Apply(ast.NodeTransformer):
    """Turns the marks left by ``_points`` into the mutated tree."""

    def generic_visit(self, node):
        node = super().generic_visit(node)
        if getattr(node, "_drop", False):
            if isinstance(node, ast.UnaryOp):
                return node.operand
            if isinstance(node, ast.Return):  # a dropped return still returns (None)
                return ast.Return(value=None)
            return ast.Pass()
        return node


def mutants_of(module: str) -> list[Mutant]:
    tree = ast.parse((ROOT / PKG / module).read_text())
    ms = [Mutant(module, i, getattr(n, "lineno", 0), what) for i, (n, what, _) in enumerate(_points(tree))]
    return sorted(ms, key=lambda m: (m.line, m.index))


def mutated_source(m: Mutant) -> str:
    tree = ast.parse((ROOT / PKG / m.module).read_text())
    tree = copy.deepcopy(tree)
    for i, (node, what, apply) in enumerate(_points(tree)):
        if i == m.index:
            assert what == m.what, (what, m.what)
            apply(node)
            break
    tree = _Apply().visit(tree)
    ast.fix_missing_locations(tree)
    return ast.unparse(tree)


def run_tests(src_root: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    """``("killed"|"survived"|"timeout", seconds)`` for one run of ``tests`` on ``src_root``."""
    env = dict(os.environ, PYTHONPATH=str(src_root), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--timeout",
           str(int(timeout)), *tests]
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0
    return ("survived" if rc == 0 else "killed"), time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", action="append", choices=sorted(m[:-3] for m in TARGETS),
                    help="only this module (repeatable; default: all)")
    ap.add_argument("--sample", type=int, default=0, help="at most N random mutants per module (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    ap.add_argument("--shard", default="1/1", help="K/N: run the K-th of N interleaved slices")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per mutant run (default 300)")
    ap.add_argument("--line", type=int, action="append",
                    help="only the mutants on this line (repeatable; with one --module): re-check survivors")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line for every mutant, killed too")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    k, n = (int(x) for x in args.shard.split("/"))
    if not 1 <= k <= n:
        ap.error("--shard must be K/N with 1 <= K <= N")
    if args.line and len(args.module or []) != 1:
        ap.error("--line needs exactly one --module")

    modules = [m + ".py" for m in args.module] if args.module else list(TARGETS)
    plan: list[Mutant] = []
    for mod in modules:
        ms = mutants_of(mod)
        if args.line:
            ms = [m for m in ms if m.line in args.line]
        if args.sample and len(ms) > args.sample:
            ms = sorted(random.Random(f"{args.seed}:{mod}").sample(ms, args.sample), key=lambda m: (m.line, m.index))
        plan += ms
    plan = plan[k - 1::n]
    if args.list:
        for m in plan:
            print(f"{m.where}  {m.what}")
        print(f"{len(plan)} mutants")
        return 0

    # a SIGTERM still runs the cleanup below (the temporary copy of src/)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gg-mutate-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        for mod in modules:
            tests = [t for t in TARGETS[mod] if (ROOT / t).exists()]
            todo = [m for m in plan if m.module == mod]
            if not todo:
                continue
            verdict, secs = run_tests(src, tests, args.timeout)  # the unmutated baseline must pass
            if verdict != "survived":
                print(f"{mod}: the tests fail without any mutation ({verdict}); fix them first")
                return 2
            print(f"{mod}: {len(todo)} mutants, tests {' '.join(tests)} (baseline {secs:.0f} s)", flush=True)
            target = src / "gradguard" / mod
            original = target.read_text()
            try:
                for m in todo:
                    target.write_text(mutated_source(m))
                    verdict, secs = run_tests(src, tests, args.timeout)
                    results.append(dict(module=mod, line=m.line, what=m.what, where=m.where,
                                        verdict=verdict, seconds=round(secs, 1)))
                    if verdict == "survived":
                        print(f"  SURVIVED {m.where}  {m.what}", flush=True)
                    elif args.verbose:
                        print(f"  {verdict:<8} {m.where}  {m.what}  ({secs:.0f} s)", flush=True)
            finally:
                target.write_text(original)

    print("\nmodule        killed  survived  score")
    for mod in modules:
        rs = [r for r in results if r["module"] == mod]
        if rs:
            killed = sum(r["verdict"] != "survived" for r in rs)
            print(f"{mod:<12} {killed:>7} {len(rs) - killed:>9}  {100 * killed / len(rs):5.1f}%")
    if results:
        killed = sum(r["verdict"] != "survived" for r in results)
        print(f"{'all':<12} {killed:>7} {len(results) - killed:>9}  {100 * killed / len(results):5.1f}%")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
