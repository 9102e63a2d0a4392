"""Our ViT backbone as a Hugging Face `transformers` model and as a timm checkpoint.

Our `VisionTransformer` keeps timm's parameter names, so the timm file is the backbone's state dict
without the [MASK] embedding (timm converts any checkpoint with a `mask_token` key as a DINOv2
one). For `transformers` a plain ViT becomes `ViTModel` and a ViT with layer-scale becomes
`Dinov2Model` (ViTModel has no layer-scale): the fused `qkv` projection is split into q, k and v,
and the names follow whichever layout the installed `transformers` uses (it renamed ViT's
submodules in 5.x); the model is built from its config on the meta device, the mapped tensors are
assigned strictly (no missing, no unexpected key) and `save_pretrained` writes the files.

Differences a user may meet: HF's ViT/DINOv2 resample position embeddings for other input sizes
with their own bicubic call (ours, `pos_interp: dino`, adds DINO's +0.1 offset), so features match
ours exactly at the exported `image_size` and closely elsewhere; `AutoModel` builds ViTModel with
a pooler (a tanh dense layer pretraining never had), which it initialises at random: use
`last_hidden_state[:, 0]` (the [CLS] token after the final norm) as the feature, as kNN does here.
ViTModel creates its [MASK] embedding only when asked (`use_mask_token=True`), so a plain
`AutoModel.from_pretrained(dir)` of an iBOT export reports `embeddings.mask_token` as unused.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch

from models.vit import VIT_ARCHS

from .weights import Backbone, ExportError

# Registered timm models with our archs' shapes (exact names of our own registry, not substrings).
TIMM_NAMES = {"vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224",
              "vit_large": "vit_large_patch16_224", "vit_huge": "vit_huge_patch14_224",
              "vit_giant": "vit_giant_patch14_224", "vit_gigantic": "vit_gigantic_patch14_224"}
TIMM_FILE = "timm_model.safetensors"


def shapes(backbone: Backbone) -> dict:
    """Width, depth, heads, MLP width, patch and image size, read from the tensors (the arch gives heads)."""
    s = backbone.state
    arch = backbone.config["model"]["arch"]
    if arch not in VIT_ARCHS:
        raise ExportError(f"{backbone.checkpoint}: unknown architecture {arch!r} (known: {', '.join(VIT_ARCHS)})")
    width, patch = s["patch_embed.proj.weight"].shape[0], s["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(s["pos_embed"].shape[1] - 1)
    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    return {"arch": arch, "width": width, "depth": depth, "heads": VIT_ARCHS[arch][2], "patch": patch,
            "mlp": s["blocks.0.mlp.fc1.weight"].shape[0], "image_size": grid * patch,
            "layer_scale": backbone.layer_scale}


# ---------------------------------------------------------------- transformers

def hf_model_and_config(backbone: Backbone):
    """The `transformers` class and config for this backbone (ViTModel, or Dinov2Model with layer-scale)."""
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    d = shapes(backbone)
    common = dict(hidden_size=d["width"], num_hidden_layers=d["depth"], num_attention_heads=d["heads"],
                  hidden_act="gelu", layer_norm_eps=1e-6, image_size=d["image_size"], patch_size=d["patch"],
                  num_channels=3, qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    # Dinov2MLP's width is int(hidden_size * mlp_ratio) and transformers 5.x wants an integer ratio:
    # a layer-scale backbone whose MLP is not a whole multiple of its width (ViT-g/14, ViT-G/14)
    # becomes a ViTModel with the gammas folded into the layers before them (see fold_layer_scale).
    if backbone.layer_scale and d["mlp"] % d["width"] == 0:
        config = Dinov2Config(mlp_ratio=d["mlp"] // d["width"], layerscale_value=1.0, use_swiglu_ffn=False,
                              use_mask_token=backbone.uses_mask_token, **common)
        return Dinov2Model, config, {}
    # ViTModel takes use_mask_token as a constructor argument, not from its config (a config key of
    # that name would swallow the argument): AutoModel.from_pretrained(dir, use_mask_token=True) or
    # ViTForMaskedImageModeling load the [MASK] embedding.
    return ViTModel, ViTConfig(intermediate_size=d["mlp"], encoder_stride=d["patch"], **common), \
        {"add_pooling_layer": False, "use_mask_token": backbone.uses_mask_token}


def fold_layer_scale(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """x + g * (W a + b) = x + (g W) a + g b: each block's gammas multiplied into `attn.proj` and
    `mlp.fc2`, so a model without layer-scale computes the same (up to rounding)."""
    out = {k: v for k, v in state.items() if ".ls1." not in k and ".ls2." not in k}
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        for ls, layer in (("ls1", "attn.proj"), ("ls2", "mlp.fc2")):
            gamma = state[f"blocks.{i}.{ls}.gamma"]
            out[f"blocks.{i}.{layer}.weight"] = gamma[:, None] * state[f"blocks.{i}.{layer}.weight"]
            out[f"blocks.{i}.{layer}.bias"] = gamma * state[f"blocks.{i}.{layer}.bias"]
    return out


def _layouts(depth: int, dinov2: bool):
    """Candidate {our name: [HF names]} maps, one per naming scheme transformers has used."""
    layers = ("layers.{i}.", "encoder.layer.{i}.")
    attns = (("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),
             ("attention.attention.query", "attention.attention.key", "attention.attention.value",
              "attention.output.dense"))
    mlps = (("mlp.fc1", "mlp.fc2"),) if dinov2 else (("mlp.fc1", "mlp.fc2"), ("intermediate.dense", "output.dense"))
    norms = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
    for layer, attn, mlp in itertools.product(layers, attns, mlps):
        names = {"cls_token": ["embeddings.cls_token"], "pos_embed": ["embeddings.position_embeddings"],
                 "mask_token": ["embeddings.mask_token"]}
        for suffix in ("weight", "bias"):
            names[f"patch_embed.proj.{suffix}"] = [f"embeddings.patch_embeddings.projection.{suffix}"]
            names[f"norm.{suffix}"] = [f"layernorm.{suffix}"]
            for i in range(depth):
                ours, hf = f"blocks.{i}.", layer.format(i=i)
                names[ours + f"attn.qkv.{suffix}"] = [hf + f"{a}.{suffix}" for a in attn[:3]]
                names[ours + f"attn.proj.{suffix}"] = [hf + f"{attn[3]}.{suffix}"]
                names[ours + f"norm1.{suffix}"] = [hf + f"{norms[0]}.{suffix}"]
                names[ours + f"norm2.{suffix}"] = [hf + f"{norms[1]}.{suffix}"]
                names[ours + f"mlp.fc1.{suffix}"] = [hf + f"{mlp[0]}.{suffix}"]
                names[ours + f"mlp.fc2.{suffix}"] = [hf + f"{mlp[1]}.{suffix}"]
        for i in range(depth if dinov2 else 0):
            names[f"blocks.{i}.ls1.gamma"] = [layer.format(i=i) + "layer_scale1.lambda1"]
            names[f"blocks.{i}.ls2.gamma"] = [layer.format(i=i) + "layer_scale2.lambda1"]
        yield names


def to_hf_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], dinov2: bool,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Rename (and split qkv) for the HF model whose state dict has `expected` names and shapes. In
    fp32 the results are views of our tensors (q, k and v are row blocks of qkv), in bf16 a
    half-size copy; `save_pretrained` copies q, k and v again, as they share qkv's storage."""
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for names in _layouts(depth, dinov2):
        wanted = {n for k, targets in names.items() if k in state for n in targets}
        if "embeddings.mask_token" not in expected:
            wanted.discard("embeddings.mask_token")
        if wanted == set(expected):
            break
    else:
        import transformers

        raise ExportError(f"transformers {transformers.__version__} names this model's weights in a layout this "
                          f"converter does not know (e.g. {sorted(expected)[:4]})")
    out = {}
    for key in list(state):
        targets = [t for t in names[key] if t in expected]
        if not targets:
            continue
        tensor = state[key]
        pieces = tensor.chunk(len(targets), dim=0) if len(targets) > 1 else (tensor,)
        for t, piece in zip(targets, pieces):
            out[t] = piece.reshape(expected[t]).to(dtype).contiguous()
    return out


def save_hf(backbone: Backbone, out: Path, dtype: torch.dtype) -> type:
    """Write config.json + model.safetensors through `save_pretrained`; returns the model class."""
    cls, config, kwargs = hf_model_and_config(backbone)
    # Provenance, kept in config.json (transformers keeps unknown attributes): evaluate.py reads it.
    config.mimscale = {"method": backbone.config["method"], "weights": backbone.which, "step": backbone.step,
                       "checkpoint": str(backbone.checkpoint),
                       "knn": {k: v for k, v in backbone.summary.items() if k.startswith("knn")}}
    with torch.device("meta"):
        model = cls(config, **kwargs)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    dinov2 = cls.__name__.startswith("Dinov2")
    state = fold_layer_scale(backbone.state) if backbone.layer_scale and not dinov2 else dict(backbone.state)
    mapped = to_hf_state(state, expected, dinov2, dtype)
    del state
    result = model.load_state_dict(mapped, strict=True, assign=True)  # raises on a missing or unexpected key
    assert not result.missing_keys and not result.unexpected_keys
    del mapped
    model.to(dtype)
    model.save_pretrained(out)
    return cls


def save_processor(backbone: Backbone, out: Path) -> None:
    """preprocessor_config.json: what kNN does here (shorter side to the crop size, bicubic, centre
    crop) with the run's normalisation."""
    from transformers import BitImageProcessor

    size = shapes(backbone)["image_size"]
    aug = backbone.config["data"]["augment"]
    BitImageProcessor(do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
                      crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
                      do_normalize=True, image_mean=list(aug["mean"]), image_std=list(aug["std"]),
                      do_convert_rgb=True).save_pretrained(out)


# ---------------------------------------------------------------- timm

def timm_call(backbone: Backbone) -> tuple[str, dict]:
    """(timm model name, create_model kwargs) that build this backbone."""
    d = shapes(backbone)
    name = TIMM_NAMES.get(d["arch"], "vit_small_patch16_224")
    kwargs: dict = {}
    if d["arch"] not in TIMM_NAMES:  # our test/tiny sizes: timm's ViT class with our shapes
        kwargs.update(embed_dim=d["width"], depth=d["depth"], num_heads=d["heads"], mlp_ratio=d["mlp"] / d["width"])
    if f"patch{d['patch']}_" not in name:
        kwargs["patch_size"] = d["patch"]
    kwargs["img_size"] = d["image_size"]
    if backbone.layer_scale:
        kwargs["init_values"] = 1.0  # any value: the file's gammas replace it
    return name, kwargs


def timm_state(backbone: Backbone, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype).contiguous() for k, v in backbone.state.items() if k != "mask_token"}


def timm_snippet(name: str, kwargs: dict, file: str) -> str:
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={file!r}, "
            f"custom_load=False), num_classes=0{extra})")


def load_timm(file: str | Path, name: str, kwargs: dict):
    import timm

    return timm.create_model(name, pretrained=True, num_classes=0,
                             pretrained_cfg_overlay=dict(file=str(file), custom_load=False), **kwargs)
