"""What gradguard tells the user: events, and the error raised on request."""
from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field

__all__ = ["Event", "NonFiniteGradientError", "RunIsDeadError", "SEVERITIES", "KINDS", "event_order", "add_events"]

SEVERITIES = ("info", "warning", "critical")

# Every event kind gradguard emits, registered here once: remedies are keyed by
# these names, the dashboard and report label them with these descriptions.
KINDS = {
    "nonfinite": "a gradient or the loss held NaN/Inf",
    "amp_overflow": "a GradScaler overflow (the scaler backs off; expected now and then)",
    "spike": "the global gradient norm jumped far above its recent baseline",
    "exploding": "gradient norms grew without bound or too fast",
    "diverging": "the loss left the range it started in",
    "loss_spike": "the loss jumped far above its recent baseline",
    "vanishing": "early layers' gradients are negligible next to the rest",
    "weight_growth": "the parameter norm grew too much",
    "over_clipping": "clipping scales almost every step down hard",
    "unused": "trainable parameters never received a gradient",
    "running_stats": "a normalisation layer's running statistics jumped or hold NaN/Inf (a bad batch)",
    "rescue": "the autopilot (remedies=\"auto\") undid a fault: rollback, learning-rate change, or gave up",
}


# Events of one step, from the model's state to its consequences: weights, non-finite values,
# activations' statistics, gradients, the loss.  A weight tensor found x30 explains the gradient
# and loss jumps of its step (which name the layers downstream of it); read first, it names the cause.
_CAUSE_ORDER = {k: i for i, k in enumerate((
    "weight_growth", "nonfinite", "amp_overflow", "running_stats", "spike", "exploding", "vanishing", "over_clipping",
    "unused", "loss_spike", "diverging", "rescue"))}


def event_order(e: "Event") -> tuple[int, int]:
    """Sort key of events: by step, then from cause to consequence (``_CAUSE_ORDER``; other
    kinds after those); ``sorted`` keeps the order of events that tie."""
    return e.step, _CAUSE_ORDER.get(e.kind, len(_CAUSE_ORDER))


def add_events(events: list, new: list) -> None:
    """Add ``new`` to ``events``, a list kept in ``event_order``.  A finding can be dated before
    events already reported (a weight jump seen at the next parameter measurement, in a later
    flush): it goes to its place, so the list does not depend on where the flushes fell."""
    for e in sorted(new, key=event_order):
        if events and event_order(e) < event_order(events[-1]):
            bisect.insort(events, e, key=event_order)  # after the events it ties with
        else:
            events.append(e)


@dataclass
class Event:
    """One finding at one step.

    Attributes:
        step: the guard step (0-based) the finding belongs to.
        kind: what was found, e.g. ``"nonfinite"``, ``"spike"``, ``"exploding"``.
        severity: ``"info"`` | ``"warning"`` | ``"critical"``.
        layers: culprit parameter names, most responsible first.
        message: one sentence with the numbers.
        advice: concrete remedies, most specific first.
        data: the numbers behind the message (JSON-serialisable); ``data["seen_at"]``, when
            the finding is dated before the step that raised it (see ``seen_at``).
    """

    step: int
    kind: str
    severity: str
    layers: list[str]
    message: str
    advice: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    @property
    def seen_at(self) -> int:
        """The step whose row raised the finding: ``step`` unless it was dated back to where it
        began (a weight jump found at a parameter measurement, a loss that stayed high)."""
        return int((self.data or {}).get("seen_at", self.step))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Event":
        return cls(**d)

    def __str__(self) -> str:
        return f"[step {self.step}] {self.severity} {self.kind}: {self.message}"


class NonFiniteGradientError(RuntimeError):
    """Raised by ``Guard(on_nonfinite="raise")``; ``.layers`` names the tensors."""

    def __init__(self, message: str, step: int, layers: list[str], event: Event | None = None):
        super().__init__(message)
        self.step = step
        self.layers = layers
        self.event = event


class RunIsDeadError(NonFiniteGradientError):
    """Raised when ``Guard(nonfinite_budget=N)`` has seen ``N`` consecutive poisoned steps
    under ``on_nonfinite="skip"`` or ``"warn"``: skipping (or applying) on would train nothing.

    Attributes (besides ``step`` and ``layers``, the tensors non-finite on the last step):
        first_step: the streak's first poisoned step.
        count: how many consecutive poisoned steps the streak holds.
    """

    def __init__(self, message: str, step: int, layers: list[str], first_step: int, count: int):
        super().__init__(message, step, layers)
        self.first_step = first_step
        self.count = count
