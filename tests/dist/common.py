"""Shared by the torchrun scripts: a tiny iBOT setup, one training step on random crops, and a
module's parameters gathered whole."""

import deepspeed
import torch
import torch.distributed as dist

from trainer.distributed import leave_distributed
from trainer.engine import apply_schedule

TINY = ["run.precision=bf16", "model.arch=vit_test", "model.patch_size=8", "ibot.out_dim=64", "ibot.head_hidden_dim=64",
        "ibot.head_bottleneck_dim=16", "data.batch_size=4", "ibot.freeze_last_layer_steps=0"]


def random_batch(g: torch.Generator) -> dict:
    """2 global 32-pixel crops, 2 local 16-pixel crops, 4 images, 4x4 patch masks."""
    return {"global_crops": torch.randn(2, 4, 3, 32, 32, generator=g).bfloat16(),
            "local_crops": torch.randn(2, 4, 3, 16, 16, generator=g).bfloat16(),
            "masks": torch.rand(2, 4, 4, 4, generator=g) < 0.4}


def train_step(engine, batch: dict, lr: float = 1e-3, weight_decay: float = 0.0, last_layer_lr_factor: float = 1.0):
    apply_schedule(engine.optimizer, {"lr": lr, "weight_decay": weight_decay,
                                      "last_layer_lr_factor": last_layer_lr_factor})
    losses = engine(batch, {"teacher_temp": 0.04, "teacher_patch_temp": 0.07, "step": 0, "micro_step": 0})
    engine.backward(losses["cls"] + losses["mim"])
    engine.step()
    return losses


def gathered(module) -> dict:
    """{name: the whole parameter} of a (ZeRO-3 partitioned) module, one gather at a time."""
    out = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.data.detach().clone()
    return out


COLLECTIVES = ["all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "all_reduce",
               "reduce_scatter_tensor"]


def collectives_during(fn) -> int:
    """Run fn(); -> how many torch.distributed collectives and deepspeed gathers it called."""
    calls = {"n": 0}

    def counting(f):
        def wrapped(*a, **k):
            calls["n"] += 1
            return f(*a, **k)
        return wrapped

    saved = {n: getattr(dist, n) for n in COLLECTIVES}
    gp = deepspeed.zero.GatheredParameters
    for n in COLLECTIVES:
        setattr(dist, n, counting(saved[n]))
    deepspeed.zero.GatheredParameters = counting(gp)
    try:
        fn()
    finally:
        for n in COLLECTIVES:
            setattr(dist, n, saved[n])
        deepspeed.zero.GatheredParameters = gp
    return calls["n"]


def finish():
    """Leave the process group together, as launch.py does after a run (trainer.engine.leave_distributed)."""
    leave_distributed()
