"""Objectives: one module per method, each a registered `Method` (trainer/methods/base.py, the
interface the shared code asks it through), and what every method builds its networks with.

    @register("name")
    class Name(Method): ...

`method_class(name)` is the one lookup by name; nothing outside a method's own module compares
a method's name.
"""

from __future__ import annotations

from models.hivit import HIVIT_ARCHS
from models.kernels import CheckShapes, resolve
from models.kernels.attention import get_attention, get_attention_varlen
from models.teachers import FrozenTeacher
from models.vit import VIT_ARCHS, VisionTransformer, build_vit

from .base import Method

METHODS: dict[str, type[Method]] = {}


def register(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        if not issubclass(cls, Method):
            raise TypeError(f"method {name}: {cls.__name__} must subclass trainer.methods.base.Method")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def check_shapes(cfg) -> CheckShapes:
    """What the kernels' self-check runs for this config: the model's head dim, each crop's token
    count ([CLS] included) and the method's loss widths (its `loss_classes(cfg)`, if it has one)."""
    arch = cfg.model.arch
    if arch in HIVIT_ARCHS:
        width, _, _, heads, _ = HIVIT_ARCHS[arch]
    else:
        width, _, heads, *_ = VIT_ARCHS[arch]
    crops = (cfg.data.global_crops, cfg.data.local_crops)
    tokens = tuple(dict.fromkeys((c.size // cfg.model.patch_size) ** 2 + 1 for c in crops if c.number))
    classes = method_class(cfg.method).loss_classes(cfg)
    return CheckShapes(width // heads, tokens or (50,), tuple(classes.get("softmax_ce", ())),
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
    return build_vit(m.arch, img_size=cfg.data.global_crops.size, patch_size=m.patch_size,
                     drop_path_rate=m.drop_path if drop_path is None else drop_path,
                     attn_fn=get_attention(impl), varlen_fn=get_attention_varlen(impl), pos_embed=pos_embed,
                     pos_interp=m.pos_embed_interp, **options)


def frozen_files(cfg) -> dict[str, str]:
    """The method's frozen networks, attribute -> weights file (Method.frozen_files)."""
    return method_class(cfg.method).frozen_files(cfg)


def replicated_frozen(cfg) -> list[str]:
    """The frozen networks kept whole on every rank, outside the DeepSpeed engine (teacher.clip.replicate)."""
    return [name for name in frozen_files(cfg) if name == "clip_teacher" and cfg.teacher.clip.replicate]


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


from . import beit, dvae, ibot, ibot_clip, itpn, maskalign  # noqa: E402,F401  (register themselves)
