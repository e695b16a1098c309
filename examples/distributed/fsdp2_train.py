"""FSDP2 (fully_shard) + gradguard.  Run:  torchrun --nproc_per_node 2 examples/distributed/fsdp2_train.py

Each rank holds a shard of every gradient (a DTensor).  gradguard computes sums of squares,
max |g| and NaN flags on the local shards and combines them in ONE all-gather per step, so the
logged norms are full-tensor norms (not off by sqrt(shards)), the clip coefficient is the same on
every rank, and a NaN in any rank's shard makes every rank skip.
"""
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import gradguard as gg


def main():
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(4)], nn.Linear(64, 1))
    if backend == "nccl":
        model = model.cuda()
    for block in model:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = gg.Guard(model, optimizer, clip=gg.GlobalNorm(1.0))
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(rank)
    for step in range(50):
        x = torch.randn(16, 64, generator=g).to(device)
        loss = nn.functional.mse_loss(model(x), x.mean(dim=1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        report = guard.step(loss=loss)
        if rank == 0 and step % 10 == 0:
            print(report)  # global_norm is the full-model norm, identical on every rank
    guard.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
