"""Frozen teachers: a CLIP image tower, or a DINO ViT, loaded from a local weights file.

The networks are timm's `VisionTransformer`: open_clip's ViT-B/16, L/14, H/14 and g/14 towers are
timm's `vit_*_clip_*` models, and open_clip checkpoints (the whole CLIP model or its `visual`
tower, `.pt`/`.bin`/`.safetensors`) are converted by timm's own `checkpoint_filter_fn`, the code
timm uses for its CLIP weights. Any timm ViT name works as well, e.g. `vit_base_patch16_224.dino`
with a DINO state dict. Nothing is ever downloaded.

The teacher always runs in eval mode and without gradients. It takes the batch as normalised for
the student, re-normalises it with its own statistics, resizes it so that its patch grid equals
the student's (a /14 teacher behind a /16 student sees 196-pixel views of 224-pixel crops) and
interpolates its position embeddings to that grid.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

# The smallest CLIP tower: `scripts/make_tiny_clip.py` saves a random one in open_clip's format for
# the CPU configs and tests (open_clip's CLIPVisionCfg fields).
TINY_CLIP_VISION = {"width": 64, "layers": 4, "head_width": 16, "patch_size": 8, "image_size": 32}

# open_clip name -> (timm model, overrides). "-quickgelu": OpenAI's weights (open_clip's convention).
TEACHER_ARCHS: dict[str, tuple[str, dict]] = {
    "ViT-B-16": ("vit_base_patch16_clip_224", {}),
    "ViT-B-16-quickgelu": ("vit_base_patch16_clip_quickgelu_224", {}),
    "ViT-L-14": ("vit_large_patch14_clip_224", {}),
    "ViT-L-14-quickgelu": ("vit_large_patch14_clip_quickgelu_224", {}),
    "ViT-H-14": ("vit_huge_patch14_clip_224", {}),
    "ViT-g-14": ("vit_giant_patch14_clip_224", {}),
    "ViT-bigG-14": ("vit_gigantic_patch14_clip_224", {}),
    "clip_vit_tiny": ("vit_base_patch16_clip_224", {
        "embed_dim": TINY_CLIP_VISION["width"], "depth": TINY_CLIP_VISION["layers"],
        "num_heads": TINY_CLIP_VISION["width"] // TINY_CLIP_VISION["head_width"],
        "patch_size": TINY_CLIP_VISION["patch_size"], "img_size": TINY_CLIP_VISION["image_size"]}),
}



@functools.cache
def channel_column(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """[1, 3, 1, 1] fp32 on `device`, made once: torch.tensor(..., device=cuda) per call is a blocking copy."""
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1).to(device)

class FrozenWeightsError(ValueError):
    """A frozen network's weights file is missing, unreadable, or of another architecture; `kind`
    names the network in the one line a run stops with."""

    kind = "frozen network"


class TeacherWeightsError(FrozenWeightsError):
    """The teacher's weights file is missing, unreadable, or of another architecture."""

    kind = "teacher"


def resolve_arch(arch: str) -> tuple[str, dict]:
    """-> (timm model name, constructor overrides); raises ValueError for unknown names."""
    if arch in TEACHER_ARCHS:
        return TEACHER_ARCHS[arch]
    if timm.is_model(arch.split(".")[0]):
        return arch, {}
    raise ValueError(f"{arch!r} is neither an open_clip name ({', '.join(TEACHER_ARCHS)}) nor a timm model")


def build_teacher_vit(arch: str) -> VisionTransformer:
    name, overrides = resolve_arch(arch)
    vit = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **overrides)
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"{arch!r} builds a timm {type(vit).__name__}; frozen teachers must be VisionTransformers")
    return vit


def teacher_depth(arch: str) -> int:
    """Number of blocks, without allocating weights (for config checks)."""
    with torch.device("meta"):
        return len(build_teacher_vit(arch).blocks)


def cls_attention(block: nn.Module, x: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """[CLS] -> patch attention of a timm block for its input x [B, T, C], averaged over heads: [B, N]."""
    attn = block.attn
    B, T, C = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0][:, :, :1]), attn.k_norm(qkv[1])
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)  # [B, H, 1, T]
    return weights.mean(dim=1)[:, 0, num_prefix:]


class FrozenTeacher(nn.Module):
    """A timm ViT that is never trained: per-block patch features and the last block's [CLS] attention."""

    def __init__(self, arch: str, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 antialias: bool = False):
        super().__init__()
        self.arch, self.antialias = arch, antialias
        self.vit = build_teacher_vit(arch)
        # open_clip names: open_clip's (OpenAI's) statistics; timm names: those of the model's tag.
        cfg = {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD} if arch in TEACHER_ARCHS else self.vit.pretrained_cfg
        # Python tuples, not buffers: DeepSpeed would cast buffers to bf16 with the module.
        self.mean = tuple(mean or cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(std or cfg.get("std", (0.229, 0.224, 0.225)))
        self.patch_size = self.vit.patch_embed.patch_size[0]
        self.depth, self.width = len(self.vit.blocks), self.vit.embed_dim
        self.weights_sha256: str | None = None  # set when weights are loaded
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)  # a no_grad module in train mode upsets ZeRO-3 (DeepSpeed #4922)

    def load_weights(self, path: str | Path) -> str:
        """Load `path` strictly (partitioned or not) -> the file's sha256, also kept as `weights_sha256`."""
        return load_teacher_weights(self, path)

    def read_weights(self, path: str | Path) -> dict[str, torch.Tensor]:
        """The file's tensors under this module's own parameter names (what `load_weights` loads)."""
        return convert_state_dict(read_state_dict(path), self, path)

    def prepare(self, images: torch.Tensor, grid: tuple[int, int], mean, std) -> torch.Tensor:
        """Student-normalised images -> this teacher's normalisation, resized to grid * patch."""
        def col(v):
            return channel_column(tuple(float(x) for x in v), images.device)

        x = images.float() * col(std) + col(mean)
        x = (x - col(self.mean)) / col(self.std)
        size = (grid[0] * self.patch_size, grid[1] * self.patch_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=self.antialias)
        return x.to(self.vit.patch_embed.proj.weight.dtype)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, prefix tokens and position embeddings (resampled with `antialias`), then
        the pre-norm: the input of the first block. timm's own `_pos_embed` always antialiases."""
        v = self.vit
        x = v.patch_embed(x)  # [B, h, w, C]
        B, h, w, C = x.shape
        prefix = [t.expand(B, -1, -1) for t in (v.cls_token, v.reg_token) if t is not None]
        pos = resample_abs_pos_embed(v.pos_embed, (h, w), tuple(v.patch_embed.grid_size),
                                     num_prefix_tokens=0 if v.no_embed_class else v.num_prefix_tokens,
                                     antialias=self.antialias)
        x = x.reshape(B, h * w, C)
        if v.no_embed_class:
            x = torch.cat([*prefix, x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
        return v.norm_pre(x)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int], mean, std, blocks: list[int],
                attention: bool = False) -> dict:
        """-> {"blocks": [B, N, C] patch tokens after each block in `blocks` (in that order),
        "cls": [B, C] the [CLS] token after each of those blocks, "cls_attn": [B, N] (with
        `attention`)}. `mean`/`std`: how `images` were normalised."""
        v = self.vit
        x = self.tokens(self.prepare(images, grid, mean, std))
        p = v.num_prefix_tokens
        wanted = {b % self.depth: None for b in blocks}
        out = {}
        for i, block in enumerate(v.blocks):
            if attention and i == self.depth - 1:
                out["cls_attn"] = cls_attention(block, x, p)
            x = block(x)
            if i in wanted:
                wanted[i] = x
        out["blocks"] = [wanted[b % self.depth][:, p:] for b in blocks]
        out["cls"] = [wanted[b % self.depth][:, 0] for b in blocks]
        return out


# --------------------------------------------------------------------------- weights files


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A tensor dict from .safetensors or a torch file (weights_only), unwrapped from the usual
    containers: {"state_dict"|"model"|"teacher": ...}, "module." (DDP) and "backbone." (DINO) prefixes."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise TeacherWeightsError(f"{path}: cannot read teacher weights ({type(e).__name__}: {first})") from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TeacherWeightsError(f"{path}: not a state dict of tensors")
    for prefix in ("module.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # a DINO/iBOT training checkpoint: backbone + head
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def convert_state_dict(sd: dict[str, torch.Tensor], teacher: FrozenTeacher, path: str | Path) -> dict:
    """open_clip / DINO / timm layouts -> the teacher's keys, checked strictly against its shapes."""
    # timm's converter reads shapes off the model; a partitioned (ZeRO-3) model has none, so it
    # converts against a weightless twin on the meta device.
    with torch.device("meta"):
        twin = build_teacher_vit(teacher.arch)
    converted = checkpoint_filter_fn(sd, twin)
    # CLIP's projection to the joint space (timm: head) is not part of the features.
    converted = {f"vit.{k}": v for k, v in converted.items() if not k.startswith("head.")}
    mismatch = state_mismatch(converted, {f"vit.{n}": tuple(p.shape) for n, p in twin.named_parameters()})
    if mismatch:
        raise TeacherWeightsError(
            f"{path}: does not fit teacher architecture {teacher.arch} (depth {teacher.depth}, width "
            f"{teacher.width}, patch {teacher.patch_size}); {mismatch}")
    return converted


def state_mismatch(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> str | None:
    """How `state` fails a strict load into parameters of these shapes, as one phrase naming a few
    missing, unexpected and wrongly shaped keys of each kind; None when it fits."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {expected[k]}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    parts = [f"{name}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
             for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)) if keys]
    return "; ".join(parts) or None


@torch.no_grad()
def load_frozen(module: nn.Module, path: str | Path, read, error: type[ValueError]) -> str:
    """Load the state `read(path)` returns (the module's own parameter names, checked) into a frozen
    `module`, strictly; return the file's sha256. `read` raises `error` for a bad file.

    Under ZeRO-3 partitioning (the module built inside `deepspeed.zero.Init`) only rank 0 reads the
    file; each submodule's parameters are gathered with rank 0 as the modifier, so every rank keeps
    only its slice. A failure on rank 0 is raised on every rank.
    """
    path = Path(path).expanduser()
    partitioned = any(hasattr(p, "ds_id") for p in module.parameters())
    if not partitioned:
        if not path.is_file():
            raise error(f"{path}: weights file not found")
        module.load_state_dict(read(path), strict=True)
        return file_sha256(path)

    import deepspeed
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    state, message = None, [None, None]  # [error, sha256]
    if rank0:
        try:
            if not path.is_file():
                raise error(f"{path}: weights file not found")
            state = read(path)
            message[1] = file_sha256(path)
        except error as e:
            message[0] = str(e)
    dist.broadcast_object_list(message, src=0)
    if message[0]:
        raise error(message[0])
    for prefix, sub in module.named_modules():
        own = list(sub.named_parameters(recurse=False))
        if not own:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
            if rank0:
                for name, p in own:
                    p.data.copy_(state[f"{prefix}.{name}" if prefix else name])
    return message[1]


def load_teacher_weights(teacher: FrozenTeacher, path: str | Path) -> str:
    """Load `path` into `teacher` (strictly, see `load_frozen`) and return the file's sha256."""
    teacher.weights_sha256 = load_frozen(teacher, path, teacher.read_weights, TeacherWeightsError)
    return teacher.weights_sha256


def tiny_clip(seed: int = 0) -> nn.Module:
    """A tiny, randomly initialised CLIP in open_clip's own classes (image and text towers, open_clip's
    key names): the frozen teacher of the CPU configs and the tests, loaded the way a ViT-L/14 file is."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    return CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(**TINY_CLIP_VISION),
                text_cfg=CLIPTextCfg(context_length=16, vocab_size=1000, width=32, heads=2, layers=1))


def save_clip(model: nn.Module, path: str | Path) -> Path:
    """open_clip's state dict to `path`: .pt/.bin/.pth with torch.save, safetensors otherwise;
    written under a temporary name and renamed, so a half-written teacher never has the final name."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix in (".pt", ".bin", ".pth"):
        torch.save(state, tmp)
    else:
        from safetensors.torch import save_file

        save_file(state, str(tmp))
    tmp.replace(path)
    return path
