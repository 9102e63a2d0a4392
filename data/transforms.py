"""DINO/iBOT multi-crop augmentation.

Crops leave the loader as uint8 tensors; `normalize_batch` turns a whole batch into normalised
floats on the consumer's device. Shipping uint8 moves 4x fewer bytes between processes and runs
the normalisation once per batch, on the GPU in training, instead of once per crop on a loader CPU.

All randomness comes from torch's global generator, which the pipeline seeds per sample, so the
crops of a sample are a pure function of its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T


class RandomGaussianBlur:
    """PIL Gaussian blur with a radius drawn from `sigma`, applied with probability `p` (DINO)."""

    def __init__(self, p: float, sigma: tuple[float, float] = (0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p <= 0 or torch.rand(()).item() >= self.p:
            return img
        radius = torch.empty(()).uniform_(*self.sigma).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class RandomSolarize:
    """PIL solarisation (threshold 128) with probability `p`."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p <= 0 or torch.rand(()).item() >= self.p:
            return img
        return ImageOps.solarize(img, threshold=128)


class TwoSizeCrop:
    """BEiT's view (microsoft/unilm beit/datasets.py, transforms.py RandomResizedCropAndInterpolationWithTwoPic):
    colour jitter and flip on the whole image, then one random-resized-crop box cut out twice, at
    `size` (bicubic, for the ViT) and `second_size` (lanczos, for the tokenizer)."""

    def __init__(self, size: int, second_size: int, scale: tuple[float, float], flip_p: float, color_jitter_p: float,
                 color_jitter: Sequence[float]):
        self.size, self.second_size, self.scale = size, second_size, scale
        self.photometric = T.Compose([T.RandomApply([T.ColorJitter(*color_jitter)], p=color_jitter_p),
                                      T.RandomHorizontalFlip(flip_p)])

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.photometric(img)
        top, left, h, w = T.RandomResizedCrop.get_params(img, list(self.scale), [3 / 4, 4 / 3])
        big = T.functional.resized_crop(img, top, left, h, w, [self.size] * 2, T.InterpolationMode.BICUBIC)
        small = T.functional.resized_crop(img, top, left, h, w, [self.second_size] * 2, T.InterpolationMode.LANCZOS)
        return T.functional.pil_to_tensor(big), T.functional.pil_to_tensor(small)


class MultiCrop:
    """One image -> `n_global` global and `n_local` local crops (uint8 CHW tensors).

    Global crop i gets blur probability `blur_p[i]` and solarisation `solarize_p[i]` (iBOT/DINO:
    1.0/0.0 for the first, 0.1/0.2 for the second); local crops get `local_blur_p` and no
    solarisation. Flip, colour jitter and grayscale apply to every crop.
    """

    def __init__(
        self,
        global_size: int = 224,
        global_scale: tuple[float, float] = (0.32, 1.0),
        n_global: int = 2,
        local_size: int = 96,
        local_scale: tuple[float, float] = (0.05, 0.32),
        n_local: int = 10,
        flip_p: float = 0.5,
        color_jitter_p: float = 0.8,
        color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        grayscale_p: float = 0.2,
        blur_p: Sequence[float] = (1.0, 0.1),
        local_blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_p: Sequence[float] = (0.0, 0.2),
        second_size: int | None = None,
    ):
        if len(blur_p) != n_global or len(solarize_p) != n_global:
            raise ValueError(f"blur_p and solarize_p need one entry per global crop ({n_global})")
        bicubic = T.InterpolationMode.BICUBIC
        photometric = [
            T.RandomHorizontalFlip(flip_p),
            T.RandomApply([T.ColorJitter(*color_jitter)], p=color_jitter_p),
            T.RandomGrayscale(grayscale_p),
        ]
        self.global_transforms = [
            T.Compose([
                T.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic),
                *photometric,
                RandomGaussianBlur(blur_p[i], blur_sigma),
                RandomSolarize(solarize_p[i]),
                T.PILToTensor(),
            ])
            for i in range(n_global)
        ]
        self.local_transform = T.Compose([
            T.RandomResizedCrop(local_size, scale=local_scale, interpolation=bicubic),
            *photometric,
            RandomGaussianBlur(local_blur_p, blur_sigma),
            T.PILToTensor(),
        ])
        self.n_local = n_local
        self.global_size, self.local_size, self.second_size = global_size, local_size, second_size
        # BEiT's two-resolution view replaces the global crops' pipeline (no grey-scale, blur or solarisation)
        self.two_sizes = (TwoSizeCrop(global_size, second_size, global_scale, flip_p, color_jitter_p, color_jitter)
                          if second_size else None)

    @classmethod
    def from_config(cls, data: Any) -> MultiCrop:
        """From a `DataConfig`-shaped object (`global_crops`, `local_crops`, `augment`)."""
        g, loc, a = data.global_crops, data.local_crops, data.augment
        return cls(
            global_size=g.size, global_scale=tuple(g.scale), n_global=g.number,
            local_size=loc.size, local_scale=tuple(loc.scale), n_local=loc.number,
            flip_p=a.flip_p, color_jitter_p=a.color_jitter_p, color_jitter=a.color_jitter,
            grayscale_p=a.grayscale_p, blur_p=a.blur_p, local_blur_p=a.local_blur_p,
            blur_sigma=tuple(a.blur_sigma), solarize_p=a.solarize_p, second_size=g.second_size,
        )

    def __call__(self, img: Image.Image) -> tuple[list[torch.Tensor], ...]:
        """-> (global crops, local crops), and with `second_size` the global crops at that size third."""
        if self.two_sizes is not None:
            big, small = zip(*(self.two_sizes(img) for _ in self.global_transforms))
            return list(big), [self.local_transform(img) for _ in range(self.n_local)], list(small)
        global_crops = [t(img) for t in self.global_transforms]
        local_crops = [self.local_transform(img) for _ in range(self.n_local)]
        return global_crops, local_crops


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> (x / 255 - mean) / std in `dtype` (computed in fp32)."""
    shape = (3, 1, 1)
    m = torch.tensor(mean, device=images.device).view(shape) * 255
    s = torch.tensor(std, device=images.device).view(shape) * 255
    out = images.to(torch.float32).sub_(m).div_(s)  # in place: one float tensor, not three
    return out if dtype == torch.float32 else out.to(dtype)


def normalize_batch(batch: dict, mean: Sequence[float], std: Sequence[float],
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Move a loader batch to `device` and normalise its crops there; other entries just move."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key in ("global_crops", "local_crops"):
                value = normalize(value, mean, std, dtype)
        out[key] = value
    return out
