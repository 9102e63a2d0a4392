"""Our ViT's tensors (timm's names) under the names `transformers` gives ViTModel, Dinov2Model and
BeitModel, both ways: export/hf.py writes a backbone with them, and a fine-tuning run starts from a
`transformers` directory through `from_hf_state` (theirs, or one exported here).

transformers renamed ViT's submodules in 5.x (`layers.{i}.attention.q_proj`, was
`encoder.layer.{i}.attention.attention.query`), so each kind has one candidate map per naming
scheme; the one whose names a state dict holds is the one used.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import torch

KINDS = ("vit", "dinov2", "dinov2_with_registers", "beit")  # transformers' model_type of the backbones mapped here


def layouts(depth: int, kind: str) -> Iterator[dict[str, list[str]]]:
    """Candidate {our name: [HF names]} maps for a backbone of `kind` (vit | dinov2 | beit) and `depth`
    blocks; a fused q/k/v tensor of ours maps to three of theirs, in that order."""
    return _beit_layouts(depth) if kind == "beit" else _vit_layouts(depth, kind.startswith("dinov2"))


def _vit_layouts(depth: int, dinov2: bool):
    """Candidate {our name: [HF names]} maps, one per naming scheme transformers has used."""
    layers = ("layers.{i}.", "encoder.layer.{i}.")
    attns = (("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),
             ("attention.attention.query", "attention.attention.key", "attention.attention.value",
              "attention.output.dense"))
    # an MLP's fc1 -> one tensor, or a SwiGLU's packed fc1 (timm's [gate; up] halves) -> two
    mlps = ((("mlp.fc1",), "mlp.fc2"), (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
            (("mlp.weights_in",), "mlp.weights_out")) if dinov2 else \
        ((("mlp.fc1",), "mlp.fc2"), (("intermediate.dense",), "output.dense"))
    norms = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
    for layer, attn, mlp in itertools.product(layers, attns, mlps):
        names = {"cls_token": ["embeddings.cls_token"], "pos_embed": ["embeddings.position_embeddings"],
                 "mask_token": ["embeddings.mask_token"], "reg_token": ["embeddings.register_tokens"]}
        for suffix in ("weight", "bias"):
            names[f"patch_embed.proj.{suffix}"] = [f"embeddings.patch_embeddings.projection.{suffix}"]
            names[f"norm.{suffix}"] = [f"layernorm.{suffix}"]
            for i in range(depth):
                ours, hf = f"blocks.{i}.", layer.format(i=i)
                names[ours + f"attn.qkv.{suffix}"] = [hf + f"{a}.{suffix}" for a in attn[:3]]
                names[ours + f"attn.proj.{suffix}"] = [hf + f"{attn[3]}.{suffix}"]
                names[ours + f"norm1.{suffix}"] = [hf + f"{norms[0]}.{suffix}"]
                names[ours + f"norm2.{suffix}"] = [hf + f"{norms[1]}.{suffix}"]
                names[ours + f"mlp.fc1.{suffix}"] = [hf + f"{m}.{suffix}" for m in mlp[0]]
                names[ours + f"mlp.fc2.{suffix}"] = [hf + f"{mlp[1]}.{suffix}"]
        for i in range(depth if dinov2 else 0):
            names[f"blocks.{i}.ls1.gamma"] = [layer.format(i=i) + "layer_scale1.lambda1"]
            names[f"blocks.{i}.ls2.gamma"] = [layer.format(i=i) + "layer_scale2.lambda1"]
        yield names


def _beit_layouts(depth: int):
    """BeitModel's candidate {our name: [HF names]} maps (our state after `qv_biases`): 5.x's flat
    `layers.{i}` with q_proj.. and `shared_position_bias`, or 4.x's `encoder.layer.{i}` with
    attention.attention.query.. and `encoder.relative_position_bias`."""
    layouts = (("layers.{i}.", ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),
                ("mlp.fc1", "mlp.fc2"), "shared_position_bias.", "relative_position_bias."),
               ("encoder.layer.{i}.", ("attention.attention.query", "attention.attention.key",
                                       "attention.attention.value", "attention.output.dense"),
                ("intermediate.dense", "output.dense"), "encoder.relative_position_bias.",
                "attention.attention.relative_position_bias."))
    for layer, attn, mlp, shared, own in layouts:
        names = {"cls_token": ["embeddings.cls_token"], "pos_embed": ["embeddings.position_embeddings"],
                 "mask_token": ["embeddings.mask_token"],
                 "rel_pos_bias.relative_position_bias_table": [shared + "relative_position_bias_table"]}
        for suffix in ("weight", "bias"):
            names[f"patch_embed.proj.{suffix}"] = [f"embeddings.patch_embeddings.projection.{suffix}"]
            names[f"norm.{suffix}"] = [f"layernorm.{suffix}"]
        for i in range(depth):
            ours, hf = f"blocks.{i}.", layer.format(i=i)
            names[ours + "attn.qkv.weight"] = [hf + f"{a}.weight" for a in attn[:3]]
            names[ours + "attn.q_bias"] = [hf + f"{attn[0]}.bias"]
            names[ours + "attn.v_bias"] = [hf + f"{attn[2]}.bias"]
            names[ours + "attn.rel_pos.relative_position_bias_table"] = [hf + own + "relative_position_bias_table"]
            names[ours + "ls1.gamma"], names[ours + "ls2.gamma"] = [hf + "lambda_1"], [hf + "lambda_2"]
            for suffix in ("weight", "bias"):
                names[ours + f"attn.proj.{suffix}"] = [hf + f"{attn[3]}.{suffix}"]
                names[ours + f"norm1.{suffix}"] = [hf + f"layernorm_before.{suffix}"]
                names[ours + f"norm2.{suffix}"] = [hf + f"layernorm_after.{suffix}"]
                names[ours + f"mlp.fc1.{suffix}"] = [hf + f"{mlp[0]}.{suffix}"]
                names[ours + f"mlp.fc2.{suffix}"] = [hf + f"{mlp[1]}.{suffix}"]
        yield names



class LayoutError(ValueError):
    """A state dict whose names no known transformers layout holds."""


def from_hf_state(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """A transformers backbone's state dict (ViTModel / Dinov2Model / BeitModel, or their
    ...ForImageClassification: prefix `vit.`, `dinov2.`, `beit.`) in our names: q, k and v fused into
    `qkv`, BEiT's query and value biases kept as ours (`q_bias`, `v_bias`). Left out: the classifier,
    the pooler, relative position indices (ours computes them) and the [MASK] embedding."""
    if kind not in KINDS:
        raise LayoutError(f"model_type {kind!r}: only {', '.join(KINDS)} backbones are read")
    prefix = f"{kind}."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and not k.endswith("position_index")
             and k != "embeddings.mask_token"}
    depth = len({m.group(2) for k in state if (m := re.match(r"(layers|encoder\.layer)\.(\d+)\.", k))})
    for names in layouts(depth, kind):
        if set(state) <= {t for targets in names.values() for t in targets}:
            break
    else:
        raise LayoutError(f"a {kind} state dict in a layout this version does not know (e.g. {sorted(state)[:4]})")
    out = {}
    for ours, targets in names.items():
        if targets and all(t in state for t in targets):
            out[ours] = torch.cat([state[t] for t in targets]) if len(targets) > 1 else state[targets[0]]
    return out
