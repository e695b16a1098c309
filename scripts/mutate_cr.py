"""Mutation testing with cosmic-ray (https://github.com/sixty-north/cosmic-ray), sampled per module.

For each module of ``scripts/mutate.py``'s ``TARGETS`` table (the modules that hold gradguard's
promises, each with the test files that claim it), this makes cosmic-ray's full set of mutants,
drops the ones that cannot change behaviour (mutants inside annotations -- never evaluated under
``from __future__ import annotations`` -- and inside docstrings), draws a seeded sample, and runs
cosmic-ray on it with the module's own test files.  Each module is mutated inside a private copy
of ``src/`` (cosmic-ray edits the file it mutates in place): the working tree is never touched.

    python scripts/mutate_cr.py                          # every module, 25 mutants each (make mutate: 4)
    python scripts/mutate_cr.py --module detect/spike --sample 0   # every mutant of one module
    python scripts/mutate_cr.py --shard 2/4              # the second of four interleaved slices
    python scripts/mutate_cr.py --list                   # the sampled mutants, nothing run

Needs ``pip install cosmic-ray`` (a dev dependency); ``scripts/mutate.py`` is the fallback
runner without it.  Prints every surviving mutant (``file:line  operator``, and the diff with
``-v``) and the score per module.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutate import PKG, ROOT, TARGETS  # noqa: E402  (one table of modules and their tests)


def _dead_spans(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions of annotations and docstrings: mutants there change nothing."""
    tree = ast.parse(path.read_text())
    spans = []

    def add(n):
        spans.append(((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for a in args.args + args.kwonlyargs + args.posonlyargs + [args.vararg, args.kwarg]:
                if a is not None and a.annotation is not None:
                    add(a.annotation)
            if node.returns is not None:
                add(node.returns)
        if isinstance(node, ast.AnnAssign):
            add(node.annotation)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            b = node.body
            if b and isinstance(b[0], ast.Expr) and isinstance(b[0].value, ast.Constant) \
                    and isinstance(b[0].value.value, str):
                add(b[0])
    return spans


def _inside(pos, spans) -> bool:
    return any(a <= tuple(pos) < b for a, b in spans)


def _cr(*args, env=None, timeout=None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("cosmic-ray")
    return subprocess.run([str(exe), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_module(mod: str, args, tmp: Path, k: int, n: int) -> list[dict]:
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    src = tmp / "src"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    target = src / "gradguard" / mod
    tests = [t for t in TARGETS[mod] if (ROOT / t).exists()]
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONDONTWRITEBYTECODE="1")
    pytest_cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    if not args.list:  # the unmutated baseline must pass
        t0 = time.perf_counter()
        rc = subprocess.run(pytest_cmd, cwd=ROOT, env=env, capture_output=True).returncode
        base = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"{mod}: the tests fail without any mutation; fix them first")
    else:
        base = 0.0
    cfg, db = tmp / f"{mod.replace('/', '_')}.toml", tmp / f"{mod.replace('/', '_')}.sqlite"
    timeout = max(args.timeout, 3 * base)
    cfg.write_text(f'[cosmic-ray]\nmodule-path = "{target}"\ntimeout = {timeout:.0f}\nexcluded-modules = []\n'
                   f'test-command = "{" ".join(pytest_cmd)}"\n\n[cosmic-ray.distributor]\nname = "local"\n')
    if db.exists():
        db.unlink()
    out = _cr("init", str(cfg), str(db), env=env)
    if out.returncode:
        raise SystemExit(f"cosmic-ray init failed for {mod}: {out.stderr[-2000:]}")
    dead = _dead_spans(target)
    with use_db(str(db)) as wdb:
        items = sorted(wdb.work_items, key=lambda w: (tuple(w.mutations[0].start_pos), w.mutations[0].operator_name,
                                                      w.mutations[0].occurrence))
        live = [w for w in items if not _inside(w.mutations[0].start_pos, dead)]
        pick = live
        if args.sample and len(live) > args.sample:
            pick = sorted(random.Random(f"{args.seed}:{mod}").sample(live, args.sample),
                          key=lambda w: tuple(w.mutations[0].start_pos))
        pick = pick[k - 1::n]
        keep = {w.job_id for w in pick}
        wdb.set_multiple_results([w.job_id for w in items if w.job_id not in keep],
                                 WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
    print(f"{mod}: {len(pick)} of {len(live)} mutants ({len(items) - len(live)} in annotations/docstrings "
          f"left out), tests {' '.join(tests)} (baseline {base:.0f} s)", flush=True)
    if args.list:
        for w in pick:
            m = w.mutations[0]
            print(f"  {PKG}/{mod}:{m.start_pos[0]}  {m.operator_name} #{m.occurrence}")
        return []
    t0 = time.perf_counter()
    out = _cr("exec", str(cfg), str(db), env=env)
    if out.returncode:
        raise SystemExit(f"cosmic-ray exec failed for {mod}: {out.stderr[-2000:]}")
    results = []
    with use_db(str(db)) as wdb:
        by_id = {w.job_id: w for w in wdb.work_items}
        for job_id, r in wdb.results:
            if r.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            m = by_id[job_id].mutations[0]
            verdict = "survived" if r.test_outcome == "survived" else (
                "incompetent" if r.test_outcome == "incompetent" else "killed")
            diff = [ln for ln in (r.diff or "").splitlines() if ln[:1] in "+-" and ln[:3] not in ("---", "+++")]
            results.append(dict(module=mod, line=m.start_pos[0], what=f"{m.operator_name} #{m.occurrence}",
                                where=f"{PKG}/{mod}:{m.start_pos[0]}", verdict=verdict, diff=diff))
    results.sort(key=lambda r: r["line"])
    for r in results:
        if r["verdict"] == "survived" or args.verbose:
            print(f"  {r['verdict'].upper() if r['verdict'] == 'survived' else r['verdict']:<8} "
                  f"{r['where']}  {r['what']}", flush=True)
            if args.verbose or r["verdict"] == "survived":
                for ln in r["diff"]:
                    print(f"      {ln.strip()}")
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", action="append", choices=sorted(m[:-3] for m in TARGETS),
                    help="only this module (repeatable; default: all)")
    ap.add_argument("--sample", type=int, default=25, help="at most N random mutants per module (0: all)")
    ap.add_argument("--seed", type=int, default=1, help="seed of --sample (default 1)")
    ap.add_argument("--shard", default="1/1", help="K/N: run the K-th of N interleaved slices of the sample")
    ap.add_argument("--timeout", type=float, default=120, help="minimum seconds per mutant (default 120; "
                    "at least 3x the module's unmutated run)")
    ap.add_argument("--list", action="store_true", help="list the sampled mutants and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line and the diff for every mutant")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    try:
        import cosmic_ray  # noqa: F401
    except ImportError:
        ap.error("cosmic-ray is not installed (pip install cosmic-ray); scripts/mutate.py runs without it")
    k, n = (int(x) for x in args.shard.split("/"))
    if not 1 <= k <= n:
        ap.error("--shard must be K/N with 1 <= K <= N")
    modules = [m + ".py" for m in args.module] if args.module else list(TARGETS)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gg-cosmic-") as tmp:
        for mod in modules:
            results += run_module(mod, args, Path(tmp), k, n)
    if args.list:
        return 0
    print("\nmodule                    killed  survived  incompetent  score")
    for mod in modules + [None]:
        rs = [r for r in results if mod is None or r["module"] == mod]
        real = [r for r in rs if r["verdict"] != "incompetent"]
        if real:
            killed = sum(r["verdict"] == "killed" for r in real)
            print(f"{mod or 'all':<24} {killed:>7} {len(real) - killed:>9} {len(rs) - len(real):>12}  "
                  f"{100 * killed / len(real):5.1f}%")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
