"""Autopilot: the built-in remedy policy behind ``Guard(..., remedies="auto")``.

For people who do not want to design a remedies table.  What it does:

- a step with NaN/Inf gradients or loss never reaches the optimizer (the core's
  ``on_nonfinite="skip"``; the autopilot only labels it);
- a fault that damaged the model (a loss spike or a gradient spike that the loss
  does not shrug off, a diverging loss) is undone: the model and the optimizer
  state are restored from the last clean snapshot; when it happens again soon after, the
  rollback goes further back and the next ``skip_batches`` batches are withheld (PaLM's
  recipe, Chowdhery et al. 2022, done by hand there: the data around the spike was bad).
  A first rollback withholds nothing: an LR burst or a corrupted weight has no bad data
  ahead, and on short runs each withheld batch is a lost update;
- when rollbacks repeat within ``recover_every`` steps the learning rate is
  backed off (``LRBackoff``), and restored step by step when the run is quiet;
- when ``max_rollbacks`` rollbacks happen within ``budget_steps`` steps it raises
  ``GuardAlarm``: a run that keeps diverging never loops silently.

Single-batch events are common in healthy runs (a heavy-tailed batch gives a
300x loss in runs that converge), so an ``info`` event is only a *suspect*: the
autopilot acts when the losses after it stay above the loss median before it by more
than ``ratio`` and than ``z`` x its spread over
sqrt(``confirm``) (the damage persists), and leaves the run alone otherwise: it acts as soon
as three or more losses after the suspect are all above that level, or when the median of
4 x ``confirm`` losses is above a level half as far (a mild LR burst leaves a rise of a few
percent that lasts).  The
rollback's snapshot comes from before the earliest loss above that level among the
``confirm`` steps before the trigger: a fault shows late, and a snapshot that already holds
it would be restored.  A ``diverging``,
``weight_growth`` or ``running_stats`` warning (a batch x100 or NaN into a BatchNorm: the
loss never shows it, the running statistics keep it), a 1e4x spike, or a parameter norm ``blowup`` x the
last snapshot's (read from the rows: the detector reports once per cooldown, and
a fault may come back after a rollback) is acted on at once.
Each decision is an event of kind ``"rescue"`` (step = the flush that decided),
and what was done is in its ``data["actions"]``; the triggering event, when it is
in the same flush, gets a pointer to it too.

Memory: ``keep`` snapshots (default 2), each a copy of the model's
``state_dict`` and the optimizer state in host (CPU) memory: for Adam about
3x the parameter bytes per snapshot.  Two are kept because the newest one may
already hold the update that caused a fault detected one step later; the
rollback takes the newest snapshot from before the fault.  A snapshot is taken
at a quiet flush (no event, no suspect, nothing held) at most every ``every``
steps; on CPU the guard flushes every ``Autopilot.CPU_FLUSH_EVERY`` (8) steps with the
autopilot, so a rollback discards few updates.  The learning rate and the other ``param_groups`` hyperparameters are
*not* rolled back (a scheduler owns them); the model, its buffers (BatchNorm
statistics) and the optimizer's state (moments, step counts) are.
"""
from __future__ import annotations

import math
import statistics
from collections import deque

import torch

from .._validate import check_int, check_positive
from ..events import Event
from ..backend import DEVICE
from ..layout import COL
from ..stats import param_norm
from .actions import Action, GuardAlarm, LRBackoff

__all__ = ["Autopilot"]

SOFT = ("loss_spike", "spike", "exploding", "weight_growth")  # need the loss to confirm them


def _hard(ev) -> bool:
    """Damage without waiting for the loss: the detector already waited (diverging), the
    weights themselves blew up (10x RMS growth, or a huge RMS), a 1e4x jump, or a batch
    poisoned a normalisation layer's running statistics (the loss never shows that: training
    mode normalises by the batch's own; the snapshot holds the buffers as they were)."""
    return (ev.kind in ("diverging", "weight_growth", "running_stats") and ev.severity != "info") or \
        (ev.kind in ("spike", "loss_spike") and ev.severity == "critical")


class Autopilot(Action):
    """Skip, roll back, back off the learning rate, escalate: ``remedies="auto"`` with tunables.

    Args:
        every: the fewest steps between snapshots (default 8: one at each quiet flush, every
            8 steps on CPU, 32 on an accelerator, where the copy is asynchronous).
        skip_batches: batches withheld after a rollback that repeats within ``recover_every``
            steps (the cause persists: bad data ahead); a first rollback withholds none (default 5).
        keep: snapshots kept in host memory, 1 or 2 (default 2).
        confirm: sets the damage threshold, the spread over sqrt(``confirm``) (default 5): 3 or
            more losses after a suspect all above it confirm it, as does the median of
            ``4 x confirm`` losses above the threshold for that many; a suspect whose first
            ``confirm`` losses have a median at or below the level before it is dropped.
        ratio: the smallest rise of the loss median after the event over the median before
            it that counts as damage (default 1.05).
        z: the rise must also exceed ``z`` x the spread of the log losses before the event,
            over ``sqrt(confirm)`` (default 5): noisy losses need a larger rise.  (With 4, a
            healthy 800-step GRU run was rolled back: its heavy-tailed losses put 3 of 5 high
            above the threshold of a median of 5, a test since dropped.)
        floor: and it must be at least this fraction of the run's first losses (the median
            of its first 10; default 0.01): a run that went from 2.3 to 0.004 and wanders
            to 0.006 has lost nothing that matters, however large the ratio.
        max_rollbacks: rollbacks within ``budget_steps`` steps before ``GuardAlarm`` (default 4).
        budget_steps: the window of that budget (default 1000).
        lr_factor: learning-rate back-off factor when rollbacks repeat (default 0.5).
        recover_every: quiet steps before each learning-rate restore, and the window in
            which two rollbacks count as repeated (default 200).
        blowup: a parameter norm (the guard's ``param_norm`` column) this many times the last
            snapshot's is a weight blow-up, acted on at once (default 10).
    """

    # The guard's flush interval on CPU with the autopilot (16 otherwise): a rollback returns to a
    # snapshot taken at a flush and discards the updates since.  Measured on the rescue benchmark
    # (300-step runs), 16-step flushes cost a GRU run about 3.5% of its final loss after a rollback,
    # 4-step ones ~1%; 8 keeps the autopilot's cost on healthy steps within the default guard's
    # run-to-run spread, where 4 added 12-15% (docs/benchmarks.md, "Rescue on faults").
    CPU_FLUSH_EVERY = 8
    # A small rise is watched for up to this many x ``confirm`` losses (see ``_confirm``).
    EXTEND = 4

    def __init__(self, every: int = 8, skip_batches: int = 5, keep: int = 2, confirm: int = 5,
                 ratio: float = 1.05, z: float = 5.0, max_rollbacks: int = 4, budget_steps: int = 1000,
                 lr_factor: float = 0.5, recover_every: int = 200, blowup: float = 10.0,
                 floor: float = 0.01):
        self.every = check_int("every", every, 1)
        self.skip_batches = check_int("skip_batches", skip_batches, 0)
        self.keep = check_int("keep", keep, 1)
        if self.keep > 2:
            raise ValueError(f"keep must be 1 or 2, got {keep!r}")
        self.confirm = check_int("confirm", confirm, 1)
        self.ratio = check_positive("ratio", ratio)
        self.z = check_positive("z", z)
        self.floor = check_positive("floor", floor, allow_zero=True)
        self.blowup = check_positive("blowup", blowup)
        self.max_rollbacks = check_int("max_rollbacks", max_rollbacks, 1)
        self.budget_steps = check_int("budget_steps", budget_steps, 1)
        self.lr = LRBackoff(factor=lr_factor, patience=2, recover_every=recover_every)
        # (steps taken when captured, snapshot, its parameter norm), oldest first
        self._snaps: list[list] = []
        self._hist: deque = deque(maxlen=50)  # (step, loss): finite losses of applied steps
        self._first: list[float] = []  # the run's first 10 such losses: its scale
        self._suspect: dict | None = None  # {"step", "kind", "ref", "after": [losses]}
        self._rollback_steps: list[int] = []
        self._target = -1  # the snapshot (its step) of the last rollback
        self.rollbacks = 0
        self.interventions = 0  # rollbacks + learning-rate changes (0 on a healthy run)

    def bind(self, ctx) -> None:
        super().bind(ctx)
        self.lr.bind(ctx)

    # ------------------------------------------------------------------ flush
    def on_flush(self, ctx, steps, rows, events):
        before = self.lr.scale
        self.lr.on_flush(ctx, steps, rows, events)  # restore the learning rate when quiet
        if self.lr.scale != before:
            self.interventions += 1
        loss = rows[:, COL["loss"]]
        ok = (rows[:, COL["loss_bad"]] <= 0) & (rows[:, COL["skipped"]] <= 0)
        trigger = self._weights_blew_up(steps, rows)
        for ev in events:  # the first event that asks for a look, in step order
            if _hard(ev):
                # the loss must stay up for a few steps before "diverging" fires: the fault is older
                # than the step that raised it (seen_at; the event is dated where the loss rose)
                lag = 4 if ev.kind == "diverging" else 0
                at = ev.seen_at if ev.kind == "diverging" else ev.step
                trigger = trigger or {"step": at - lag, "kind": ev.kind, "why": ev.message, "event": ev}
            elif ev.kind in SOFT and self._suspect is None and trigger is None:
                ref = self._baseline(ev.step, steps, loss, ok)
                if ref is not None:
                    self._suspect = {"step": ev.step, "kind": ev.kind, "ref": ref[0], "spread": ref[1],
                                     "after": [], "event": ev}
        if trigger is None and self._suspect is None:
            self._suspect = self._loss_suspect(steps, loss, ok)
        for i, s in enumerate(steps):
            if ok[i] and loss[i] == loss[i]:  # finite (inf is excluded by loss_bad)
                self._hist.append((s, float(loss[i])))
                if len(self._first) < 10:
                    self._first.append(float(loss[i]))
        refuted = None
        if trigger is None and self._suspect is not None:
            trigger, refuted = self._confirm(steps, loss, ok)
        if trigger is None and refuted is not None:
            # a refuted suspect's window may have hidden a later rise in this flush (short
            # flushes: a noisy step just before the fault): look again after it
            self._suspect = self._loss_suspect(steps, loss, ok, after=refuted)
            if self._suspect is not None:
                trigger, _ = self._confirm(steps, loss, ok)
        if trigger is not None:
            self._suspect = None
            onset = self._onset(trigger["step"])
            if onset != trigger["step"]:
                trigger["why"] += f" (the loss was already above its damage threshold at step {onset})"
                trigger["step"] = onset
            ev = Event(steps[-1], "rescue", "warning", list(trigger["event"].layers),
                       f"autopilot: {trigger['kind']} at step {trigger['step']}: {trigger['why']}.",
                       data={"trigger_step": trigger["step"], "trigger_kind": trigger["kind"],
                             **({"param_norm": trigger["event"].data["param_norm"]}
                                if trigger["kind"] == "weight_growth" and "param_norm" in trigger["event"].data
                                else {})})
            for e in events:  # the events that asked for it point at the rescue event
                if e is trigger["event"] or _hard(e):
                    e.data.setdefault("actions", []).append(f"autopilot: handled by the rescue event at step {ev.step}")
            events.append(ev)  # dispatched to __call__ right after this flush's other events
            return
        noisy = any(e.kind in SOFT + ("diverging", "nonfinite") or e.severity != "info" for e in events)
        quiet = not noisy and self._suspect is None and ctx.held == 0 and not (rows[:, COL["skipped"]] > 0).any()
        if quiet and (not self._snaps or ctx.steps - self._snaps[-1][0] >= self.every):
            # the oldest snapshot's buffers are reused once ``keep`` are held; on a GPU the copy
            # runs asynchronously (restore waits for it) and the norm stays on the device
            old = self._snaps.pop(0)[1] if len(self._snaps) >= self.keep else None
            norm = param_norm(ctx.params, DEVICE)
            self._snaps.append([ctx.steps, ctx.capture(wait=False, reuse=old), norm])

    def _thr(self, sus, n: int) -> float:
        """The loss level the median of ``n`` losses after a suspect must exceed to count as damage:
        ``ratio`` x the median before it, ``z`` x the spread of one log loss over sqrt(n) above
        it, and ``floor`` x the run's first losses above it."""
        scale = statistics.median(self._first) if self._first else 0.0
        return max(sus["ref"] * math.exp(max(math.log(self.ratio), self.z * sus["spread"] / math.sqrt(n))),
                   sus["ref"] + self.floor * scale)

    def _confirm(self, steps, loss, ok):
        """Feed the suspect the losses after it; (trigger or None, the refuted suspect's step or None).

        Two tests, decided the same however the losses arrive in flushes: damage is confirmed
        as soon as 3 or more losses after the suspect are *all* above the threshold of
        ``confirm`` losses (a large rise: each step waited for is an update a rollback
        discards), or when the median of ``EXTEND`` x ``confirm`` losses is above a threshold
        sqrt(EXTEND) times closer (a mild LR burst leaves a 5-10% rise that lasts, which 5
        noisy losses cannot tell from noise, and a transient of a few steps barely moves the
        median of 20).  A suspect whose first ``confirm`` losses have a median at or below the
        level before it is dropped early.  (A median-of-``confirm`` test rolled back a healthy
        800-step GRU run: heavy-tailed losses put 3 of 5 high by chance.)"""
        sus = self._suspect
        cap = self.EXTEND * self.confirm
        for i, s in enumerate(steps):
            if ok[i] and loss[i] == loss[i] and s > sus["step"] and len(sus["after"]) < cap:
                sus["after"].append(float(loss[i]))
        after, n = sus["after"], len(sus["after"])
        if n >= 3 and min(after) > self._thr(sus, self.confirm):
            return self._confirmed(sus, f"every one of the {n} losses after the {sus['kind']} "
                                   f"stayed above {self._thr(sus, self.confirm):.4g}"), None
        if n < cap and (n < self.confirm or statistics.median(after[:self.confirm]) > sus["ref"]):
            return None, None  # not yet beyond the noise, and not back to the level before
        med = statistics.median(after)
        if n >= cap and med > self._thr(sus, n):
            return self._confirmed(sus, f"the loss stayed at {med:.4g} ({med / sus['ref']:.2f}x its median "
                                        f"{sus['ref']:.4g}) over the {n} steps after the {sus['kind']}"), None
        self._suspect = None
        sus["event"].data.setdefault("actions", []).append(
            f"autopilot: the loss came back ({med / sus['ref']:.2f}x its median): no action")
        return None, sus["step"]

    def _confirmed(self, sus, why):
        self._suspect = None
        return {"step": sus["step"], "kind": sus["kind"], "event": sus["event"], "why": why}

    def _onset(self, step: int) -> int:
        """The first step of the ``confirm`` before ``step`` whose loss is above the damage
        threshold, else ``step``: where the rollback's snapshot must come from before.

        A rise is seen late: one noisy loss must jump further to raise a suspicion than a run
        of them to confirm it, and a detector waits for the loss to persist.  Restoring a
        snapshot that already holds the damage costs far more (measured: 1.2x the final loss)
        than one taken a flush earlier (a few more updates discarded), so the step is moved
        back to the earliest elevated loss, gaps allowed."""
        base = self._baseline(step - self.confirm, (), (), ())
        if base is None:
            return step
        thr = self._thr({"ref": base[0], "spread": base[1]}, self.confirm)
        past = dict(self._hist)
        return next((s for s in range(step - self.confirm, step) if past.get(s, -math.inf) > thr), step)

    @staticmethod
    def _norm(entry) -> float:
        """A snapshot's parameter norm as a float (a weight blow-up between two of the guard's
        parameter-norm measurements is told from it); read once, at a later flush."""
        if isinstance(entry[2], torch.Tensor):
            entry[2] = float(entry[2])  # host sync: once per snapshot, at a flush
        return entry[2]

    def _weights_blew_up(self, steps, rows):
        """The guard's parameter norm at ``blowup`` x the last snapshot's: a weight blow-up.

        The weight-growth detector reports once per cooldown (200 steps); after a rollback the
        same fault may come back within it, so the autopilot reads the column itself."""
        if not self._snaps:
            return None
        ref = self._norm(self._snaps[-1])
        pn = rows[:, COL["param_norm"]]
        for i, s in enumerate(steps):
            x = float(pn[i])
            if x == math.inf or (math.isfinite(x) and x > self.blowup * ref):
                ev = Event(s, "weight_growth", "critical", [],
                           f"parameter norm {x:.3g} is {x / ref:.3g}x the last snapshot's ({ref:.3g})",
                           data={"param_norm": x})
                return {"step": s, "kind": "weight_growth", "why": ev.message, "event": ev}
        return None

    def _loss_suspect(self, steps, loss, ok, after=-1):
        """A step whose loss is ``3`` x spread above the median of the losses before the flush.

        The detectors are tuned to report few single batches; an LR burst can wreck a run
        with no event at all (measured: benchmarks/rescue_faults).  This looser rule only makes
        a suspect: the strict confirmation over the next ``confirm`` losses decides."""
        # one baseline per flush (the losses before it): cheap on healthy steps
        base = self._baseline(steps[0], steps, loss, ok) if steps else None
        if base is None:
            return None
        for i, s in enumerate(steps):
            if s <= after or not (ok[i] and loss[i] == loss[i]):
                continue
            if float(loss[i]) > base[0] * math.exp(max(math.log(1.1), 3 * base[1])):
                ev = Event(s, "loss_spike", "info", [], f"loss {float(loss[i]):.4g} is "
                           f"{float(loss[i]) / base[0]:.2f}x its median {base[0]:.4g}")
                return {"step": s, "kind": "loss rise", "ref": base[0], "spread": base[1], "after": [], "event": ev}
        return None

    def _baseline(self, step, steps, loss, ok):
        """(median, spread of the log losses) of the finite losses before ``step``; None if too few."""
        vals = [v for s, v in self._hist if s < step]
        vals += [float(loss[i]) for i, s in enumerate(steps) if s < step and ok[i] and loss[i] == loss[i]]
        vals = vals[-50:]
        if len(vals) < 10 or min(vals) <= 0:
            return None  # too young, or a loss that is not a positive error: no judgement
        logs = [math.log(v) for v in vals]
        med = statistics.median(logs)
        return math.exp(med), 1.4826 * statistics.median(abs(x - med) for x in logs)

    # ------------------------------------------------------------------ act
    def __call__(self, event, ctx):
        if event.kind == "nonfinite":
            return "step skipped" if event.data.get("skipped") else None
        if event.kind != "rescue" or "trigger_step" not in event.data:
            return None
        now, start = ctx.steps, event.data["trigger_step"]
        self._rollback_steps = [s for s in self._rollback_steps if now - s < self.budget_steps]
        if len(self._rollback_steps) >= self.max_rollbacks:
            event.message = (f"rollback budget exhausted: {len(self._rollback_steps)} rollbacks in "
                             f"{now - self._rollback_steps[0]} steps, the run keeps diverging; lower the "
                             f"learning rate, check the data, or resume from an earlier checkpoint "
                             f"(last trigger: {event.message})")
            raise GuardAlarm(event)
        done = []
        # the newest snapshot taken before the fault; the fault's update may be the step before
        # the first row that shows it, so a snapshot captured right then is not trusted
        clean = [x for x in self._snaps if x[0] <= start - 1]
        pn = event.data.get("param_norm")
        if isinstance(pn, (int, float)) and math.isfinite(pn):
            # weights are measured every param_norm_every steps: a snapshot taken after the
            # fault and before its measurement holds the blown-up weights; tell it by its norm
            clean = [x for x in clean if self._norm(x) < 0.5 * pn]
        elif pn is not None:
            clean = [x for x in clean if math.isfinite(self._norm(x))]
        if not clean and self._snaps:
            clean = self._snaps[:1]  # older than anything else we have
        if len(clean) > 1 and clean[-1][0] == self._target and self._rollback_steps and \
                now - self._rollback_steps[-1] < self.lr.recover_every:
            # the run went wrong again soon after a rollback to this snapshot: the damage may be
            # in it (a fault a few steps before a quiet flush looks healthy there), go further back
            clean = clean[:-1]
        if clean:
            s, snap, _ = clean[-1]
            groups = [{k: v for k, v in g.items() if k != "params"} for g in ctx.optimizer.param_groups]
            ctx.restore(snap)
            for g, saved in zip(ctx.optimizer.param_groups, groups):
                g.update(saved)  # hyperparameters are the scheduler's: not rolled back
            # a first rollback withholds nothing: the batch that did the damage is already past,
            # and each withheld batch is an update lost; a rollback that repeats within
            # ``recover_every`` steps means the cause persists (bad data ahead, PaLM): hold then
            repeat = bool(self._rollback_steps) and now - self._rollback_steps[-1] < self.lr.recover_every
            hold = self.skip_batches if repeat else 0
            ctx.hold(hold)
            self._snaps = [x for x in self._snaps if x[0] <= s]
            self._target = s
            self._hist = deque(((t, v) for t, v in self._hist if t < s), maxlen=self._hist.maxlen)
            self.rollbacks += 1
            self.interventions += 1
            self._rollback_steps.append(now)
            done.append(f"rolled back to the state after step {s - 1}" +
                        (f"; skipping the next {hold} batches" if hold else ""))
        else:
            done.append("no clean snapshot yet: nothing to roll back to")
        before = self.lr.scale
        note = self.lr(event, ctx)
        if self.lr.scale != before:
            self.interventions += 1
            done.append(note)
        return "; ".join(done)

    # ------------------------------------------------------------------ state
    def state_dict(self):
        # Snapshots are model copies: not part of the state (the next quiet flush takes one).
        return {"lr": self.lr.state_dict(), "rollbacks": self.rollbacks, "interventions": self.interventions,
                "rollback_steps": list(self._rollback_steps), "hist": [list(x) for x in self._hist],
                "first": list(self._first)}

    def load_state_dict(self, sd):
        self.lr.load_state_dict(sd["lr"])
        self.rollbacks, self.interventions = int(sd["rollbacks"]), int(sd["interventions"])
        self._rollback_steps = [int(s) for s in sd["rollback_steps"]]
        self._hist = deque(((int(s), float(v)) for s, v in sd["hist"]), maxlen=self._hist.maxlen)
        self._first = [float(v) for v in sd.get("first", [])]  # (states saved before it: rebuilt)
        self._snaps, self._suspect, self._target = [], None, -1

    def __repr__(self) -> str:
        return (f"Autopilot(every={self.every}, skip_batches={self.skip_batches}, keep={self.keep}, "
                f"confirm={self.confirm}, ratio={self.ratio:g}, z={self.z:g}, max_rollbacks={self.max_rollbacks}, "
                f"budget_steps={self.budget_steps}, lr_factor={self.lr.factor:g}, "
                f"recover_every={self.lr.recover_every}, blowup={self.blowup:g}, floor={self.floor:g})")
