"""Our ViT backbone as a Hugging Face `transformers` model and as a timm checkpoint.

Our `VisionTransformer` keeps timm's parameter names, so the timm file is the backbone's state dict
without the [MASK] embedding (timm converts any checkpoint with a `mask_token` key as a DINOv2
one). For `transformers` a plain ViT becomes `ViTModel` and a ViT with layer-scale becomes
`Dinov2Model` (ViTModel has no layer-scale): the fused `qkv` projection is split into q, k and v,
and the names follow whichever layout the installed `transformers` uses (it renamed ViT's
submodules in 5.x); the model is built from its config on the meta device, the mapped tensors are
assigned strictly (no missing, no unexpected key) and `save_pretrained` writes the files.

A BEiT backbone (relative position bias, query/value biases, or no absolute position embeddings)
becomes `BeitModel` and, for timm, timm's `Beit` (the `beit_*` models): both follow
microsoft/unilm beit/, whose relative position index ours reproduces (tests/runs/test_beit_chain.py
compares all three), so the bias tables and q/v biases are copied as they are. Neither has a key
bias; a key bias adds q.b_k to every logit of a query's row, which softmax ignores, so a backbone
trained with one (`qkv_bias: qkv`) loses nothing by dropping it.

Differences a user may meet: HF's ViT/DINOv2 resample position embeddings for other input sizes
with their own bicubic call (ours, `pos_interp: dino`, adds DINO's +0.1 offset), so features match
ours exactly at the exported `image_size` and closely elsewhere; `AutoModel` builds ViTModel with
a pooler (a tanh dense layer pretraining never had), which it initialises at random: use
`last_hidden_state[:, 0]` (the [CLS] token after the final norm) as the feature, as kNN does here.
ViTModel creates its [MASK] embedding only when asked (`use_mask_token=True`), so a plain
`AutoModel.from_pretrained(dir)` of an iBOT export reports `embeddings.mask_token` as unused.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from models.archs import VIT_ARCHS
from models.hf_names import layouts
from models.vit import RelativePositionBias, vit_options
from trainer.weights import Backbone, ExportError

TIMM_FILE = "timm_model.safetensors"


def shapes(backbone: Backbone) -> dict:
    """Width, depth, heads, MLP width, patch and image size, read from the tensors (the arch gives heads)."""
    s = backbone.state
    arch = backbone.config["model"]["arch"]
    if arch not in VIT_ARCHS:
        raise ExportError(f"{backbone.checkpoint}: unknown architecture {arch!r} (known: {', '.join(VIT_ARCHS)})")
    width, patch = s["patch_embed.proj.weight"].shape[0], s["patch_embed.proj.weight"].shape[-1]
    if "pos_embed" in s:
        grid = math.isqrt(s["pos_embed"].shape[1] - 1)
    else:  # relative position bias only (BEiT): the crop size it was trained at
        grid = backbone.config["data"]["global_crops"]["size"] // patch
    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    return {"arch": arch, "width": width, "depth": depth, "heads": VIT_ARCHS[arch].heads, "patch": patch,
            "mlp": s["blocks.0.mlp.fc1.weight"].shape[0], "image_size": grid * patch,
            "layer_scale": backbone.layer_scale, **vit_options(s)}


def is_beit(d: dict) -> bool:
    """A backbone (`shapes()`) that only BEiT's layout holds: a relative position bias, attention
    biases other than timm's q/k/v one (q/v, or none: BeitModel's are then zeros), or no absolute
    position embeddings (ViTModel and Dinov2Model always have them)."""
    return d["rel_pos_bias"] != "none" or d["qkv_bias"] != "qkv" or d["pos_embed"] == "none"


def qv_biases(state: dict[str, torch.Tensor], zeros: bool) -> dict[str, torch.Tensor]:
    """Our names with BEiT's attention biases: a fused q/k/v bias becomes `q_bias` + `v_bias` (the key's
    dropped, see the module docstring); with no biases at all, zeros when `zeros` (BeitModel always has them)."""
    out = dict(state)
    for i in range(len({k.split(".")[1] for k in state if k.startswith("blocks.")})):
        a = f"blocks.{i}.attn."
        if a + "qkv.bias" in out:
            out[a + "q_bias"], _, out[a + "v_bias"] = out.pop(a + "qkv.bias").chunk(3)
        elif a + "q_bias" not in out and zeros:
            dim = out[a + "qkv.weight"].shape[0] // 3
            out[a + "q_bias"], out[a + "v_bias"] = torch.zeros(dim), torch.zeros(dim)
    return out


# ---------------------------------------------------------------- transformers

def beit_config(backbone: Backbone, d: dict):
    from transformers import BeitConfig

    # use_mean_pooling=False: `layernorm` is the final norm, applied to every token, so last_hidden_state
    # is what our forward_features returns; BeitPooler then takes the [CLS] token and has no weights
    # (with mean pooling the final norm would move into the pooler, after averaging the patches).
    return BeitConfig(hidden_size=d["width"], num_hidden_layers=d["depth"], num_attention_heads=d["heads"],
                      intermediate_size=d["mlp"], hidden_act="gelu", layer_norm_eps=1e-6, image_size=d["image_size"],
                      patch_size=d["patch"], num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      drop_path_rate=0.0, use_mean_pooling=False, use_mask_token=backbone.uses_mask_token,
                      use_absolute_position_embeddings=d["pos_embed"] != "none",
                      use_relative_position_bias=d["rel_pos_bias"] == "per_block",
                      use_shared_relative_position_bias=d["rel_pos_bias"] == "shared",
                      layer_scale_init_value=backbone.spec.layer_scale_init if backbone.layer_scale else 0.0,
                      vocab_size=backbone.spec.vocab_size or 8192)


def hf_model_and_config(backbone: Backbone):
    """The `transformers` class and config for this backbone (ViTModel, Dinov2Model with layer-scale,
    BeitModel for BEiT's options)."""
    from transformers import BeitModel, Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    d = shapes(backbone)
    if is_beit(d):
        return BeitModel, beit_config(backbone, d), {}
    common = dict(hidden_size=d["width"], num_hidden_layers=d["depth"], num_attention_heads=d["heads"],
                  hidden_act="gelu", layer_norm_eps=1e-6, image_size=d["image_size"], patch_size=d["patch"],
                  num_channels=3, qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if d["ffn"] == "swiglu" or d["registers"]:  # DINOv2's options: only its classes hold them
        return dinov2_model_and_config(backbone, d, common)
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


def dinov2_model_and_config(backbone: Backbone, d: dict, common: dict):
    """Dinov2Model, or Dinov2WithRegistersModel for a backbone with register tokens, with SwiGLU where it
    has one: transformers sizes it from an integer mlp_ratio by DINOv2's rule, so the arch's ratio
    must give the width the tensors have."""
    import transformers
    from transformers import Dinov2Config, Dinov2Model

    from models.vit import swiglu_hidden

    ratio = VIT_ARCHS[d["arch"]].mlp_ratio
    hidden = swiglu_hidden(int(d["width"] * ratio)) * 2 if d["ffn"] == "swiglu" else int(d["width"] * ratio)
    if ratio != int(ratio) or hidden != d["mlp"]:
        raise ExportError(f"{backbone.checkpoint}: transformers' DINOv2 sizes its feed-forward from an integer "
                          f"mlp_ratio; {d['arch']}'s is {ratio:g} ({d['ffn']}, {d['mlp']} wide): no transformers class "
                          "holds it; nothing was written")
    options = dict(mlp_ratio=int(ratio), use_swiglu_ffn=d["ffn"] == "swiglu", layerscale_value=1.0,
                   use_mask_token=backbone.uses_mask_token, **common)
    if not d["registers"]:
        return Dinov2Model, Dinov2Config(**options), {}
    if not hasattr(transformers, "Dinov2WithRegistersModel"):
        raise ExportError(f"{backbone.checkpoint}: a backbone with register tokens needs transformers' "
                          f"Dinov2WithRegistersModel (4.48 and later); transformers {transformers.__version__} "
                          "has none")
    return transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig(
        num_register_tokens=d["registers"], **options), {}


def with_layer_scale(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gammas of 1 for a backbone without layer-scale, for a transformers class that always has it."""
    out = dict(state)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    width = state["cls_token"].shape[-1]
    for i in range(depth):
        for ls in ("ls1", "ls2"):
            out.setdefault(f"blocks.{i}.{ls}.gamma", torch.ones(width))
    return out


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


def to_hf_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], kind: str,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Rename (and split qkv) for the HF model (kind: vit | dinov2 | beit) whose state dict has
    `expected` names and shapes. In fp32 the results are views of our tensors (q, k and v are row
    blocks of qkv), in bf16 a half-size copy; `save_pretrained` copies q, k and v again, as they
    share qkv's storage."""
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    # A relative position index that a transformers version keeps in its state dict (5.x computes it
    # in forward) is a function of the grid, the same as ours: filled in below, not mapped.
    index = {n for n in expected if n.endswith("relative_position_index")}
    for names in layouts(depth, kind):
        wanted = {n for k, targets in names.items() if k in state for n in targets}
        if "embeddings.mask_token" not in expected:
            wanted.discard("embeddings.mask_token")
        if wanted | index == set(expected):
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
    for name in index:
        out[name] = our_relative_position_index(math.isqrt(expected[name][0] - 1))
    return out


@torch.no_grad()
def our_relative_position_index(side: int) -> torch.Tensor:
    """The table row our RelativePositionBias reads for each (query, key) pair of a side x side grid,
    read off its forward with a table whose rows hold their own numbers."""
    rel = RelativePositionBias((side, side), 1)
    rel.relative_position_bias_table.copy_(torch.arange(rel.relative_position_bias_table.shape[0])[:, None])
    return rel()[0].round().long()


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
    kind = {"Dinov2Model": "dinov2", "Dinov2WithRegistersModel": "dinov2", "BeitModel": "beit"}.get(cls.__name__, "vit")
    if kind == "beit":
        state = qv_biases(backbone.state, zeros=True)
    elif kind == "dinov2":
        state = with_layer_scale(backbone.state)
    else:
        state = fold_layer_scale(backbone.state) if backbone.layer_scale and kind == "vit" else dict(backbone.state)
    mapped = to_hf_state(state, expected, kind, dtype)
    del state
    result = model.load_state_dict(mapped, strict=True, assign=True)  # raises on a missing or unexpected key
    assert not result.missing_keys and not result.unexpected_keys
    del mapped
    model.to(dtype)
    model.save_pretrained(out)
    return cls


def save_processor(backbone: Backbone, out: Path, resize: int | None = None) -> None:
    """preprocessor_config.json: what the run's held-out evaluation does (shorter side to `resize`,
    default the crop size as kNN does, bicubic; centre crop) with the run's normalisation."""
    from transformers import BitImageProcessor

    size = shapes(backbone)["image_size"]
    aug = backbone.config["data"]["augment"]
    BitImageProcessor(do_resize=True, size={"shortest_edge": resize or size}, resample=3, do_center_crop=True,
                      crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
                      do_normalize=True, image_mean=list(aug["mean"]), image_std=list(aug["std"]),
                      do_convert_rgb=True).save_pretrained(out)


# ---------------------------------------------------------------- timm

def timm_call(backbone: Backbone) -> tuple[str, dict]:
    """(timm model name, create_model kwargs) that build this backbone: timm's VisionTransformer, or
    its Beit for a BEiT backbone."""
    d = shapes(backbone)
    beit = is_beit(d)
    arch = VIT_ARCHS[d["arch"]]
    registered = arch.timm_beit if beit else arch.timm  # timm's model of these shapes (models/archs.py)
    name = registered or ("beit_base_patch16_224" if beit else "vit_small_patch16_224")
    kwargs: dict = {}
    if registered is None:  # our test/tiny sizes: timm's class with our shapes
        kwargs.update(embed_dim=d["width"], depth=d["depth"], num_heads=d["heads"], mlp_ratio=d["mlp"] / d["width"])
    if f"patch{d['patch']}_" not in name:
        kwargs["patch_size"] = d["patch"]
    kwargs["img_size"] = d["image_size"]
    if beit:  # every option explicit: the registered beit_* models default to per-block bias, no abs, 0.1
        kwargs.update(use_abs_pos_emb=d["pos_embed"] != "none", use_rel_pos_bias=d["rel_pos_bias"] == "per_block",
                      use_shared_rel_pos_bias=d["rel_pos_bias"] == "shared", qkv_bias=d["qkv_bias"] != "none",
                      # 0, not None: create_model drops None kwargs, and beit_* default to layer-scale
                      init_values=backbone.spec.layer_scale_init if backbone.layer_scale else 0.0,
                      global_pool="token")  # Beit's default, avg, moves the final norm after pooling (fc_norm)
    elif backbone.layer_scale:
        kwargs["init_values"] = 1.0  # any value: the file's gammas replace it
    if d["ffn"] == "swiglu":  # timm's own DINOv2 models' layout (vit_giant_patch14_dinov2): fc1 = [gate; up]
        # (+ 0.5: timm takes int(width * mlp_ratio), which float error could put one below the packed width)
        kwargs.update(mlp_layer="SwiGLUPacked", act_layer="silu", mlp_ratio=(d["mlp"] + 0.5) / d["width"])
    if d["registers"]:  # timm holds registers with no_embed_class: positions on the patches alone (timm_state)
        kwargs.update(reg_tokens=d["registers"], no_embed_class=True)
    return name, kwargs


def timm_kwargs(kwargs: dict) -> dict:
    """create_model keywords from the JSON-able ones `timm_call` gives (a layer class by its name)."""
    if kwargs.get("mlp_layer") == "SwiGLUPacked":
        from timm.layers import SwiGLUPacked

        kwargs = {**kwargs, "mlp_layer": SwiGLUPacked}
    return kwargs


# Our BEiT names -> timm Beit's (the rest are the same).
TIMM_BEIT_RENAMES = ((".attn.rel_pos.relative_position_bias_table", ".attn.relative_position_bias_table"),
                     (".ls1.gamma", ".gamma_1"), (".ls2.gamma", ".gamma_2"))


def timm_state(backbone: Backbone, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in backbone.state.items() if k != "mask_token"}
    if "reg_token" in state:  # [CLS] takes its position embedding along (timm's _convert_dinov2 does the same)
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    if is_beit(shapes(backbone)):
        state = qv_biases(state, zeros=False)  # timm's Beit takes qkv_bias=False for none
        for ours, theirs in TIMM_BEIT_RENAMES:
            state = {k.replace(ours, theirs): v for k, v in state.items()}
    return {k: v.to(dtype).contiguous() for k, v in state.items()}


# num_classes=0 in the overlay too: timm loads a file non-strictly when the model's num_classes differs
# from its pretrained config's (it drops the classifier), which would hide a missing or unexpected key.
def timm_snippet(name: str, kwargs: dict, file: str) -> str:
    extra = "".join(f", {k}={'timm.layers.SwiGLUPacked' if k == 'mlp_layer' else repr(v)}" for k, v in kwargs.items())
    return (f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={file!r}, "
            f"custom_load=False, num_classes=0), num_classes=0{extra})")


def load_timm(file: str | Path, name: str, kwargs: dict):
    import timm

    return timm.create_model(name, pretrained=True, num_classes=0,
                             pretrained_cfg_overlay=dict(file=str(file), custom_load=False, num_classes=0),
                             **timm_kwargs(kwargs))
