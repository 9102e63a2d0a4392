"""Run under torchrun with 2 ranks: a fine-tuning classifier built partitioned (model.sharded_init)
starts from the pretrained teacher exactly, its head drawn and scaled as when built whole.
argv: the pretraining run, the data cache, the report path."""

import json
import sys

import torch
import torch.distributed as dist

from common import finish, gathered
from trainer.config import load_config
from trainer.ds_config import build_ds_config
from trainer.engine import build_engine, init_distributed
from trainer.weights import read_backbone


def main(run, cache, report_path):
    init_distributed()
    cfg = load_config("configs/finetune_vit_tiny.yaml", [f"finetune.init={run}", f"data.cache_dir={cache}",
                                                         "model.arch=vit_test", "model.sharded_init=true"])
    engine, _ = build_engine(cfg, build_ds_config("zero3.json", cfg, dist.get_world_size()), seed=0)
    ours = gathered(engine.module.student)
    teacher = read_backbone(run, "teacher").state
    report = {"partitioned": all(hasattr(p, "ds_id") for p in engine.module.parameters()),
              "differ": sorted(k for k, v in teacher.items() if not torch.equal(ours[f"backbone.{k}"], v)),
              "head_std": ours["head.weight"].float().std().item(), "head_bias_zero": bool((ours["head.bias"] == 0).all())}
    if dist.get_rank() == 0:
        json.dump(report, open(report_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
    finish()
