"""DDP + gradguard.  Run:  torchrun --nproc_per_node 2 examples/distributed/ddp_train.py

Gradients are averaged by DDP before guard.step() sees them, so every rank computes the same
statistics and takes the same decision; a NaN loss on one rank makes every rank skip.
Only rank 0 writes the run store (log_rank=0, the default).
"""
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradguard as gg


def main():
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)).to(device)
    ddp = DDP(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    guard = gg.Guard(model, optimizer, clip=gg.GlobalNorm(1.0), log_dir=os.environ.get("GG_LOG_DIR"))
    g = torch.Generator().manual_seed(rank)
    for step in range(50):
        x = torch.randn(16, 32, generator=g).to(device)
        y = x.sum(dim=1, keepdim=True)
        loss = nn.functional.mse_loss(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        report = guard.step(loss=loss)
        if rank == 0 and step % 10 == 0:
            print(report)
    guard.close()
    if rank == 0:
        print(f"skipped {guard.skipped_steps} steps; events: {len(guard.events)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
