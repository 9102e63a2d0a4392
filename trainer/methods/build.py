"""What every method builds its networks with: the student backbone of `model.*` with the kernels of
`run.kernels`, the frozen CLIP teacher, and the shapes the kernels' self-check runs at."""

from __future__ import annotations

from models.archs import get_arch
from models.kernels import CheckShapes, get_attention, get_attention_varlen, resolve
from models.teachers import FrozenTeacher
from models.vit import VisionTransformer, build_vit

from .base import method_class


def check_shapes(cfg) -> CheckShapes:
    """What the kernels' self-check runs for this config: the model's head dim, each crop's token
    count ([CLS] included) and the method's loss widths (its `loss_classes(cfg)`, if it has one)."""
    head_dim = get_arch(cfg.model.arch).head_dim
    crops = (cfg.data.global_crops, cfg.data.local_crops)
    tokens = tuple(dict.fromkeys((c.size // cfg.model.patch_size) ** 2 + 1 for c in crops if c.number))
    classes = method_class(cfg.method).loss_classes(cfg)
    return CheckShapes(head_dim, tokens or (50,), tuple(classes.get("softmax_ce", ())),
                       tuple(classes.get("hard_ce", ())))


def kernels(cfg, device: str = "cuda") -> str:
    """`run.kernels` as 'triton' or 'torch': 'auto' resolved at this run's shapes on `device`. The
    engine resolves it once, before `zero.Init` and agreed over ranks (trainer.engine.agree_on_kernels),
    and builds the method with the answer; here 'auto' only remains outside a run."""
    return resolve(cfg.run.kernels, check_shapes(cfg), device)[0]


def build_student(cfg, drop_path: float | None = None, pos_embed: str = "learned", **options) -> VisionTransformer:
    """The backbone of `model.*`, with the attention implementations of `run.kernels`; `beit`: the
    `options`: the BEiT options of `build_vit` (layer_scale, rel_pos_bias, qkv_bias, init)."""
    m, impl = cfg.model, kernels(cfg)
    options.setdefault("layer_scale", m.layer_scale)
    options.setdefault("ffn", m.ffn)
    options.setdefault("registers", m.registers)
    options.setdefault("drop_path_uniform", m.drop_path_uniform)
    return build_vit(m.arch, img_size=cfg.data.global_crops.size, patch_size=m.patch_size,
                     drop_path_rate=m.drop_path if drop_path is None else drop_path,
                     attn_fn=get_attention(impl), varlen_fn=get_attention_varlen(impl), pos_embed=pos_embed,
                     pos_interp=m.pos_embed_interp, **options)


def build_frozen_teacher(cfg) -> FrozenTeacher:
    """The frozen teacher's network (weights are loaded by the engine, see models.teachers). A
    replicated one is built whole even inside `zero.Init` (model.sharded_init): DeepSpeed's own
    switch for building outside the context it is in."""
    c = cfg.teacher.clip
    if not c.replicate:
        return FrozenTeacher(c.arch, mean=c.mean, std=c.std, antialias=c.antialias)
    from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context

    shutdown_init_context()
    try:
        return FrozenTeacher(c.arch, mean=c.mean, std=c.std, antialias=c.antialias)
    finally:
        restore_init_context()
