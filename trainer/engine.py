"""Build the method module and wrap it in one DeepSpeed engine (the only place that does).

Order: process group -> method module (under `zero.Init` when `model.sharded_init`) -> frozen
teacher weights -> activation checkpointing -> parameter groups (trainable only) ->
`deepspeed.initialize` -> fp32 centers -> EMA (teacher := student through the local partitions).
"""

from __future__ import annotations

import copy
import logging
import re
from types import SimpleNamespace

import deepspeed
import torch
import torch.nn as nn

from models.init import init_module_
from models.kernels import resolve

from .compile import backbone_blocks, compile_student, gather_blocks_whole
from .config import Config
from .ema import TeacherEMA
from .methods import check_shapes, frozen_files, method_class, replicated_frozen
from .syncs import HOST

log = logging.getLogger(__name__)


def build_method(cfg: Config) -> nn.Module:
    return method_class(cfg.method).from_config(cfg)


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


def param_groups(method: nn.Module, layer_decay: float = 1.0, decay_embeddings: bool = True,
                 patch_embed_lr_mult: float = 1.0) -> list[dict]:
    """The method's trainable parameters (the student and its alignment modules; never a teacher)
    grouped by (weight decay?, lr scale, prototype layer?).

    No weight decay on biases and 1-D parameters (norms, LayerScale), nor on what the method's
    `no_weight_decay()` names (MaskAlign's W); with `decay_embeddings` false, also none on what the
    backbone's `no_weight_decay()` names (position / [CLS] / [MASK] embeddings, timm's convention;
    iBOT, DINO and MAE decay them). `lr_scale` is the layer-wise decay factor (modules beside the
    backbone count as its last layer), 0 for the backbone's `fixed_parameters()` (a sin-cos table);
    `lr_factor` names the scheduled value the group's lr is also multiplied by, where the method's
    `lr_factors` says so (iBOT's prototype layers, held at 0 for the first steps). The patch
    embedding's lr scale is further multiplied by `patch_embed_lr_mult` (DINOv2's 0.2).
    """
    backbone = method.student["backbone"]  # a ViT; the dVAE (method dvae) has no blocks nor embeddings
    no_wd = set(method.no_weight_decay())
    if not decay_embeddings and hasattr(backbone, "no_weight_decay"):
        no_wd |= {f"backbone.{n}" for n in backbone.no_weight_decay()}
    fixed = {f"backbone.{n}" for n in backbone.fixed_parameters()} if hasattr(backbone, "fixed_parameters") else set()
    depth = len(getattr(backbone, "blocks", []))
    factors = getattr(method, "lr_factors", {})
    groups: dict[tuple, dict] = {}
    for full_name, p in method.named_parameters():
        if not p.requires_grad:
            continue
        name = full_name.removeprefix("student.")
        decay = not (p.ndim <= 1 or name.endswith(".bias") or name in no_wd or name in fixed)
        scale = 0.0 if name in fixed else layer_decay ** (depth + 1 - layer_id(name, depth))
        if name.startswith("backbone.patch_embed."):
            scale *= patch_embed_lr_mult
        factor = next((value for part, value in factors.items() if part in name), None)
        key = (decay, scale, factor)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0, "wd_scale": float(decay), "lr_scale": scale,
                           "lr_factor": factor, "names": []}
        groups[key]["params"].append(p)
        groups[key]["names"].append(full_name)
    return list(groups.values())


def apply_schedule(optimizer, values: dict[str, float]) -> None:
    """Write this step's lr and weight decay into every parameter group."""
    for group in optimizer.param_groups:
        lr = values["lr"] * group["lr_scale"]
        if group.get("lr_factor"):
            lr *= values.get(group["lr_factor"], 1.0)
        group["lr"] = lr
        group["weight_decay"] = values["weight_decay"] * group["wd_scale"]


def init_distributed() -> None:
    """The process group (NCCL on GPUs, gloo on the CPU), without DeepSpeed's shared-memory comm op:
    its backend JIT-compiles that C++ op whenever it starts on the CPU (about 20 s on 2 cores before
    the first step of `python launch.py`, on one process as on many), but only its
    `inference_all_reduce` uses it, which training never calls."""
    import importlib

    # (by its module path: the attribute `deepspeed.comm.torch` is PyTorch itself, re-exported)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def agree_on_kernels(cfg: Config, device: torch.device) -> tuple[str, str]:
    """`run.kernels` resolved once per rank, at the run's shapes, and agreed: 'triton' only if every
    rank's self-check passed (ranks that chose differently would pack crops differently, issue
    different ZeRO-3 gathers and hang), with why it fell back, naming the rank. Outside `zero.Init`:
    its patched constructors would make the check's fp32 tensors bf16."""
    shapes = check_shapes(cfg)
    impl, why = resolve(cfg.run.kernels, shapes, str(device))
    if cfg.run.kernels != "auto" or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return impl, why
    reasons = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(reasons, why if impl == "torch" else "")
    failed = [(rank, reason) for rank, reason in enumerate(reasons) if reason]
    if failed:
        rank, reason = failed[0]
        why = f"rank {rank} of {len(reasons)}: {reason}"
        log.warning("run.kernels auto: the PyTorch references on every rank, because on %s", why)
        return "torch", why
    if not failed:
        log.info("run.kernels auto: the Triton kernels on all %d ranks (%s)", len(reasons), shapes.describe())
    return impl, why


def gather_stream(engine):
    """The CUDA stream DeepSpeed's ZeRO-3 all-gathers parameters on (None: no GPU, no stage 3, or the
    compute stream itself), which the EMA's writes to the teacher's partitions must precede. DeepSpeed
    keeps it private (`DeepSpeedZeRoOffload.__allgather_stream`, launched without waiting for the
    compute stream); if a DeepSpeed release renames it, the EMA synchronises instead, and says so."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if not torch.cuda.is_available() or offload is None:
        return None
    stream = getattr(offload, "_DeepSpeedZeRoOffload__allgather_stream", "missing")
    if stream == "missing":
        log.warning("DeepSpeed's all-gather stream not found (DeepSpeed %s): the EMA synchronises the compute "
                    "stream after each update instead", deepspeed.__version__)
        return "synchronize"
    return None if stream is None or stream == torch.cuda.current_stream() else stream


def sentinel_on_host(zero_optimizer) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 makes its invalid-norm sentinel with `torch.tensor(-1.0, device=cuda)`
    once per parameter group per step (stage3.py `get_grad_norm_direct`): a blocking host-to-device
    copy each, 3 of the 4 host waits in its step. A 0-dim CPU tensor is a scalar to `torch.where`, so
    the same sentinel made on the host (`HOST`) gives the same norm with no wait."""
    real = getattr(zero_optimizer, "get_grad_norm_direct", None)
    if real is None or not hasattr(zero_optimizer, "device"):
        return

    def get_grad_norm_direct(*args, **kwargs):
        device, zero_optimizer.device = zero_optimizer.device, HOST
        try:
            return real(*args, **kwargs)
        finally:
            zero_optimizer.device = device

    zero_optimizer.get_grad_norm_direct = get_grad_norm_direct


def build_module(cfg: Config, ds_config: dict, seed: int) -> nn.Module:
    """The method module, initialised; with `model.sharded_init` every network in it (student, heads,
    EMA teacher, frozen teachers) is partitioned from construction on (`zero.Init`), so no rank ever
    holds the whole model. The process group must exist."""
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
        # ... then a network's own init beyond its modules' (BEiT's: models/vit.py), step by step.
        for module in method.student.modules():
            for params, step in getattr(module, "partitioned_init_steps", list)():
                with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
                    if torch.distributed.get_rank() == 0:
                        step()
    else:
        method = build_method(cfg)
    return method


def build_engine(cfg: Config, ds_config: dict, seed: int):
    """-> (DeepSpeed engine, TeacherEMA or None). The process group must exist (`init_distributed`).
    `run.kernels: auto` is resolved first and the method built with the answer."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    impl, _ = agree_on_kernels(cfg, device)
    if impl != cfg.run.kernels:
        cfg = copy.deepcopy(cfg)
        cfg.run.kernels = impl
    method = build_module(cfg, ds_config, seed)
    for name, path in frozen_files(cfg).items():  # before training, so a wrong file stops the run here
        sha = getattr(method, name).load_weights(path)
        log.info("frozen %s loaded from %s (sha256 %s)", name, path, sha[:12])
    if cfg.model.grad_checkpointing:
        method.student.backbone.set_grad_checkpointing(True, every=cfg.model.grad_checkpointing)
    compile_student(method, cfg.run.compile, ds_config.get("zero_optimization", {}).get("stage", 0))
    groups = param_groups(method, cfg.optim.layer_decay, cfg.optim.decay_embeddings, cfg.optim.patch_embed_lr_mult)
    for g in groups:
        g.pop("names")
    # A replicated frozen teacher is kept out of the engine: DeepSpeed would partition it and hook
    # gathers onto it. It goes back in as a plain attribute, not a submodule, so the engine never sees it.
    replicated = {name: method._modules.pop(name) for name in replicated_frozen(cfg)}
    # DeepSpeed binds cuda:LOCAL_RANK unless told the device (`args.device_rank`); the loop chose the
    # one this task can see (trainer.distributed.cuda_index) and made it current.
    args = SimpleNamespace(device_rank=torch.cuda.current_device()) if torch.cuda.is_available() else None
    engine, _, _, _ = deepspeed.initialize(args=args, model=method, model_parameters=groups, config=ds_config)
    sentinel_on_host(engine.optimizer)
    if cfg.run.compile == "blocks" and engine.zero_optimization_stage() == 3:
        gather_blocks_whole(engine, backbone_blocks(engine.module.student["backbone"]))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.precision, torch.float32)
    for name, module in replicated.items():
        object.__setattr__(engine.module, name, module.to(device=engine.device, dtype=dtype))
        log.info("frozen %s whole on every rank (teacher.clip.replicate), never gathered: %.1fM parameters",
                 name, sum(p.numel() for p in module.parameters()) / 1e6)
    # DeepSpeed cast buffers to bf16 with the module; a method's running averages stay fp32.
    for name in engine.module.fp32_buffers:
        buf = engine.module.get_buffer(name)
        buf.data = buf.data.float()
    ema = None
    if hasattr(engine.module, "teacher"):
        if method_class(cfg.method).ema_momentum(cfg) is None:
            raise TypeError(f"method {cfg.method} has an EMA teacher but schedules no momentum (Method.ema_momentum)")
        ema = TeacherEMA(engine.module.student, engine.module.teacher)
        ema.gather_stream = gather_stream(engine)
        ema.copy_student_to_teacher()
        if ema.student_only:
            log.info("EMA teacher has no twin of (student only): %s", ", ".join(ema.student_only))
    n_student = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.student.parameters())
    log.info("engine: ZeRO stage %d, student %.1fM parameters, %d parameter groups",
             engine.zero_optimization_stage(), n_student / 1e6, len(groups))
    return engine, ema
