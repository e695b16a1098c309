"""What gradguard tells the user: events, and the error raised on request."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["Event", "NonFiniteGradientError", "RunIsDeadError", "SEVERITIES", "KINDS"]

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
    "rescue": "the autopilot (remedies=\"auto\") undid a fault: rollback, learning-rate change, or gave up",
}


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
        data: the numbers behind the message (JSON-serialisable).
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
