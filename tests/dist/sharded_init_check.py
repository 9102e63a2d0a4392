"""Run under torchrun with 2 ranks: a model built under deepspeed.zero.Init is initialised like a
dense one (timm/DINO init, not PyTorch defaults), the teacher equals the student, and it trains."""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from trainer.config import load_config
from trainer.ds_config import build_ds_config
from trainer.engine import apply_schedule, build_engine, init_distributed


def main(report_path):
    init_distributed()
    cfg = load_config(None, ["model.arch=vit_test", "model.patch_size=8", "ibot.out_dim=64", "ibot.head_hidden_dim=64",
                             "ibot.head_bottleneck_dim=16", "data.batch_size=4", "model.sharded_init=true",
                             "model.grad_checkpointing=1"])
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
    apply_schedule(engine.optimizer, {"lr": 1e-3, "weight_decay": 0.04, "last_layer_lr_factor": 1.0})
    batch = {"global_crops": torch.randn(2, 4, 3, 32, 32, generator=g).bfloat16(),
             "local_crops": torch.randn(2, 4, 3, 16, 16, generator=g).bfloat16(),
             "masks": torch.rand(2, 4, 4, 4, generator=g) < 0.4}
    losses = engine(batch, teacher_temp=0.04)
    engine.backward(losses["cls"] + losses["mim"])
    engine.step()
    ema.update(0.99)
    report["loss_finite"] = bool(torch.isfinite(losses["cls"] + losses["mim"]))
    if dist.get_rank() == 0:
        json.dump(report, open(report_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1])
