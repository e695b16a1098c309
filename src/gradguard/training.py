"""Helpers for the user's own training loop: a weight penalty and truncated BPTT.

    loss = loss_fn(model(x), y) + gg.penalty(model, l2=1e-4)

    h = None
    for chunk, h in gg.tbptt(x, k=35, hidden=h):
        out, h = rnn(chunk, h)          # h is detached at each chunk boundary
        ...
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["penalty", "tbptt", "detach_hidden"]

# Norm gains/biases are usually left out of weight penalties.
DEFAULT_EXCLUDE = ("*bias", "*norm*.weight", "*ln*.weight", "*bn*.weight")


def penalty(model, l1: float = 0.0, l2: float = 0.0, exclude=DEFAULT_EXCLUDE) -> Tensor:
    """L1/L2 weight penalty to add to the loss: ``l1 * sum|w| + l2 * sum w**2``.

    Args:
        model: an ``nn.Module`` or an iterable of ``(name, parameter)``.
        l1: L1 coefficient (>= 0).
        l2: L2 coefficient (>= 0); note ``l2 * sum w**2`` (no 1/2 factor).
        exclude: glob patterns of parameter names left out (default: biases
            and normalisation weights); ``()`` to penalise everything.
    Returns:
        a scalar tensor on the parameters' device (0 when both are 0).

    Example:
        >>> loss = loss + gg.penalty(model, l2=1e-4)
    """
    for name, v in (("l1", l1), ("l2", l2)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    pairs = list(model.named_parameters()) if isinstance(model, nn.Module) else list(model)
    if not pairs:
        raise ValueError("model: no parameters")
    chosen = [p for n, p in pairs if p.requires_grad and not any(fnmatch.fnmatch(n, pat) for pat in exclude)]
    dev = pairs[0][1].device
    total = torch.zeros((), device=dev)
    if not chosen or (l1 == 0 and l2 == 0):
        return total
    if l1:
        total = total + l1 * sum(p.abs().sum().to(dev) for p in chosen)
    if l2:
        total = total + l2 * sum(p.square().sum().to(dev) for p in chosen)
    return total


def detach_hidden(hidden):
    """Detach a hidden state: a tensor, or a (nested) tuple/list of tensors (LSTM's (h, c))."""
    if hidden is None:
        return None
    if isinstance(hidden, Tensor):
        return hidden.detach()
    if isinstance(hidden, (tuple, list)):
        return type(hidden)(detach_hidden(h) for h in hidden)
    raise TypeError(f"hidden must be a Tensor, a tuple/list of Tensors or None, got {type(hidden).__name__}")


class tbptt:
    """Truncated backpropagation through time: chunks of ``k`` steps, hidden state detached between them.

    Iterating yields ``(chunk, hidden)``; call ``.send``-free: after computing
    the chunk, hand the new hidden state back with ``it.hidden = h`` or simply
    rebind it in the loop (the iterator reads ``it.hidden`` for the next
    chunk).  Use it two ways:

    1. With a module (``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` or anything called
       ``module(chunk, hidden) -> (out, hidden)``): ``tbptt.run(module, x, k)``
       returns the concatenated outputs of each chunk, calling ``on_chunk``
       (e.g. loss + backward + guard.step) after each.
    2. In a user loop::

           it = gg.tbptt(x, k=35)
           for chunk, h in it:
               out, it.hidden = rnn(chunk, h)
               loss = ...; loss.backward(); guard.step(loss)

    Args:
        x: a sequence tensor.
        k: chunk length (>= 1).
        hidden: the initial hidden state (None: the module's default).
        dim: the time dimension (default 1, ``batch_first=True``; use 0 for
            ``batch_first=False``).
    """

    def __init__(self, x: Tensor, k: int, hidden=None, dim: int = 1):
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}-d x, got {dim!r}")
        self.x, self.k, self.dim = x, k, dim
        self.hidden = hidden

    def __len__(self) -> int:
        return math.ceil(self.x.shape[self.dim] / self.k)

    def __iter__(self) -> Iterator:
        for chunk in torch.split(self.x, self.k, dim=self.dim):
            self.hidden = detach_hidden(self.hidden)  # the truncation
            yield chunk, self.hidden

    @staticmethod
    def run(module, x: Tensor, k: int, hidden=None, dim: int = 1, on_chunk=None):
        """Run ``module`` over ``x`` in chunks of ``k``; returns ``(outputs, hidden)``.

        ``on_chunk(out, index)`` is called after each chunk (train there:
        backward and ``guard.step``); the hidden state is detached before the
        next chunk, so no gradient flows across a boundary.
        """
        it = tbptt(x, k, hidden, dim)
        outs = []
        for i, (chunk, h) in enumerate(it):
            out, it.hidden = module(chunk, h)
            if on_chunk is not None:
                on_chunk(out, i)
            outs.append(out)
        return torch.cat(outs, dim=dim), it.hidden
