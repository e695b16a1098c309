"""What a run is and what one step's row holds: the shared format of gradguard.

The guard writes one float32 row per step; detectors, remedies, adapters, the
store and the dashboard read those rows.  The layout lives here, in a leaf
module, so that every reader and writer uses the column *names* and no reader
imports the orchestrator.

A row is the global columns (``GLOBAL_COLS``) followed by one gradient L2 norm
per watched tensor, one max |g| per watched tensor, then one *parameter* L2 norm
per watched tensor, in model order, then one L2 norm per watched *buffer* (the
normalisation layers' running variances, ``RunInfo.buffers``, measured every step).  A
tensor without a gradient on a step has a NaN norm and a 0 max |g|.  Parameter norms are
measured with the ``param_norm`` column, every ``param_norm_every`` steps, and are NaN in
between.

``RunInfo`` is the small description of the run that detectors and remedies
are bound to (names, shapes, owning module types, which tensors are weight
matrices): they never see the guard itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["GLOBAL_COLS", "COL", "RowLayout", "RunInfo", "watched_buffers", "buffer_input"]

# Global columns, in row order.
#   bad          1.0 if a gradient or the loss held NaN/Inf (or the global norm overflowed)
#   skipped      1.0 if the optimizer step was withheld (poisoned, or held by a remedy)
#   loss         the loss passed to step() (NaN when none)
#   loss_bad     1.0 if that loss was NaN/Inf
#   global_norm  pre-clip global L2 norm of the gradients
#   clip_coef    the smallest coefficient the clipping policy applied (1.0: untouched)
#   lr           param_groups[0]'s learning rate (the other groups': lr_groups.py, store only)
#   param_norm   total parameter L2 norm, every ``param_norm_every`` steps (NaN in between)
GLOBAL_COLS = ("bad", "skipped", "loss", "loss_bad", "global_norm", "clip_coef", "lr", "param_norm")
COL = {name: i for i, name in enumerate(GLOBAL_COLS)}
N_GLOBAL = len(GLOBAL_COLS)


class RowLayout:
    """Column positions of a run with ``n_layers`` watched tensors and ``n_buffers`` watched
    buffers.

    Every accessor works on one row (1-D) or a batch of rows (2-D), returning views.
    """

    __slots__ = ("n", "nb", "width", "norms_slice", "max_abs_slice", "param_norms_slice",
                 "buffer_norms_slice")

    #: per-layer blocks after the global columns: gradient norms, max |g|, parameter norms
    BLOCKS = 3

    def __init__(self, n_layers: int, n_buffers: int = 0):
        self.n, self.nb = int(n_layers), int(n_buffers)
        end = N_GLOBAL + self.BLOCKS * self.n
        self.width = end + self.nb
        self.norms_slice = slice(N_GLOBAL, N_GLOBAL + self.n)
        self.max_abs_slice = slice(N_GLOBAL + self.n, N_GLOBAL + 2 * self.n)
        self.param_norms_slice = slice(N_GLOBAL + 2 * self.n, end)
        self.buffer_norms_slice = slice(end, self.width)

    @staticmethod
    def index(name: str) -> int:
        """Position of a global column (KeyError naming the column if unknown)."""
        try:
            return COL[name]
        except KeyError:
            raise KeyError(f"unknown row column {name!r}; columns are {GLOBAL_COLS}") from None

    def column(self, rows, name: str):
        """Column ``name`` of ``rows`` (a scalar for one row, a vector for a batch)."""
        return rows[..., COL[name]]

    def norms(self, rows):
        return rows[..., self.norms_slice]

    def max_abs(self, rows):
        return rows[..., self.max_abs_slice]

    def param_norms(self, rows):
        """Per-tensor parameter L2 norms (NaN on steps that do not measure them)."""
        return rows[..., self.param_norms_slice]

    def buffer_norms(self, rows):
        """Per-buffer L2 norms (``RunInfo.buffers``, every step)."""
        return rows[..., self.buffer_norms_slice]

    def globals(self, rows):
        return rows[..., :N_GLOBAL]

    def __repr__(self) -> str:
        return f"RowLayout(n_layers={self.n}, n_buffers={self.nb}, width={self.width})"


@dataclass(frozen=True, eq=False)
class RunInfo:
    """What detectors and remedies know about the run (never the guard itself).

    Attributes:
        names: watched parameter names, in model order (the row order).
        shapes: their shapes.
        trainable: ``requires_grad`` of each.
        owner: parameter name -> type name of the module that owns it (empty without a model).
        module_types: every module type name in the model (empty without a model).
        param_norm_every: steps between two ``param_norm`` measurements (0: never).
        init_layer_norms: each parameter's L2 norm when the guard was built (float64).
        buffers: watched buffer names (``watched_buffers``), the row's last block.
        buffer_inputs: for each buffer, the watched weight of the layer whose output it
            normalises (``None`` where no such layer was found).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    trainable: tuple[bool, ...]
    owner: dict = field(default_factory=dict)
    module_types: frozenset = frozenset()
    param_norm_every: int = 0
    init_layer_norms: np.ndarray | None = None
    buffers: tuple[str, ...] = ()
    buffer_inputs: tuple = ()

    @property
    def layout(self) -> RowLayout:
        return RowLayout(len(self.names), len(self.buffers))

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def weight_idx(self) -> np.ndarray:
        """Indices of weight matrices / kernels (2 or more dimensions)."""
        return np.array([i for i, s in enumerate(self.shapes) if len(s) >= 2], dtype=int)

    @property
    def numel(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @classmethod
    def describe(cls, names, params, model=None, param_norm_every: int = 0,
                 init_layer_norms: np.ndarray | None = None, buffers=()) -> "RunInfo":
        """The description of ``(names, params)``; ``model`` (an ``nn.Module``) adds module types
        and, for ``buffers`` (names from ``watched_buffers``), the layers feeding them."""
        owner: dict[str, str] = {}
        types: set[str] = set()
        buffers = tuple(buffers)
        inputs: tuple = (None,) * len(buffers)
        if model is not None:
            inputs = tuple(buffer_input(model, b, names) for b in buffers)
            mods = dict(model.named_modules())
            types = {type(m).__name__ for m in mods.values()}
            for name in names:
                m = mods.get(name.rpartition(".")[0])
                if m is not None:
                    owner[name] = type(m).__name__
        return cls(tuple(names), tuple(tuple(p.shape) for p in params),
                   tuple(bool(p.requires_grad) for p in params), owner, frozenset(types),
                   int(param_norm_every), init_layer_norms, buffers, inputs)


# The normalisation layers whose running statistics are watched: BatchNorm / SyncBatchNorm /
# InstanceNorm with track_running_stats.  Their running variance is an average of the scale of
# the activations entering them, the one record of a batch that training-mode normalisation
# hides from the gradients and the loss (a batch x1000 leaves both unchanged).
_RUNNING_VAR = "running_var"


def watched_buffers(model, device=None) -> list[tuple[str, object]]:
    """``(name, tensor)`` of ``model``'s running variances (plain floating tensors on ``device``
    when given), in model order; none without a model (``None``)."""
    out = []
    for mname, m in (model.named_modules() if model is not None else ()):
        b = getattr(m, _RUNNING_VAR, None)
        if (getattr(m, "track_running_stats", False) and b is not None and type(b).__name__ == "Tensor"
                and b.dtype.is_floating_point and (device is None or b.device == device)
                and _RUNNING_VAR in dict(m.named_buffers(recurse=False))):
            out.append((f"{mname}.{_RUNNING_VAR}" if mname else _RUNNING_VAR, b))
    return out


def buffer_input(model, buffer: str, names) -> str | None:
    """The watched weight of the layer whose output the norm layer owning ``buffer`` normalises:
    the nearest module before it (in registration order, how ``Sequential`` and most models list
    them) inside the norm layer's parent, whose weight has as many output features as the norm
    layer has channels.  ``None`` when there is none (the statistics are then named alone).

    Inside the parent: a model that keeps its convolutions in one ``ModuleList`` and its norms
    in another registers ``convs.3`` just before ``bns.0``; the registration order says nothing
    of which feeds which there, and a wrong name is worse than none."""
    owner = buffer.rpartition(".")[0]
    parent = owner.rpartition(".")[0]
    inside = (lambda n: True) if not parent else (lambda n: n.startswith(parent + "."))
    watched = set(names)
    mods = list(model.named_modules())
    pos = next((i for i, (n, _) in enumerate(mods) if n == owner), None)
    feats = getattr(dict(mods).get(owner), "num_features", None)
    if pos is None or feats is None:
        return None
    for n, m in reversed(mods[:pos]):
        if not inside(n):
            return None
        w = getattr(m, "weight", None)
        if getattr(m, "track_running_stats", None) is not None:  # another norm layer: stop there
            return None
        if w is not None and getattr(w, "dim", lambda: 0)() >= 2 and w.shape[0] == feats:
            name = f"{n}.weight" if n else "weight"
            return name if name in watched else None
    return None
