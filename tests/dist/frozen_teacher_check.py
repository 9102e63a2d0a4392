"""Run under torchrun with 2 ranks (ZeRO-3): iBOT+CLIP's frozen teacher is partitioned, frozen and
left out of checkpoints; the EMA teacher exports from its shadow slices.

argv: report.json, CLIP weights file, checkpoint directory. Rank 0 writes the report and
`teacher_backbone.pt` (the gathered EMA teacher backbone) beside it.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from common import finish, gathered, random_batch
from models.teachers import convert_state_dict, read_state_dict
from trainer.checkpoint import Checkpointer
from trainer.config import load_config, to_dict
from trainer.ds_config import build_ds_config
from trainer.engine import apply_schedule, build_engine, init_distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = ["run.precision=bf16", "model.arch=vit_test", "model.patch_size=8", "ibot.out_dim=64", "ibot.head_hidden_dim=64",
        "ibot.head_bottleneck_dim=16", "data.batch_size=4", "ibot.freeze_last_layer_steps=0", "model.sharded_init=true"]


def main(report_path, clip_path, ckpt_dir):
    init_distributed()
    cfg = load_config(ROOT / "configs" / "ibot_clip_vit_tiny.yaml", [*TINY, f"teacher.clip.weights={clip_path}"])
    engine, ema = build_engine(cfg, build_ds_config("zero3.json", cfg, dist.get_world_size()), seed=0)
    method = engine.module
    clip = method.clip_teacher
    params = list(clip.parameters())
    local, total = sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
    from_file = convert_state_dict(read_state_dict(clip_path), clip, clip_path)
    before = gathered(clip)
    matches_file = all(torch.equal(before[k], from_file[k].to(before[k].dtype)) for k in before)

    g = torch.Generator().manual_seed(dist.get_rank())
    losses = []
    for step in range(3):
        apply_schedule(engine.optimizer, {"lr": 1e-3, "weight_decay": 0.0, "last_layer_lr_factor": 1.0})
        values = {"teacher_temp": 0.04, "teacher_patch_temp": 0.07, "step": step, "micro_step": step}
        out = engine(random_batch(g), values)
        loss = sum(method.loss_weights[k] * v for k, v in out.items())
        engine.backward(loss)
        engine.step()
        ema.update(0.9)
        losses.append({k: v.item() for k, v in out.items()})
    after = gathered(clip)
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    no_grads = all(p.grad is None for p in params) and not any(p.requires_grad for p in params)
    in_optimizer = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    teacher_backbone = {k: v.float() for k, v in gathered(method.teacher.backbone).items()}

    ckpt = Checkpointer(ckpt_dir, keep=1)
    ckpt.save(engine, 3, {"ema": ema.state_dict(), "config": json.dumps(to_dict(cfg))})
    if dist.get_rank() == 0:
        torch.save(teacher_backbone, Path(report_path).with_name("teacher_backbone.pt"))
        Path(report_path).write_text(json.dumps({
            "world": dist.get_world_size(), "local_fraction": local / total, "matches_file": matches_file,
            "unchanged": unchanged, "no_grads": no_grads, "clip_eval": not clip.training,
            "clip_in_optimizer": any(id(p) in in_optimizer for p in params), "losses": losses,
            "sha256": clip.weights_sha256}))
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
    finish()
