"""Sharded (DTensor) gradients: local shards, and full-tensor statistics from them.

Under FSDP2 / tensor parallelism each rank holds shards; the statistics the
decision needs are those of the full tensors, so the per-rank sums of squares
and max |g| are combined with one collective for all tensors.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["dtensor_type", "local_grads", "reduce_shards", "agree_any", "world_of"]


@functools.lru_cache(maxsize=None)
def dtensor_type():
    """DTensor's class when torch.distributed is usable, else None (imported lazily, once)."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def local_grads(grads: list[Tensor]) -> list[Tensor]:
    """The local shard of every DTensor gradient (a view: in-place ops reach the DTensor)."""
    dt = dtensor_type()
    if dt is None or not any(isinstance(g, dt) for g in grads):
        return grads
    return [g.to_local() if isinstance(g, dt) else g for g in grads]


def reduce_shards(grads, sharded: list[int], sumsq: Tensor, maxabs: Tensor, names) -> tuple[Tensor, Tensor]:
    """Full-tensor sums of squares and max |g| from per-rank shards, in ONE collective.

    Every rank all-gathers its (2, P) vector of local sums of squares and max |g|,
    then sums the squares over the ranks that hold distinct shards and takes the
    max over all.  A tensor replicated over a mesh dimension is counted once
    (divided by the replication factor); a NaN on any rank's shard reaches every
    rank, so every rank takes the same decision.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Partial, Replicate, Shard

    mesh = grads[sharded[0]].device_mesh
    for i in sharded:
        g = grads[i]
        if g.device_mesh != mesh:
            raise ValueError(f"gradient {names[i]!r} lives on another device mesh; gradguard reduces "
                             "statistics over one mesh per guard")
        for pl in g.placements:
            if isinstance(pl, Partial):
                raise ValueError(f"gradient {names[i]!r} has a Partial placement (not yet reduced); "
                                 "run the guard after the gradient reduction")
            if not isinstance(pl, (Shard, Replicate)):
                raise ValueError(f"gradient {names[i]!r} has an unsupported placement {pl}")
    if mesh.ndim == 1:
        group = mesh.get_group()
    elif mesh.size() == dist.get_world_size():
        group = None  # the whole world is the mesh
    else:
        raise ValueError("gradguard reduces statistics over 1-D meshes or a mesh spanning all ranks")
    world = dist.get_world_size(group)
    # Replication factor of each tensor over the mesh (1 for plain FSDP2 shards).
    repl = torch.ones(len(grads), dtype=torch.float64, device=sumsq.device)
    sharded_set = set(sharded)
    for i in range(len(grads)):
        if i in sharded_set:
            f = 1
            for d, pl in enumerate(grads[i].placements):
                if isinstance(pl, Replicate):
                    f *= mesh.size(d)
            repl[i] = f
        else:
            repl[i] = world  # a plain tensor is the same on every rank (e.g. DDP-averaged)
    n = sumsq.numel()
    comm_device = torch.device("cpu") if dist.get_backend(group) == "gloo" else sumsq.device
    local = torch.cat([sumsq, maxabs]).to(comm_device)
    gathered = torch.empty(world * 2 * n, dtype=local.dtype, device=comm_device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, local, group=group)
    gathered = gathered.view(world, 2, n).to(sumsq.device, non_blocking=True)
    return gathered[:, 0].sum(0) / repl, gathered[:, 1].amax(0)


def agree_any(bad, xp, comm_device, device, group=None):
    """Every rank skips if any rank must (a NaN loss is per rank): one tiny all-reduce.

    ``bad``: this rank's flag in backend ``xp``; the result is in the same backend.
    """
    import torch.distributed as dist

    flag = xp.tensor(bad).to(comm_device, torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    out = flag[0] > 0
    return xp.asarray(out) if xp.on_host else out.to(device, non_blocking=True)


def world_of(group, device) -> tuple[int, int, torch.device]:
    """``(world size, rank, device of the collectives)`` of ``group``; ``(1, 0, device)``
    outside torch.distributed (gloo communicates through host memory)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1, 0, device
    import torch.distributed as dist

    comm = torch.device("cpu") if dist.get_backend(group) == "gloo" else device
    return dist.get_world_size(group), dist.get_rank(group), comm
