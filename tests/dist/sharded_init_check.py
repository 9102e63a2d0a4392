"""Run under torchrun with 2 ranks: a model built under deepspeed.zero.Init is initialised like a
dense one (timm/DINO init, not PyTorch defaults), the teacher equals the student, and it trains."""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from trainer.config import load_config
from trainer.ds_config import build_ds_config
from common import TINY, finish, random_batch, train_step
from trainer.engine import build_engine, init_distributed


def main(report_path):
    init_distributed()
    cfg = load_config(None, TINY + ["model.sharded_init=true", "model.grad_checkpointing=1"])
    engine, ema = build_engine(cfg, build_ds_config("zero3.json", cfg, dist.get_world_size()), seed=0)
    m = engine.module
    report = {"linear_std": [], "norm_ones": True, "teacher_equals_student": True}
    with deepspeed.zero.GatheredParameters(list(m.parameters())):
        for name, p in m.student.named_parameters():
            if name.endswith("weight") and p.ndim == 2 and "last_layer" not in name:
                report["linear_std"].append(p.float().std().item())
            if "norm" in name and name.endswith("weight"):
                report["norm_ones"] &= bool((p == 1).all())
        for (n, s), (_, t) in zip(m.student.named_parameters(), m.teacher.named_parameters()):
            report["teacher_equals_student"] &= torch.equal(s.data, t.data)
    g = torch.Generator().manual_seed(dist.get_rank())
    batch = random_batch(g)
    losses = train_step(engine, batch, weight_decay=0.04)
    ema.update(0.99)
    report["loss_finite"] = bool(torch.isfinite(losses["cls"] + losses["mim"]))

    # The schedule reaches DeepSpeed's optimizer: a prototype-layer lr factor of 0 (the first
    # epoch's freeze) leaves exactly that layer unchanged while everything else moves.
    from deepspeed.utils import safe_get_local_fp32_param

    def masters():
        return {n: safe_get_local_fp32_param(p).clone() for n, p in m.student.named_parameters()}

    before = masters()
    train_step(engine, batch, lr=1e-2, last_layer_lr_factor=0.0)
    after = masters()
    frozen = [n for n in before if ".last_layer." in n]
    report["last_layer_unchanged"] = bool(frozen) and all(torch.equal(before[n], after[n]) for n in frozen)
    report["others_changed"] = sum(not torch.equal(before[n], after[n]) for n in before if n not in frozen)
    flags = torch.tensor([report["last_layer_unchanged"]], dtype=torch.int)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    report["last_layer_unchanged"] = bool(flags.item())
    if dist.get_rank() == 0:
        json.dump(report, open(report_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1])
    finish()
