"""Run under torchrun with 2 ranks: the logged loss terms are the mean over micro-batches and ranks.

Writes a JSON report to argv[1] from rank 0.
"""

import json
import sys

import torch
import torch.distributed as dist

from trainer.loop import mean_over_ranks
from common import finish


def main(report_path):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # rank r saw micro-batch losses (r + 1) and 3 (r + 1): sum 4 (r + 1) over 2 micro-batches
    sums = {"loss": torch.tensor(4.0 * (rank + 1)), "loss_cls": torch.tensor(float(10 * rank))}
    out = mean_over_ranks(sums, count=2)
    if rank == 0:
        json.dump(out, open(report_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
    finish()
