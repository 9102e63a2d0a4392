"""Build the method module and wrap it in one DeepSpeed engine (the only place that does).

Order: process group -> method module (under `zero.Init` when `model.sharded_init`) ->
activation checkpointing -> parameter groups (student only) -> `deepspeed.initialize` ->
fp32 centers -> EMA (teacher := student through the local partitions).
"""

from __future__ import annotations

import logging
import re

import deepspeed
import torch
import torch.nn as nn

from models.heads import IBOTHead
from models.init import init_module_
from models.kernels.attention import get_attention
from models.vit import build_vit

from .config import Config
from .ema import TeacherEMA
from .methods import METHODS

log = logging.getLogger(__name__)


def build_method(cfg: Config) -> nn.Module:
    m, i = cfg.model, cfg.ibot
    attn_fn = get_attention(cfg.run.kernels)

    def backbone(drop_path: float):
        return build_vit(m.arch, img_size=cfg.data.global_crops.size, patch_size=m.patch_size,
                         drop_path_rate=drop_path, layer_scale=m.layer_scale, attn_fn=attn_fn)

    def head(width: int):
        return IBOTHead(width, i.out_dim, i.patch_out_dim, shared=i.shared_head, hidden_dim=i.head_hidden_dim,
                        bottleneck_dim=i.head_bottleneck_dim, norm_last_layer=i.norm_last_layer)

    student, teacher = backbone(m.drop_path), backbone(0.0)
    out_dim, patch_dim = i.out_dim, (i.out_dim if i.shared_head else i.patch_out_dim)
    return METHODS[cfg.method](student, head(student.embed_dim), teacher, head(teacher.embed_dim),
                               out_dim, patch_dim, i.student_temp, i.center_momentum)


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings, i + 1 for block i, depth + 1 for the final norm and the head."""
    if name.startswith("backbone."):
        rest = name[len("backbone."):]
        if rest.startswith(("cls_token", "pos_embed", "mask_token", "patch_embed", "reg_token")):
            return 0
        match = re.match(r"blocks\.(\d+)\.", rest)
        if match:
            return int(match.group(1)) + 1
    return depth + 1


def param_groups(student: nn.ModuleDict, layer_decay: float = 1.0) -> list[dict]:
    """Student parameters grouped by (weight decay?, lr scale, prototype layer?).

    No weight decay on biases, norms, position / [CLS] / [MASK] embeddings. `lr_scale` is the
    layer-wise decay factor; `last_layer` marks the prototypes, frozen for the first steps.
    """
    backbone = student["backbone"]
    no_wd = {f"backbone.{n}" for n in backbone.no_weight_decay()}
    depth = len(backbone.blocks)
    groups: dict[tuple, dict] = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith(".bias") or name in no_wd)
        scale = layer_decay ** (depth + 1 - layer_id(name, depth))
        last = ".last_layer." in name
        key = (decay, scale, last)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0, "wd_scale": float(decay), "lr_scale": scale,
                           "last_layer": last, "names": []}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def apply_schedule(optimizer, values: dict[str, float]) -> None:
    """Write this step's lr and weight decay into every parameter group."""
    for group in optimizer.param_groups:
        lr = values["lr"] * group["lr_scale"]
        if group["last_layer"]:
            lr *= values["last_layer_lr_factor"]
        group["lr"] = lr
        group["weight_decay"] = values["weight_decay"] * group["wd_scale"]


def init_distributed() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def build_engine(cfg: Config, ds_config: dict, seed: int):
    """-> (DeepSpeed engine, TeacherEMA). The process group must exist (`init_distributed`)."""
    torch.manual_seed(seed)  # the same initial weights on every rank
    if cfg.model.sharded_init:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            method = build_method(cfg)
        # Module-level init code ran on already-partitioned (empty) tensors: initialise each
        # leaf's own parameters again, gathered with a modifier rank so the writes persist.
        torch.manual_seed(seed)
        for module in method.student.modules():
            own = list(module.parameters(recurse=False))
            if own:
                with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                    if torch.distributed.get_rank() == 0:
                        init_module_(module)
    else:
        method = build_method(cfg)
    if cfg.model.grad_checkpointing:
        method.student.backbone.set_grad_checkpointing(True, every=cfg.model.grad_checkpointing)
    groups = param_groups(method.student, cfg.optim.layer_decay)
    for g in groups:
        g.pop("names")
    engine, _, _, _ = deepspeed.initialize(model=method, model_parameters=groups, config=ds_config)
    # DeepSpeed cast buffers to bf16 with the module; the centers are averages and stay fp32.
    for name, buf in engine.module.named_buffers():
        if name.startswith("center"):
            buf.data = buf.data.float()
    ema = TeacherEMA(engine.module.student, engine.module.teacher)
    ema.copy_student_to_teacher()
    n_student = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.student.parameters())
    log.info("engine: ZeRO stage %d, student %.1fM parameters, %d parameter groups",
             engine.zero_optimization_stage(), n_student / 1e6, len(groups))
    return engine, ema
