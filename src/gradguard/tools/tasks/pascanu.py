"""The synthetic long-sequence tasks of Pascanu, Mikolov & Bengio (2013).

As in Pascanu, Mikolov & Bengio (2013), section 5 (the paper's setup: 50 hidden
units, SGD lr 0.01, minibatch 20, clip threshold 1.0; success = under 1%
errors on 10,000 fresh sequences):

- **addition**: length ``l = L + U[0, 0.1L)``; channel 0 holds values
  ``U[0, 1]``, channel 1 is a marker that is 1 at ``p0 in [0, 0.1l)`` and
  ``p1 in [0.1l, 0.5l)``; target ``(x[p0] + x[p1]) / 2`` read at the last
  step; MSE loss; an error is a squared error > 0.04.
- **multiplication**: the same with target ``x[p0] * x[p1]``.
- **temporal order**: length ``L``; 6 one-hot symbols ``A B c d e f``;
  ``A`` or ``B`` at ``p0 in [0.1L, 0.2L)`` and ``p1 in [0.5L, 0.6L)``, the
  other positions random from ``{c, d, e, f}``; 4 classes AA, AB, BA, BB.

Batches are batch-first ``(B, T, C)`` float32.  One length is drawn per
batch (a minibatch must share a length to be one tensor); each sequence
draws its own marker positions.  Interval ends are floored to integers and
kept non-empty, so every length >= 10 is valid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["addition", "multiplication", "temporal_order", "PascanuTask", "TASKS", "get_task",
           "marker_range"]

ADD_ERROR = 0.04  # squared error above which an addition/multiplication answer is wrong


def _check(batch_size: int, length: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 10:
        raise ValueError(f"length must be an int >= 10, got {length!r}")


def marker_range(lo_frac: float, hi_frac: float, length: int) -> tuple[int, int]:
    """Integer interval ``[floor(lo*l), floor(hi*l))``, made non-empty."""
    lo = int(lo_frac * length)
    hi = max(lo + 1, int(hi_frac * length))
    return lo, hi


def _randint(lo: int, hi: int, n: int, g: torch.Generator | None) -> Tensor:
    return torch.randint(lo, hi, (n,), generator=g)


def _two_marker(batch_size: int, length: int, generator, combine) -> tuple[Tensor, Tensor]:
    _check(batch_size, length)
    extra = max(1, int(0.1 * length))
    l = length + int(torch.randint(0, extra, (1,), generator=generator))  # l = L + U[0, 0.1L)
    values = torch.rand(batch_size, l, generator=generator)
    marker = torch.zeros(batch_size, l)
    lo0, hi0 = marker_range(0.0, 0.1, l)
    lo1, hi1 = marker_range(0.1, 0.5, l)
    lo1 = max(lo1, hi0)  # p1 starts where p0's interval ends
    hi1 = max(hi1, lo1 + 1)
    p0 = _randint(lo0, hi0, batch_size, generator)
    p1 = _randint(lo1, hi1, batch_size, generator)
    rows = torch.arange(batch_size)
    marker[rows, p0] = 1.0
    marker[rows, p1] = 1.0
    target = combine(values[rows, p0], values[rows, p1]).unsqueeze(1)
    return torch.stack([values, marker], dim=2), target


def addition(batch_size: int, length: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One batch of the addition problem.

    Args:
        batch_size: number of sequences.
        length: the paper's ``L`` (>= 10); each batch is ``L + U[0, 0.1L)`` long.
        generator: a seeded ``torch.Generator`` (None: torch's global RNG).
    Returns:
        ``(x, y)``: x ``(B, l, 2)`` [value, marker], y ``(B, 1)`` = mean of the two marked values.

    Example:
        >>> x, y = addition(20, 100, torch.Generator().manual_seed(0))
    """
    return _two_marker(batch_size, length, generator, lambda a, b: (a + b) / 2)


def multiplication(batch_size: int, length: int,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One batch of the multiplication problem: as ``addition``, target ``x[p0] * x[p1]``."""
    return _two_marker(batch_size, length, generator, lambda a, b: a * b)


def temporal_order(batch_size: int, length: int,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One batch of the temporal order problem.

    Args:
        batch_size: number of sequences.
        length: sequence length ``L`` (>= 10).
        generator: a seeded ``torch.Generator``.
    Returns:
        ``(x, y)``: x ``(B, L, 6)`` one-hot over ``A B c d e f``; y ``(B,)`` long in
        0..3 = AA, AB, BA, BB (first marked symbol, second marked symbol).

    Example:
        >>> x, y = temporal_order(20, 50, torch.Generator().manual_seed(0))
    """
    _check(batch_size, length)
    sym = torch.randint(2, 6, (batch_size, length), generator=generator)  # distractors c..f
    lo0, hi0 = marker_range(0.1, 0.2, length)
    lo1, hi1 = marker_range(0.5, 0.6, length)
    p0 = _randint(lo0, hi0, batch_size, generator)
    p1 = _randint(lo1, hi1, batch_size, generator)
    s0 = torch.randint(0, 2, (batch_size,), generator=generator)  # 0 = A, 1 = B
    s1 = torch.randint(0, 2, (batch_size,), generator=generator)
    rows = torch.arange(batch_size)
    sym[rows, p0] = s0
    sym[rows, p1] = s1
    return F.one_hot(sym, 6).float(), 2 * s0 + s1


@dataclass(frozen=True)
class PascanuTask:
    """A task with its sampler, loss and error rule (what a training loop needs).

    Attributes:
        name: ``"addition"``, ``"multiplication"`` or ``"temporal_order"``.
        input_size / output_size: channels in and units out.
        classification: True for temporal order (cross-entropy, argmax errors).
    """

    name: str
    sample: object
    input_size: int
    output_size: int
    classification: bool

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y) if self.classification else F.mse_loss(out, y)

    def errors(self, out: Tensor, y: Tensor) -> Tensor:
        """(B,) bool: which answers count as errors under the paper's rule.

        A non-finite output is always an error (a diverged model must not score:
        ``NaN > 0.04`` is False, and argmax over NaN picks an arbitrary class).
        """
        finite = torch.isfinite(out).all(-1)
        if self.classification:
            return (out.argmax(-1) != y) | ~finite
        return ~(((out - y) ** 2).squeeze(-1) <= ADD_ERROR) | ~finite


TASKS = {
    "addition": PascanuTask("addition", addition, 2, 1, False),
    "multiplication": PascanuTask("multiplication", multiplication, 2, 1, False),
    "temporal_order": PascanuTask("temporal_order", temporal_order, 6, 4, True),
}


def get_task(name: str) -> PascanuTask:
    """The ``PascanuTask`` named ``name`` (one of ``TASKS``)."""
    key = name.replace("-", "_")
    if key not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[key]
