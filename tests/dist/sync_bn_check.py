"""Run under torchrun with 2 ranks: the head's batch norm with `sum_over_ranks` normalises with the
statistics of every rank's tokens (iBOT's SyncBatchNorm), forward and backward.

Writes a JSON report to argv[1] from rank 0.
"""

import json
import sys

import torch
import torch.distributed as dist

from models.heads import TokenBatchNorm
from trainer.methods.ibot import sum_over_ranks
from common import finish


def main(report_path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    full = torch.randn(world * 6, 5, 8, generator=g) * 3 + 1  # every rank's tokens, [B, N, C]
    grad_out = torch.randn(full.shape, generator=g)
    weight, bias = torch.randn(8, generator=g), torch.randn(8, generator=g)

    bn = TokenBatchNorm(8, all_reduce=sum_over_ranks)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    x = full[rank * 6:(rank + 1) * 6].clone().requires_grad_(True)
    y = bn(x)
    (y * grad_out[rank * 6:(rank + 1) * 6]).sum().backward()
    dist.all_reduce(bn.weight.grad)

    ref = torch.nn.BatchNorm1d(8).train()
    with torch.no_grad():
        ref.weight.copy_(weight)
        ref.bias.copy_(bias)
    xr = full.clone().requires_grad_(True)
    yr = ref(xr.reshape(-1, 8)).view(full.shape)
    (yr * grad_out).sum().backward()
    report = {"y": (y - yr[rank * 6:(rank + 1) * 6]).abs().max().item(),
              "dx": (x.grad - xr.grad[rank * 6:(rank + 1) * 6]).abs().max().item(),
              "dw": (bn.weight.grad - ref.weight.grad).abs().max().item(), "world": world}
    errs = [None] * world
    dist.all_gather_object(errs, report)
    if rank == 0:
        json.dump(errs, open(report_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
    finish()
