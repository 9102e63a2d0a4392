"""Weight initialisation of one module's own parameters (not its children's).

Used where construction-time init cannot run: a model built under deepspeed.zero.Init is
partitioned module by module, so initialisation written at the end of a parent's __init__ sees
empty tensors. The values follow timm's ViT init and DINO's head init.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from .heads import NormedLinear
from .vit import VisionTransformer


@torch.no_grad()
def init_module_(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_uniform_(module.weight, a=5 ** 0.5)  # torch's default, as timm leaves it
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, NormedLinear):
        trunc_normal_(module.weight, std=0.02)
        if module.scale is not None:
            nn.init.ones_(module.scale)
    elif isinstance(module, VisionTransformer):
        trunc_normal_(module.pos_embed, std=0.02)
        nn.init.normal_(module.cls_token, std=1e-6)
        nn.init.zeros_(module.mask_token)
    # timm's LayerScale sets gamma in its own __init__, before it is partitioned: nothing to redo.
