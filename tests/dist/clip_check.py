"""Run under torchrun with 2 ranks: per-parameter clipping of DeepSpeed's partitioned gradients
(trainer/grad_clip.py) against iBOT's clip_gradients applied to the gathered gradients.

Writes a JSON report to argv[1] from rank 0; argv[2] names the DeepSpeed config.
"""

import json
import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from common import TINY, finish, random_batch
from trainer.config import load_config
from trainer.ds_config import build_ds_config
from trainer.engine import apply_schedule, build_engine, init_distributed
from trainer.grad_clip import PerParamClip



def ibot_clip_gradients(grads: dict, clip: float) -> dict:
    """bytedance/ibot utils.py clip_gradients, on a dict of whole gradients."""
    out = {}
    for name, g in grads.items():
        param_norm = g.norm(2)
        clip_coef = clip / (param_norm + 1e-6)
        out[name] = g * clip_coef if clip_coef < 1 else g.clone()
    return out


def main(report_path, ds_name="zero3.json"):
    init_distributed()
    cfg = load_config(None, TINY + ["optim.clip_mode=per_param"])
    ds = build_ds_config(ds_name, cfg, dist.get_world_size())
    engine, _ = build_engine(cfg, ds, seed=0)
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(dist.get_rank())  # each rank its own batch: the gradient is their mean
    apply_schedule(engine.optimizer, {"lr": 1e-3, "weight_decay": 0.0, "last_layer_lr_factor": 1.0})
    losses = engine(random_batch(g), {"teacher_temp": 0.04, "teacher_patch_temp": 0.07, "step": 0, "micro_step": 0})
    engine.backward(losses["cls"] + losses["mim"])
    before = {n: safe_get_full_grad(p).float().clone() for n, p in named}
    # the median gradient norm: half the parameters are clipped, half are left alone
    clip = torch.tensor([g.norm().item() for g in before.values()]).median().item()
    expected = ibot_clip_gradients(before, clip)
    norms = PerParamClip(named, clip)(getattr(engine.optimizer, "loss_scale", 1.0))
    after = {n: safe_get_full_grad(p).float().clone() for n, p in named}
    engine.step()
    # relative to each element: the scaled gradient is stored in the gradient buffers' dtype (bf16 here)
    err = max(((after[n] - expected[n]).abs() / (expected[n].abs() + 1e-30)).max().item() for n, _ in named)
    exact = sum(torch.equal(after[n], before[n]) for n, _ in named if before[n].norm().item() <= clip)
    norm_err = max(abs(norms[i].item() - before[n].norm().item()) for i, (n, _) in enumerate(named))
    clipped = sum(before[n].norm().item() > clip for n, _ in named)
    if dist.get_rank() == 0:
        json.dump({"err": err, "unclipped_exact": exact, "norm_err": norm_err, "clipped": clipped, "params": len(named),
                   "max_norm_after": max(after[n].norm().item() for n, _ in named),
                   "clip": clip, "zero3": hasattr(named[0][1], "ds_id"), "applied": engine.was_step_applied(), "world": dist.get_world_size()},
                  open(report_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
    finish()
