"""``gradguard demo``: train one task twice from the same seed, unguarded and guarded.

The default is the seeds' experiment (seed 001) on the 8x8 digits that ship
with this package: a tanh RNN reads each 8x8 digit row by row and is trained with
plain SGD at a high learning rate (1.0).  Unguarded, the recurrent gradients
blow the weights up and the loss climbs to ~20-40 (chance accuracy); with
``gg.Guard(clip=gg.GlobalNorm(1.0))`` the same run from the same
initialisation learns (~90-96% test accuracy, 8 of 8 seeds checked).

Both runs go through a ``gg.Guard`` writing to the run store: the unguarded
one with ``clip=None, on_nonfinite="warn"``, so it is recorded, not rescued.

Example:
    $ gradguard demo                       # digits, 1000 steps, ~10 s on 2 cores
    $ gradguard demo --task fashion --data ~/data/fashion-mnist
"""
from __future__ import annotations

import argparse
import math
import shlex
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip import GlobalNorm
from ..events import SEVERITIES, Event
from ..guard import Guard
from .tasks.digits import SequenceClassifier, load_digits, load_fashion_mnist
from .tasks.pascanu import get_task

__all__ = ["add_arguments", "run", "run_demo", "DemoSetup", "make_setup", "TASK_CHOICES"]

TASK_CHOICES = ("digits", "fashion", "addition", "multiplication", "temporal_order")
FLUSH_EVERY = 50
DIVERGED_STOP = 25  # consecutive non-finite losses after which a run is called dead and stopped


@dataclass
class DemoSetup:
    """One demo task: how to build the model, draw a batch, and score the model."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]
    evaluate: Callable[[nn.Module], tuple[float, float]]  # (loss, accuracy)
    lr: float
    steps: int


def _classify_eval(x: Tensor, y: Tensor):
    def evaluate(model: nn.Module) -> tuple[float, float]:
        with torch.no_grad():
            out = model(x)
            loss = F.cross_entropy(out, y)
            acc = (out.argmax(-1) == y).float().mean()
        return float(loss), float(acc)  # host sync: once, after training
    return evaluate


def _image_setup(name: str, xtr: Tensor, ytr: Tensor, xte: Tensor, yte: Tensor, hidden: int,
                 lr: float, steps: int, description: str) -> DemoSetup:
    classes = int(ytr.max()) + 1  # host sync: setup time
    rows = xtr.shape[2]

    def batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(ytr), (32,), generator=gen)
        return xtr[idx], ytr[idx]

    return DemoSetup(name, description, lambda: SequenceClassifier(rows, hidden, classes, "rnn"),
                     batch, F.cross_entropy, _classify_eval(xte, yte), lr, steps)


def _pascanu_setup(name: str, length: int) -> DemoSetup:
    task = get_task(name)
    xte, yte = task.sample(2000, length, torch.Generator().manual_seed(10_000))

    def evaluate(model: nn.Module) -> tuple[float, float]:
        with torch.no_grad():
            out = model(xte)
            loss, err = task.loss(out, yte), task.errors(out, yte).float().mean()
        return float(loss), 1.0 - float(err)  # host sync: once, after training

    return DemoSetup(
        name, f"{name} problem (Pascanu et al. 2013), length {length}, tanh RNN of 50 units, "
              "SGD lr 0.1, batch 20; accuracy = 1 - error rate on 2,000 fresh sequences",
        lambda: SequenceClassifier(task.input_size, 50, task.output_size, "rnn"),
        lambda gen: task.sample(20, length, gen), task.loss, evaluate, 0.1, 2000)


def make_setup(task: str, data: str | None = None, length: int = 50) -> DemoSetup:
    """The ``DemoSetup`` for ``task`` (one of ``TASK_CHOICES``).

    Args:
        task: ``"digits"`` (default demo), ``"fashion"`` (needs ``data``), or a Pascanu task.
        data: directory of Fashion-MNIST IDX files (implies ``"fashion"`` for image tasks).
        length: sequence length of the Pascanu tasks.
    """
    if task not in TASK_CHOICES:
        raise ValueError(f"task must be one of {TASK_CHOICES}, got {task!r}")
    if task in ("digits", "fashion") and data is not None:
        xtr, ytr = load_fashion_mnist(data, "train")
        xte, yte = load_fashion_mnist(data, "test")
        return _image_setup("fashion", xtr, ytr, xte[:2000], yte[:2000], 64, 1.0, 1000,
                            "Fashion-MNIST read row by row (28 steps of 28 pixels) by a tanh RNN "
                            "of 64 units, plain SGD lr 1.0, batch 32 (seed 001's experiment)")
    if task == "fashion":
        raise ValueError("--task fashion needs --data DIR with the Fashion-MNIST IDX files")
    if task == "digits":
        xtr, ytr = load_digits("train")
        xte, yte = load_digits("test")
        return _image_setup("digits", xtr, ytr, xte, yte, 64, 1.0, 1000,
                            "8x8 digits read row by row (8 steps of 8 pixels) by a tanh RNN of 64 "
                            "units, plain SGD lr 1.0, batch 32 (seed 001's experiment on "
                            "the UCI digits as scikit-learn bundles them)")
    return _pascanu_setup(task, length)


@dataclass
class RunResult:
    name: str
    run_name: str
    steps: int = 0
    loss: float = math.nan
    accuracy: float = math.nan
    first_nonfinite: int | None = None
    max_train_loss: float = 0.0
    clipped: int = 0
    skipped: int = 0
    stopped_early: bool = False
    events: list[Event] = field(default_factory=list)
    seconds: float = 0.0


def _open_guard(model, opt, clip, on_nonfinite, log_dir, run_name, notes: list[str]) -> Guard:
    # Detectors: the Guard's defaults.  Rows are read back and written every
    # FLUSH_EVERY steps: one store transaction per step would dominate this tiny model.
    kw = {"flush_every": FLUSH_EVERY}
    if log_dir is not None:
        try:
            return Guard(model, opt, clip=clip, on_nonfinite=on_nonfinite, log_dir=log_dir,
                         run_name=run_name, **kw)
        except ImportError as e:  # the run store is an optional piece of this build
            if not notes:
                notes.append(f"run store unavailable ({e}); runs were not written")
    return Guard(model, opt, clip=clip, on_nonfinite=on_nonfinite, run_name=run_name, **kw)


def train_once(setup: DemoSetup, *, guarded: bool, steps: int, clip: float, seed: int,
               log_dir: str | None, run_name: str, progress=None, notes: list[str] | None = None
               ) -> RunResult:
    """Train ``setup`` once; identical model init and batches for a given seed."""
    notes = notes if notes is not None else []
    torch.manual_seed(seed)
    model = setup.build()
    opt = torch.optim.SGD(model.parameters(), lr=setup.lr)
    policy = GlobalNorm(clip) if guarded else None
    guard = _open_guard(model, opt, policy, "skip" if guarded else "warn", log_dir, run_name, notes)
    gen = torch.Generator().manual_seed(seed)
    res = RunResult("guarded" if guarded else "unguarded", run_name)
    task_id = None
    if progress is not None:
        task_id = progress.add_task(f"{res.name:>9}", total=steps, loss="")
    bad_streak = 0
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # on_nonfinite="warn": shown as events instead
        for step in range(steps):
            x, y = setup.batch(gen)
            opt.zero_grad(set_to_none=True)
            loss = setup.loss(model(x), y)
            loss.backward()
            report = guard.step(loss=loss)
            lv = float(loss.detach())  # host sync: the demo prints the loss every step
            res.steps = step + 1
            if math.isfinite(lv):
                res.max_train_loss = max(res.max_train_loss, lv)
                bad_streak = 0
            else:
                bad_streak += 1
                if res.first_nonfinite is None:
                    res.first_nonfinite = step
            if guarded and report.clip_coef < 1.0:  # host sync: demo bookkeeping
                res.clipped += 1
            if task_id is not None:
                progress.update(task_id, advance=1, loss=f"loss {lv:9.4g}")
            if bad_streak >= DIVERGED_STOP:
                res.stopped_early = True
                break
    guard.close()
    res.seconds = time.perf_counter() - t0
    if task_id is not None:
        if res.stopped_early:
            progress.update(task_id, loss="diverged: stopped")
        progress.end(task_id)
    res.loss, res.accuracy = setup.evaluate(model)
    res.skipped = guard.skipped_steps
    res.events = list(guard.events)
    return res


def _sev_rank(e: Event) -> int:
    return SEVERITIES.index(e.severity)


def top_events(events: list[Event], n: int = 5) -> list[Event]:
    """The ``n`` most severe events, one per (kind, severity), earliest first within a rank."""
    seen, out = set(), []
    for e in sorted(events, key=lambda e: (-_sev_rank(e), e.step)):
        if (e.kind, e.severity) in seen:
            continue
        seen.add((e.kind, e.severity))
        out.append(e)
    return out[:n]


def first_alarm(events: list[Event]) -> Event | None:
    """The earliest warning or critical event (what a user should read first), or None."""
    alarms = [e for e in events if e.severity in ("warning", "critical")]
    return min(alarms, key=lambda e: (e.step, -_sev_rank(e))) if alarms else None


def _fmt(x: float, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "NaN"
    if pct:
        return f"{100 * x:.1f}%"
    return f"{x:.4g}"


class _Progress:
    """One status line per run: rewritten in place on a terminal, printed once when the run ends
    otherwise (a log file gets two lines, not a thousand)."""

    def __init__(self, out: TextIO):
        self.out = out
        self.live = bool(getattr(out, "isatty", lambda: False)())
        self.tasks: list[dict] = []
        self._last = 0.0

    def add_task(self, description: str, total: int, loss: str = "") -> int:
        self.tasks.append({"description": description, "total": total, "done": 0, "loss": loss,
                           "t0": time.perf_counter()})
        return len(self.tasks) - 1

    def update(self, task_id: int, advance: int = 0, loss: str | None = None) -> None:
        t = self.tasks[task_id]
        t["done"] += advance
        if loss is not None:
            t["loss"] = loss
        now = time.perf_counter()
        if self.live and now - self._last >= 0.1:  # redrawing every step would cost more than the step
            self._last = now
            self.out.write("\r" + self._line(t))
            self.out.flush()

    def end(self, task_id: int) -> None:
        self.out.write(("\r" if self.live else "") + self._line(self.tasks[task_id]) + "\n")
        self.out.flush()

    @staticmethod
    def _line(t: dict) -> str:
        width = 30
        filled = int(width * t["done"] / max(t["total"], 1))
        return (f"{t['description']} [{'#' * filled}{'.' * (width - filled)}] {t['done']}/{t['total']}  "
                f"{t['loss']}  {time.perf_counter() - t['t0']:.1f} s")


def _table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    rule = "-" * len(line(header))
    return "\n".join([title, rule, line(header), rule, *map(line, rows), rule])


def run_demo(task: str = "digits", steps: int | None = None, clip: float = 1.0, seed: int = 0,
             data: str | None = None, log_dir: str | None = "gradguard-runs", out: TextIO | None = None,
             show_progress: bool = True, console=None) -> tuple[RunResult, RunResult]:
    """Run the demo and print its report; returns (unguarded, guarded) results.

    Args:
        task: one of ``TASK_CHOICES``.
        steps: training steps per run (None: the task's default).
        clip: ``GlobalNorm`` threshold of the guarded run (> 0).
        seed: seeds the model init and the batch order of both runs.
        data: Fashion-MNIST IDX directory (image tasks).
        log_dir: run-store directory (None: nothing written).
        out: text stream the report is written to (None: stdout).
        show_progress: a status line per run while it trains.
        console: deprecated (the demo no longer uses rich): an object with a
            ``.file`` (a ``rich.console.Console``) or a text stream, used as ``out``.
    Returns:
        ``(unguarded, guarded)`` ``RunResult`` objects.

    Example:
        >>> unguarded, guarded = run_demo(steps=300, log_dir=None)
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (0 < clip < math.inf):
        raise ValueError(f"clip must be a positive finite number, got {clip!r}")
    if out is None and console is not None:
        out = getattr(console, "file", console)
    out = out if out is not None else sys.stdout

    def say(text: str = "") -> None:
        out.write(text + "\n")

    setup = make_setup(task, data)
    steps = steps or setup.steps
    stamp = time.strftime("%Y%m%d-%H%M%S")
    say(f"gradguard demo: {setup.description}.")
    say(f"Same seed ({seed}), same initial weights, same batches; {steps} steps each. "
        f"Guarded = gg.Guard(clip=gg.GlobalNorm({clip:g}), on_nonfinite='skip').\n")
    notes: list[str] = []
    progress = _Progress(out) if show_progress else None
    results = []
    # These models are tiny: a second intra-op thread only adds contention (and
    # thread scheduling would be one more source of run-to-run variation).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for guarded in (False, True):
            name = "guarded" if guarded else "unguarded"
            results.append(train_once(setup, guarded=guarded, steps=steps, clip=clip, seed=seed,
                                      log_dir=log_dir,
                                      run_name=f"demo-{setup.name}-s{seed}-{name}-{stamp}",
                                      progress=progress, notes=notes))
    finally:
        torch.set_num_threads(threads)
    ung, gua = results

    # The summary leads with what explains the difference: the unguarded run's first alarm.
    alarm = first_alarm(ung.events)
    if alarm is not None:
        layers = f" in {', '.join(alarm.layers[:2])}" if alarm.layers else ""
        seen = alarm.seen_at  # raised there, dated where it began
        when = f"step {alarm.step}" if seen == alarm.step else f"step {seen}, since step {alarm.step}"
        say(f"\nWhat happened: gradguard flagged the unguarded run at {when} "
            f"({alarm.severity} {alarm.kind}{layers}): {alarm.message}")
        if alarm.advice:
            say(f"  -> {alarm.advice[0]}")
        say(f"The guarded run clipped {100 * gua.clipped / max(gua.steps, 1):.0f}% of its steps and "
            f"reached {_fmt(gua.accuracy, True)} test accuracy against {_fmt(ung.accuracy, True)}.")

    spikes = [sum("spike" in e.kind for e in r.events) for r in results]
    rows = [
        ("steps run", *(f"{r.steps}" + (" (stopped: diverged)" if r.stopped_early else "") for r in results)),
        ("test loss", _fmt(ung.loss), _fmt(gua.loss)),
        ("test accuracy", _fmt(ung.accuracy, True), _fmt(gua.accuracy, True)),
        ("max training loss", _fmt(ung.max_train_loss), _fmt(gua.max_train_loss)),
        ("first non-finite step", *("-" if r.first_nonfinite is None else str(r.first_nonfinite)
                                    for r in results)),
        ("spike events", str(spikes[0]), str(spikes[1])),
        ("skipped steps", str(ung.skipped), str(gua.skipped)),
        ("clipping rate", "off", f"{100 * gua.clipped / max(gua.steps, 1):.1f}%"),
        ("events", str(len(ung.events)), str(len(gua.events))),
        ("train time", f"{ung.seconds:.1f} s", f"{gua.seconds:.1f} s"),
    ]
    say()
    say(_table(f"{setup.name}: unguarded vs guarded (seed {seed})", ("", "unguarded", "guarded"), rows))

    for r in results:
        shown = top_events(r.events)
        if not shown:
            continue
        say(f"\nTop events, {r.name} run ({len(r.events)} in all):")
        for e in shown:
            layers = f" [{', '.join(e.layers[:3])}]" if e.layers else ""
            say(f"  step {e.step:>5}  {e.severity:<8} {e.kind}{layers}: {e.message}")
            for a in e.advice[:2]:
                say(f"      -> {a}")

    learned = gua.accuracy - ung.accuracy
    say(f"\nVerdict: the guarded run ends {100 * learned:+.1f} accuracy points from the unguarded one"
        + (" (the unguarded run diverged)." if ung.first_nonfinite is not None or ung.stopped_early else "."))
    for n in notes:
        say(f"note: {n}")
    if log_dir is not None and not notes:
        say("\nBoth runs are in the run store. Open the dashboard with:\n")
        say(f"    {_cli()} dashboard {shlex.quote(str(log_dir))}")  # one line: it must paste as one command
    out.flush()
    return ung, gua


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=TASK_CHOICES, default="digits",
                        help="what to train (default: digits, the seeds' RNN-on-image-rows experiment)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: task's)")
    parser.add_argument("--clip", type=float, default=1.0, help="GlobalNorm threshold of the guarded run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init and the batch order")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="directory with Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], ...)")
    parser.add_argument("--log-dir", default="gradguard-runs", metavar="DIR",
                        help="run store directory (default ./gradguard-runs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line while training")


def _cli() -> str:
    """How to call the gradguard command from here: bare if it is on PATH (an activated venv),
    else by the path of the venv's script (``make demo`` does not activate the venv)."""
    script = Path(sys.executable).with_name("gradguard")
    on_path = shutil.which("gradguard")
    if on_path and Path(on_path).resolve() == script.resolve():
        return "gradguard"
    if script.exists():
        try:
            return shlex.quote(str(script.relative_to(Path.cwd())))
        except ValueError:
            return shlex.quote(str(script))
    return "gradguard"


def run(args: argparse.Namespace) -> int:
    try:
        run_demo(task=args.task, steps=args.steps, clip=args.clip, seed=args.seed, data=args.data,
                 log_dir=args.log_dir, show_progress=not args.no_progress)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"gradguard demo: error: {e}")
        return 2
    return 0
