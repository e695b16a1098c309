"""Deep-network cases from the seeds: a deep MLP that explodes, one that vanishes.

Seeds 002-004: gradients are products of one factor per layer, so they grow
exponentially when the factors exceed 1 (large weights) and shrink when they
are below 1 (sigmoid's slope is at most 0.25).

- ``exploding_mlp``: tanh layers with weights ``N(0, (gain^2)/fan_in)``,
  gain 3 by default (the "chaotic" regime: each layer multiplies the
  backward signal by about ``gain^2 * E[tanh'^2] > 1``).
- ``vanishing_mlp``: sigmoid layers with small weights ``N(0, (gain^2)/fan_in)``,
  gain 0.5: each layer multiplies the backward signal by ``<= 0.25 * gain``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["deep_mlp", "exploding_mlp", "vanishing_mlp", "regression_batch", "vanishing_case",
           "exploding_case", "healthy_case"]


def deep_mlp(depth: int, width: int, activation: str, gain: float, in_features: int = 16,
             out_features: int = 1, generator: torch.Generator | None = None) -> nn.Sequential:
    """``depth`` Linear layers (``depth - 1`` hidden) with weights ``N(0, gain^2 / fan_in)``.

    Args:
        depth: number of Linear layers (>= 2).
        width: hidden units per layer.
        activation: ``"tanh"``, ``"sigmoid"`` or ``"relu"``.
        gain: init scale relative to LeCun (1.0); He is sqrt(2) for ReLU.
        generator: seeds the init (None: torch's global RNG).
    Returns:
        an ``nn.Sequential`` of Linear / activation modules.

    Example:
        >>> model = deep_mlp(20, 64, "sigmoid", 0.5)
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
        raise ValueError(f"depth must be an int >= 2, got {depth!r}")
    acts = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU}
    if activation not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
    if not (isinstance(gain, (int, float)) and math.isfinite(gain) and gain > 0):
        raise ValueError(f"gain must be a positive finite number, got {gain!r}")
    layers: list[nn.Module] = []
    dims = [in_features] + [width] * (depth - 1) + [out_features]
    for i in range(depth):
        lin = nn.Linear(dims[i], dims[i + 1])
        with torch.no_grad():
            lin.weight.normal_(0.0, gain / math.sqrt(dims[i]), generator=generator)
            lin.bias.zero_()
        layers.append(lin)
        if i < depth - 1:
            layers.append(acts[activation]())
    return nn.Sequential(*layers)


def exploding_mlp(depth: int = 24, width: int = 64, gain: float = 3.0, seed: int = 0) -> nn.Sequential:
    """A deep tanh MLP with large init whose first layers get the largest gradients."""
    return deep_mlp(depth, width, "tanh", gain, generator=torch.Generator().manual_seed(seed))


def vanishing_mlp(depth: int = 24, width: int = 64, gain: float = 0.5, seed: int = 0) -> nn.Sequential:
    """A deep sigmoid MLP with small init whose first layers get almost no gradient."""
    return deep_mlp(depth, width, "sigmoid", gain, generator=torch.Generator().manual_seed(seed))


def regression_batch(batch_size: int = 64, in_features: int = 16,
                     seed: int = 0) -> tuple[Tensor, Tensor]:
    """A random regression batch ``(x, y)`` for the deep MLPs: y = sum of x's first 4 features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, in_features, generator=g)
    return x, x[:, :4].sum(1, keepdim=True)


def mse(out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out, y)


# Factories for `gradguard diagnose MODULE:FACTORY`: each returns (model, batch, loss_fn).
def vanishing_case():
    """``gradguard diagnose gradguard.tools.tasks.deep:vanishing_case``"""
    return vanishing_mlp(), regression_batch(), mse


def exploding_case():
    """``gradguard diagnose gradguard.tools.tasks.deep:exploding_case``"""
    return exploding_mlp(), regression_batch(), mse


def healthy_case():
    """A 4-layer ReLU MLP with He init: nothing critical to report."""
    model = deep_mlp(4, 64, "relu", math.sqrt(2.0), generator=torch.Generator().manual_seed(0))
    return model, regression_batch(), mse
