"""Any backbone we can evaluate, behind one call: [CLS] and patch features of normalised images.

Sources: a run directory, a checkpoint (tag directory or `checkpoints/latest`), an exported
`transformers` directory (config.json), or an exported timm file (`*.safetensors` whose metadata
names its timm model). Each comes with the resolution and normalisation it was trained with.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn


@dataclass
class LoadedBackbone:
    model: nn.Module
    kind: str  # "mimscale" | "transformers" | "timm"
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    results_file: Path  # where evaluation results are appended
    num_prefix_tokens: int = 1
    run_config: dict | None = None  # the training run's config, when loaded from a run or checkpoint
    step: int | None = None
    method: str | None = None  # the pretraining method, where known (picks the pooled feature)
    run_knn: dict | None = None  # the run's own kNN: trained, random init, raw pixels (what to compare with)

    @property
    def default_pool(self) -> str:
        """The feature its method is evaluated on (Method.knn_pool); [CLS] where the method is unknown."""
        from trainer.methods import method_class

        try:
            return method_class(self.method or "").knn_pool
        except ValueError:
            return "cls"

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: normalised images [B, 3, S, S] -> {"cls": [B, C], "patch": [B, N, C]}, after the final norm."""
        x = x.to(next(self.model.parameters()).dtype)
        if self.kind == "mimscale":
            out = self.model.forward_features(x)
            return {"cls": out["cls"], "patch": out["patch"]}
        tokens = self.model(pixel_values=x).last_hidden_state if self.kind == "transformers" \
            else self.model.forward_features(x)
        return {"cls": tokens[:, 0], "patch": tokens[:, self.num_prefix_tokens:]}


    @property
    def depth(self) -> int:
        """Its number of blocks."""
        if self.kind == "transformers":
            return self.model.config.num_hidden_layers
        return len(self.model.blocks)

    @torch.no_grad()
    def block_tokens(self, x: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """x: normalised images -> the last `n` blocks' ([CLS] [B, C], patch tokens [B, N, C]), oldest
        first, each through the final norm (DINOv2's get_intermediate_layers(norm=True))."""
        x = x.to(next(self.model.parameters()).dtype)
        if not 1 <= n <= self.depth:
            raise ValueError(f"the last {n} blocks of a {self.depth}-block network")
        if self.num_prefix_tokens == 0:
            raise ValueError(f"{self.source} has no [CLS] token (HiViT): the linear grid reads [CLS] tokens")
        if self.kind == "mimscale":
            tokens = [self.model.norm(t) for t in self.model.forward_features(x, blocks=list(range(-n, 0)))["blocks"]]
        elif self.kind == "transformers":
            hidden = self.model(pixel_values=x, output_hidden_states=True).hidden_states[-n:]  # before the final norm
            tokens = [self.model.layernorm(h) for h in hidden]
        else:  # timm: [CLS] (and registers) and patches of each block, normalised
            out = self.model.get_intermediate_layers(x, n=n, return_prefix_tokens=True, norm=True)
            tokens = [torch.cat([prefix, patch], dim=1) for patch, prefix in out]
        return [(t[:, 0], t[:, self.num_prefix_tokens:]) for t in tokens]


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """||ours - theirs|| / ||ours||: what export's checks compare features and logits by."""
    return ((ours.float() - theirs.float()).norm() / ours.float().norm().clamp_min(1e-12)).item()


def from_backbone(backbone) -> LoadedBackbone:
    """An `trainer.weights.Backbone` (fp32 state in our layout) as our own `VisionTransformer`, or
    for iTPN our HiViT with its pyramid (models.pyramid.HiViTFPN)."""
    from export.hf import shapes
    from models.vit import build_vit

    if backbone.spec.format == "itpn":
        return _itpn(backbone)
    if backbone.spec.format == "classifier":
        backbone = classifier_backbone(backbone)
    d = shapes(backbone)
    with torch.device("meta"):
        model = build_vit(d["arch"], img_size=d["image_size"], patch_size=d["patch"],
                          layer_scale=1.0 if backbone.layer_scale else None,
                          pos_interp=backbone.config["model"].get("pos_embed_interp", "dino"),
                          rel_pos_bias=d["rel_pos_bias"], qkv_bias=d["qkv_bias"], pos_embed=d["pos_embed"],
                          ffn=d["ffn"], registers=d["registers"])
    model.load_state_dict(backbone.state, strict=True, assign=True)
    aug = backbone.config["data"]["augment"]
    return LoadedBackbone(model.eval(), "mimscale", d["image_size"], tuple(aug["mean"]), tuple(aug["std"]),
                          f"{backbone.checkpoint} ({backbone.which})", backbone.checkpoint.parents[1] / "metrics.jsonl",
                          run_config=backbone.config, step=backbone.step, method=backbone.method.name,
                          run_knn={k: v for k, v in backbone.summary.items() if k.startswith("knn")})


def classifier_backbone(backbone):
    """A fine-tuned classifier's backbone alone (its `backbone.*` tensors), with a final norm as our ViT
    is built: under average pooling fine-tuning replaced it by fc_norm, so an identity one (weight 1,
    bias 0) stands in."""
    state = {k[len("backbone."):]: v for k, v in backbone.state.items() if k.startswith("backbone.")}
    if "norm.weight" not in state:
        width = state["cls_token"].shape[-1]
        state.update({"norm.weight": torch.ones(width), "norm.bias": torch.zeros(width)})
    return dataclasses.replace(backbone, state=state)


def _itpn(backbone) -> LoadedBackbone:
    from models.pyramid import build_itpn

    arch = backbone.spec.arch
    with torch.device("meta"):
        model = build_itpn(arch)
    model.load_state_dict(backbone.state, strict=True, assign=True)
    aug = backbone.config["data"]["augment"]
    return LoadedBackbone(model.eval(), "mimscale", arch["image_size"], tuple(aug["mean"]), tuple(aug["std"]),
                          f"{backbone.checkpoint} ({backbone.which})", backbone.checkpoint.parents[1] / "metrics.jsonl",
                          num_prefix_tokens=0, run_config=backbone.config, step=backbone.step,
                          method=backbone.method.name,
                          run_knn={k: v for k, v in backbone.summary.items() if k.startswith("knn")})


def load_backbone(path: str | Path, which: str = "auto", dtype: torch.dtype = torch.float32) -> LoadedBackbone:
    path = Path(path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        from transformers import AutoImageProcessor, AutoModel

        config = json.loads((path / "config.json").read_text())
        # ViTModel's pooler is a tanh layer pretraining never had: leave it out rather than initialise it
        extra = {"add_pooling_layer": False} if config.get("model_type") == "vit" else {}
        model = AutoModel.from_pretrained(path, dtype=dtype, **extra).eval()
        proc = AutoImageProcessor.from_pretrained(path)
        size = proc.crop_size["height"] if getattr(proc, "do_center_crop", False) else proc.size["height"]
        info = config.get("mimscale", {})
        return LoadedBackbone(model, "transformers", size, tuple(proc.image_mean), tuple(proc.image_std), str(path),
                              path / "eval_results.jsonl", 1 + config.get("num_register_tokens", 0),
                              step=info.get("step"), method=info.get("method"), run_knn=info.get("knn"))
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        from export.hf import load_timm

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") == "mimscale-itpn":  # backbone + pyramid, rebuilt by models.hivit
            from export.itpn import load_itpn

            model, info = load_itpn(path)
            aug = info.get("mean"), info.get("std")
            return LoadedBackbone(model.to(dtype), "mimscale", info["itpn_arch"]["image_size"], tuple(aug[0]),
                                  tuple(aug[1]), str(path), path.parent / "eval_results.jsonl", num_prefix_tokens=0,
                                  step=info.get("step"), method=info.get("method"), run_knn=info.get("knn"))
        if "timm_name" not in meta:
            raise ValueError(f"{path} has no timm_name in its metadata: not a file written by convert_to_hf.py")
        model = load_timm(path, meta["timm_name"], json.loads(meta["timm_kwargs"])).to(dtype).eval()
        return LoadedBackbone(model, "timm", int(meta["image_size"]), tuple(json.loads(meta["mean"])),
                              tuple(json.loads(meta["std"])), str(path), path.parent / "eval_results.jsonl",
                              model.num_prefix_tokens, step=int(meta["step"]) if "step" in meta else None,
                              method=meta.get("method"), run_knn=json.loads(meta.get("knn", "{}")))
    from trainer.weights import read_backbone

    loaded = from_backbone(read_backbone(path, which))
    loaded.model.to(dtype)
    return loaded
