"""Run under torchrun with 2 ranks: the shard-local EMA against a dense fp32 EMA (and a bf16-only one).

Writes a JSON report to argv[1] from rank 0.
"""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from trainer.config import load_config
from trainer.ds_config import build_ds_config
from common import TINY, collectives_during, finish, random_batch, train_step
from trainer.engine import build_engine, init_distributed

MOMENTUM = 0.9995
STEPS = 20


def gathered(params):
    out = []
    for p in params:
        with deepspeed.zero.GatheredParameters([p]):
            out.append(p.data.detach().float().clone())
    return out


def main(report_path, ds_name="zero3.json"):
    init_distributed()
    cfg = load_config(None, TINY)
    ds = build_ds_config(ds_name, cfg, dist.get_world_size())
    engine, ema = build_engine(cfg, ds, seed=0)
    students = list(engine.module.student.parameters())
    teachers = list(engine.module.teacher.parameters())
    zero3 = hasattr(teachers[0], "ds_tensor")
    partitioned = zero3 and all(t.ds_tensor.numel() < t.ds_numel for t in teachers if t.ds_numel >= 2)

    # the masters are read in place: views of the optimizer's flat fp32 partitions (no copy, no sync)
    flats = {t.untyped_storage().data_ptr() for t in getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])}
    masters_in_place = zero3 and all(ema._student_local(p).untyped_storage().data_ptr() in flats for p in ema.students)
    shadow_devices = sorted({str(s.device) for s in ema.shadow})
    dense = [safe_get_full_fp32_param(p).float().clone() for p in students]  # fp32 EMA reference
    start = [d.clone() for d in dense]
    rounding = 0.0  # largest bf16 rounding error of a student master weight seen
    bf16_only = [d.bfloat16() for d in dense]  # what a bf16 EMA would hold
    g = torch.Generator().manual_seed(dist.get_rank())
    collectives = 0
    for step in range(STEPS):
        train_step(engine, random_batch(g))
        collectives += collectives_during(lambda: ema.update(MOMENTUM))
        full = [safe_get_full_fp32_param(p).float() for p in students]
        rounding = max(rounding, max((f - f.bfloat16().float()).abs().max().item() for f in full))
        for d, b, s in zip(dense, bf16_only, full):
            d.mul_(MOMENTUM).add_(s, alpha=1 - MOMENTUM)
            b.copy_((b * MOMENTUM + s.bfloat16() * (1 - MOMENTUM)).bfloat16())

    teacher_now = gathered(teachers)
    # the shadow slices of all ranks, put back together: the fp32 EMA itself
    shadow_full = []
    for sh, p in zip(ema.shadow, students):
        if not zero3:  # whole parameters on every rank
            shadow_full.append(sh.view_as(p))
            continue
        parts = [torch.empty_like(sh) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, sh)
        shadow_full.append(torch.cat(parts)[: p.ds_numel].view(p.ds_shape))
    err_shadow = max((s - d).abs().max().item() for s, d in zip(shadow_full, dense))
    teacher_is_cast = all(torch.equal(t, s.bfloat16().float()) for t, s in zip(teacher_now, shadow_full))
    err_ours = max((t - d).abs().max().item() for t, d in zip(teacher_now, dense))
    err_bf16 = max((b.float() - d).abs().max().item() for b, d in zip(bf16_only, dense))
    # how far the EMA actually moved, and how much of the bf16-only teacher never moved at all
    moved = max((d - s0).abs().max().item() for d, s0 in zip(dense, start))
    frozen = sum((b.float() == s0.bfloat16().float()).sum().item() for b, s0 in zip(bf16_only, start))
    frozen /= sum(b.numel() for b in bf16_only)
    if dist.get_rank() == 0:
        json.dump({"partitioned": partitioned, "err_ours": err_ours, "err_shadow": err_shadow,
                   "teacher_is_cast_of_shadow": teacher_is_cast, "err_bf16": err_bf16, "moved": moved, "bf16_frozen_fraction": frozen,
                   "bf16_read_bound": (1 - MOMENTUM ** STEPS) * rounding,
                   "collectives_in_update": collectives, "masters_in_place": masters_in_place,
                   "shadow_devices": shadow_devices, "world": dist.get_world_size(), "zero3": zero3},
                  open(report_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
    finish()
