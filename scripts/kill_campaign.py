"""Kill campaign: SIGKILL a guarded training process at random moments of its whole life
(store creation, resume from a checkpoint, training, close()) and check the log dir each time.

Every child runs the same program: ``Guard(log_dir, run_name="k")``; if a checkpoint exists,
load it (which continues run ``k`` in the store); train, confirming each committed step in a
progress file and checkpointing after some confirmed commits; after a random number of steps,
``guard.close()``.  The parent kills it at a random moment of the phase it targets.  Runs are
chained: the next child resumes the killed one's checkpoint in the same log dir.

After every kill:
- every store file passes ``PRAGMA integrity_check``;
- ``RunStore.runs()`` never raises; every run it lists is readable through every query, is
  ``finished`` or ``interrupted`` (never ``running``/``stale``/half-created) and holds
  consecutive steps without duplicates (a run killed after its first flush but before a
  checkpoint is a finished attempt: the next child starts ``k-2``, and later children, asked
  for ``k``, continue that one);
- the run the latest child wrote is ``interrupted`` when it was killed, ``finished`` when it
  closed; it holds every step that child confirmed (and the resumed checkpoint's steps).

    python scripts/kill_campaign.py             # 60 kills
    python scripts/kill_campaign.py 200 --seed 3
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("create", "resume", "train", "close")

def child(log_dir: str, ckpt: str, progress: str, total: int) -> None:
    """The training process (forked: torch is imported once, a kill costs no start-up)."""
    import torch

    import gradguard as gg

    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def mark(s):
        os.write(fd, (s + "\n").encode())  # survives SIGKILL (page cache)

    _body(torch, gg, mark, log_dir, ckpt, total)


def _body(torch, gg, mark, log_dir, ckpt, total):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mark("M create")
    guard = gg.Guard(model, opt, log_dir=log_dir, run_name="k", flush_every=3)
    mark(f"N {guard.recorder.run_name}")
    start = 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt)
        mark("M resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        guard.load_state_dict(state["guard"])
        mark(f"N {guard.recorder.run_name}")
        start = state["guard"]["step"]
        mark(f"R {start}")
    mark("M train")
    for i in range(start, start + total):
        opt.zero_grad()
        loss = model(torch.randn(4, 8)).pow(2).mean()
        loss.backward()
        if i % 7 == 3:
            model[0].weight.grad[0, 0] = math.nan
        guard.step(loss=loss)
        if (i + 1) % 3 == 0:
            guard.flush()
            guard.recorder.flush()
            mark(f"C {i}")
            if (i + 1) % 6 == 0:
                tmp = ckpt + ".tmp"
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                            "guard": guard.state_dict()}, tmp)
                os.replace(tmp, ckpt)
                mark(f"K {i + 1}")
    mark("M close")
    guard.close()
    mark("M closed")


def _lines(progress: Path) -> list[str]:
    try:
        return progress.read_text().splitlines()
    except FileNotFoundError:
        return []


def _check(log_dir: Path, progress: Path, killed: bool) -> str | None:
    """None when the log dir is as promised, else what is wrong."""
    from gradguard.record import RunStore

    for db in log_dir.glob("*/gradguard.sqlite"):
        con = sqlite3.connect(db)
        try:
            if con.execute("PRAGMA integrity_check").fetchall() != [("ok",)]:
                return f"integrity_check failed: {db}"
        finally:
            con.close()
    lines = _lines(progress)
    # this child's marks start after its last "M create"
    last_create = max(i for i, l in enumerate(lines) if l == "M create")
    mine = lines[last_create:]
    confirmed = [int(l.split()[1]) for l in mine if l.startswith("C ")]
    resumed = [int(l.split()[1]) for l in mine if l.startswith("R ")]
    closed = "M closed" in mine
    store = RunStore(log_dir)
    runs = store.runs()
    names = [r["name"] for r in runs]
    mine_name = ([l.split()[1] for l in mine if l.startswith("N ")] or [None])[-1]
    for r in runs:  # every run readable, none left running or half-created
        if r["status"] not in ("finished", "interrupted"):
            return f"run {r['name']} has status {r['status']!r}"
        s = store.steps(r["name"])["step"].tolist()
        if s and s != list(range(s[0], s[0] + len(s))):
            return f"run {r['name']}: steps with gaps or duplicates"
    if mine_name not in names:
        if confirmed:
            return f"run {mine_name} with confirmed steps is not listed ({names})"
        return None
    info = next(r for r in runs if r["name"] == mine_name)
    touched = bool(confirmed or resumed)
    if closed:
        want = {"finished"}
    elif not killed:
        want = {"finished"}
    elif "M close" in mine or not touched:
        # killed inside close() (its final commit may have landed), or before this child wrote
        # anything to the run: the run keeps what the previous child left
        want = {"finished", "interrupted"}
    else:
        want = {"interrupted"}
    if info["status"] not in want:
        return f"status {info['status']!r}, expected {sorted(want)}"
    steps = store.steps(mine_name)["step"].tolist()
    if steps and steps != list(range(steps[0], steps[0] + len(steps))):
        return f"steps not 0..m without gaps/duplicates: {steps[:5]}..{steps[-5:]} ({len(steps)})"
    if info["rows"] != len(steps):
        return f"rows {info['rows']} != {len(steps)} stored steps"
    m = steps[-1] if steps else -1
    need = max(confirmed + [r - 1 for r in resumed] + [-1])
    if m < need:
        return f"committed step lost: store ends at {m}, {need} was confirmed"
    store.layer_norms(mine_name)
    store.layer_summary(mine_name)
    store.events(mine_name)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kills", nargs="?", type=int, default=60, help="number of SIGKILLs (default 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chain", type=int, default=8, help="kills per log dir (default 8)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    importlib.import_module("gradguard")  # imported once, before the forks

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="gg-kill-"))
    kills, trials, closes, failures = 0, 0, 0, []
    by_phase = {p: 0 for p in PHASES}
    t0 = time.monotonic()
    chain_dir = None
    while kills < args.kills:
        if chain_dir is None or trials % args.chain == 0:
            chain_dir = work / f"chain{trials // args.chain}"
            chain_dir.mkdir()
        log_dir, ckpt, progress = chain_dir / "log", chain_dir / "ckpt.pt", chain_dir / "progress"
        trials += 1
        phase = rng.choice(PHASES)
        total = rng.randint(20, 120)
        n0 = len(_lines(progress))
        pid = os.fork()
        if pid == 0:  # the child trains until killed (or closes and exits)
            code = 0
            try:
                child(str(log_dir), str(ckpt), str(progress), total)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)
        target = {"create": "M create", "resume": "M resume", "train": "M train", "close": "M close"}[phase]
        delay = {"create": 0.15, "resume": 0.3, "train": 0.5, "close": 0.02}[phase] * rng.random()

        done = None
        while True:
            got = os.waitpid(pid, os.WNOHANG)
            if got != (0, 0):
                done = got[1]
                break
            seen = _lines(progress)[n0:]
            if target in seen or (phase == "resume" and "M train" in seen):
                break  # (no checkpoint yet: nothing to resume, kill during training instead)
            time.sleep(0.002)
        if done is None:
            time.sleep(delay)
            got = os.waitpid(pid, os.WNOHANG)
            if got == (0, 0):
                os.kill(pid, signal.SIGKILL)
                got = os.waitpid(pid, 0)
            done = got[1]
        killed = os.WIFSIGNALED(done) and os.WTERMSIG(done) == signal.SIGKILL
        if not killed and os.waitstatus_to_exitcode(done) != 0:
            failures.append(f"trial {trials}: child failed (status {done})")
            break
        kills += killed
        closes += not killed
        if killed:
            by_phase[phase] += 1
        problem = _check(log_dir, progress, killed)
        if problem:
            failures.append(f"trial {trials} ({phase}, {'killed' if killed else 'closed'}): {problem}")
    took = time.monotonic() - t0
    print(f"kill campaign: {kills} SIGKILLs in {trials} runs ({closes} closed normally) over "
          f"{(trials - 1) // args.chain + 1} log dirs, {took:.0f} s; kills by targeted phase: "
          + ", ".join(f"{p} {n}" for p, n in by_phase.items()))
    if failures:
        print(f"{len(failures)} FAILED checks:")
        for f in failures:
            print("  " + f)
        print(f"(log dirs kept in {work})")
        return 1
    print("every run readable, status correct, no committed step lost")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
