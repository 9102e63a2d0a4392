"""torchrun --nproc_per_node 2 tests/dist/sharded_memory_check.py REPORT

iBOT + CLIP at ViT-B (student ViT-B/16 + iBOT heads, its EMA teacher, a frozen CLIP ViT-B/16: about
270M parameters) built with model.sharded_init the way the engine builds it (trainer.engine
build_module), before deepspeed.initialize: each rank's local partitions, and the growth of its
resident memory during construction, against the whole model's bytes."""

import ctypes
import gc
import json
import os
import sys

import torch
import torch.distributed as dist

from trainer.config import files_unchecked, load_config
from trainer.ds_config import build_ds_config
from trainer.engine import build_module, init_distributed
from common import finish


def rss() -> int:
    """Resident bytes, after handing freed heap memory back to the system (glibc keeps it otherwise)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(report_path):
    init_distributed()
    overrides = ["model.arch=vit_base", "model.patch_size=16", "data.global_crops.size=224",
                 "data.local_crops.size=96", "teacher.clip.arch=ViT-B-16", "teacher.clip.weights=/nonexistent.bin",
                 "model.sharded_init=true", "run.precision=bf16", "run.kernels=torch"]
    with files_unchecked():  # the CLIP weights are not loaded here: only the construction is measured
        cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "ibot_clip_vit_tiny.yaml"),
                          overrides)
    ds = build_ds_config("zero3.json", cfg, dist.get_world_size())
    gc.collect()
    before = rss()
    method = build_module(cfg, ds, seed=0)
    gc.collect()
    grown = rss() - before
    parts = {}
    for name, child in method.named_children():  # student, teacher, clip_teacher, clip_head
        params = list(child.parameters())
        if not params:
            continue
        parts[name] = {"whole_bytes": sum(p.ds_numel * p.ds_tensor.element_size() for p in params),
                       "local_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params),
                       "unpartitioned": sum(p.numel() > 0 for p in params),
                       "parameters": sum(p.ds_numel for p in params)}
    whole = sum(v["whole_bytes"] for v in parts.values())
    local = sum(v["local_bytes"] for v in parts.values())
    report = {"rank": dist.get_rank(), "parts": parts, "whole_bytes": whole, "local_bytes": local,
              "rss_growth_bytes": grown}
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if dist.get_rank() == 0:
        json.dump(reports, open(report_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1])
    finish()
