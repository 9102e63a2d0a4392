"""Weight initialisation of one module's own parameters (not its children's).

Used where construction-time init cannot run: a model built under deepspeed.zero.Init is
partitioned module by module, so initialisation written at the end of a parent's __init__ sees
empty tensors. The values follow timm's ViT init and DINO's head init. Random values are drawn
in fp32 and then cast: zero.Init may already hold parameters in bf16, where trunc_normal_'s
erfinv is far off (std 0.085 for a requested 0.02).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from .decoders import MaskedDecoder
from .heads import NormedLinear, TokenBatchNorm
from .hivit import HiViT
from .vit import VisionTransformer


def _fill(param: torch.Tensor, fn) -> None:
    tmp = torch.empty(param.shape, dtype=torch.float32, device=param.device)
    fn(tmp)
    param.data.copy_(tmp)


@torch.no_grad()
def init_module_(module: nn.Module) -> None:
    def normal02(t):
        trunc_normal_(t, std=0.02)

    if isinstance(module, NormedLinear):
        module.reset_parameters()  # its own init (nn.Linear's default or std 0.02), drawn in fp32
    if isinstance(module, nn.Linear):
        _fill(module.weight, normal02)
    if isinstance(module, nn.Conv2d):
        _fill(module.weight, lambda t: nn.init.kaiming_uniform_(t, a=5 ** 0.5))  # torch's default, as timm keeps
    if isinstance(module, (nn.LayerNorm, TokenBatchNorm)):
        nn.init.ones_(module.weight)
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm, TokenBatchNorm)) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, VisionTransformer):
        module.init_pos_embed()
        _fill(module.cls_token, lambda t: nn.init.normal_(t, std=1e-6))
        if module.reg_token is not None:  # DINOv2: normal, std 1e-6
            _fill(module.reg_token, lambda t: nn.init.normal_(t, std=1e-6))
        nn.init.zeros_(module.mask_token)
    if isinstance(module, HiViT):
        module.init_pos_embed()
    if isinstance(module, MaskedDecoder):
        _fill(module.mask_token, lambda t: nn.init.normal_(t, std=0.02))
    # timm's LayerScale sets gamma in its own __init__, before it is partitioned: nothing to redo.
