"""DINO/iBOT multi-crop augmentation.

Crops leave the loader as uint8 tensors; `normalize_batch` turns a whole batch into normalised
floats on the consumer's device. Shipping uint8 moves 4x fewer bytes between processes and runs
the normalisation once per batch, on the GPU in training, instead of once per crop on a loader CPU.
With `photometric="device"` the colour work (jitter, grayscale, blur, solarisation: three quarters
of the loader's CPU time on ImageNet-sized photos) moves there too, bit-identical.

All randomness comes from torch's global generator, which the pipeline seeds per sample, so the
crops of a sample are a pure function of its seed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from . import photometric


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


class Views(NamedTuple):
    """One image's crops (uint8 CHW tensors). With the colour work deferred to the consumer, each crop's
    parameter row (data/photometric.py) comes with it and the crops are only cropped and flipped."""

    global_crops: list[torch.Tensor]
    local_crops: list[torch.Tensor]
    second_crops: list[torch.Tensor] | None = None  # BEiT: the tokenizer's view of each global crop
    global_params: list[torch.Tensor] | None = None
    local_params: list[torch.Tensor] | None = None


class MultiCrop:
    """One image -> `n_global` global and `n_local` local crops.

    Each crop: random resized crop (bicubic), flip, then the colour work: jitter, grayscale, blur
    (global crop i with probability `blur_p[i]`, local crops `local_blur_p`) and solarisation (global
    crop i `solarize_p[i]`, never the local crops). iBOT/DINO: blur 1.0/0.1, solarisation 0.0/0.2.
    `photometric`: "worker" does the colour work here with PIL (torchvision's transforms); "device"
    only draws its parameters here and leaves it to `normalize_batch` on the consumer's device, with
    the same draws and bit-identical results (data/photometric.py).
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
        photometric: str = "worker",
        resize: str = "pil",
    ):
        if len(blur_p) != n_global or len(solarize_p) != n_global:
            raise ValueError(f"blur_p and solarize_p need one entry per global crop ({n_global})")
        if photometric not in ("worker", "device"):
            raise ValueError(f"photometric must be 'worker' or 'device', not {photometric!r}")
        if resize not in ("pil", "torch") or (resize == "torch" and photometric != "device"):
            raise ValueError(f"resize {resize!r}: 'pil', or 'torch' with photometric 'device' (PIL's colour work "
                             "needs PIL crops)")
        self.resize = resize
        bicubic = T.InterpolationMode.BICUBIC
        self.global_crop = T.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic)
        self.local_crop = T.RandomResizedCrop(local_size, scale=local_scale, interpolation=bicubic)
        self.flip = T.RandomHorizontalFlip(flip_p)
        self.jitter, self.color_jitter_p, self.grayscale_p = T.ColorJitter(*color_jitter), color_jitter_p, grayscale_p
        self.blur_p, self.local_blur_p, self.blur_sigma = list(blur_p), local_blur_p, tuple(blur_sigma)
        self.solarize_p, self.photometric = list(solarize_p), photometric
        self.n_global, self.n_local = n_global, n_local
        self.global_size, self.local_size, self.second_size = global_size, local_size, second_size
        # BEiT's two-resolution view replaces the global crops' pipeline (no grey-scale, blur or solarisation)
        self.two_sizes = (TwoSizeCrop(global_size, second_size, global_scale, flip_p, color_jitter_p, color_jitter)
                          if second_size else None)

    @classmethod
    def from_config(cls, data: Any) -> MultiCrop:
        """From a `DataConfig`-shaped object (`global_crops`, `local_crops`, `augment`); photometric
        "auto" is "device" where a CUDA GPU trains, "worker" otherwise."""
        g, loc, a = data.global_crops, data.local_crops, data.augment
        where = getattr(a, "photometric", "worker")
        if where == "auto":
            where = "device" if torch.cuda.is_available() else "worker"
        resize = getattr(a, "resize", "pil")
        if resize == "auto":
            resize = "torch" if where == "device" else "pil"
        return cls(
            global_size=g.size, global_scale=tuple(g.scale), n_global=g.number,
            local_size=loc.size, local_scale=tuple(loc.scale), n_local=loc.number,
            flip_p=a.flip_p, color_jitter_p=a.color_jitter_p, color_jitter=a.color_jitter,
            grayscale_p=a.grayscale_p, blur_p=a.blur_p, local_blur_p=a.local_blur_p,
            blur_sigma=tuple(a.blur_sigma), solarize_p=a.solarize_p, second_size=g.second_size, photometric=where,
            resize=resize,
        )

    def _view(self, img: Image.Image | torch.Tensor, crop, blur_p: float, solarize_p: float):
        """Crop, flip, and the colour work's draws (torchvision's order); applied here or deferred.
        `img` a uint8 [3, H, W] tensor (resize torch): the same draws, torch's antialiased bicubic."""
        if isinstance(img, torch.Tensor):
            top, left, h, w = crop.get_params(img, crop.scale, crop.ratio)
            x = torch.nn.functional.interpolate(img[None, :, top:top + h, left:left + w], size=list(crop.size),
                                                mode="bicubic", antialias=True)[0]
            if torch.rand(1) < self.flip.p:
                x = x.flip(-1)
            row = photometric.draw(self.jitter, self.color_jitter_p, self.grayscale_p, blur_p, self.blur_sigma,
                                   solarize_p)
            return x.contiguous(), row
        img = self.flip(crop(img))
        row = photometric.draw(self.jitter, self.color_jitter_p, self.grayscale_p, blur_p, self.blur_sigma,
                               solarize_p)
        if self.photometric == "worker":
            img = photometric.apply_pil(img, row)
        return T.functional.pil_to_tensor(img), row

    def __call__(self, img: Image.Image) -> Views:
        if self.resize == "torch" and self.two_sizes is None:  # one tensor (HWC memory, torch's fast uint8 path)
            img = T.functional.pil_to_tensor(img)
        if self.two_sizes is not None:
            big, small = zip(*(self.two_sizes(img) for _ in range(self.n_global)))
            local = [self._view(img, self.local_crop, self.local_blur_p, 0.0) for _ in range(self.n_local)]
            return Views(list(big), [c for c, _ in local], list(small), None,
                         [r for _, r in local] if self.photometric == "device" else None)
        views = [self._view(img, self.global_crop, self.blur_p[i], self.solarize_p[i]) for i in range(self.n_global)]
        local = [self._view(img, self.local_crop, self.local_blur_p, 0.0) for _ in range(self.n_local)]
        deferred = self.photometric == "device"
        return Views([c for c, _ in views], [c for c, _ in local], None,
                     [r for _, r in views] if deferred else None, [r for _, r in local] if deferred else None)


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, with 0 bits kept giving black as older Pillow did (timm's "inc1" RandAugment
    asks for 0 bits at magnitude 10, which Pillow now refuses with a ValueError)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


class ClassifyCrop:
    """One image -> one training view for fine-tuning a classifier, as BEiT / MAE / iBOT fine-tune
    (timm's `create_transform(is_training=True)`): random-resized crop (bicubic), flip, RandAugment
    (`auto_augment`, e.g. "rand-m9-mstd0.5-inc1"; timm then skips colour jitter), as uint8. Random
    erasing, which works on normalised pixels, is left to the consumer (the method, on its device).

    timm's augmentations draw from Python's and NumPy's global generators: here both are seeded from
    torch's (which the pipeline seeds per sample) and put back afterwards, so the view stays a pure
    function of the sample's seed and the training process's generators are not touched."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0), flip_p: float = 0.5,
                 auto_augment: str | None = "rand-m9-mstd0.5-inc1", color_jitter: float = 0.4,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), interpolation: str = "bicubic"):
        from timm.data.transforms_factory import transforms_imagenet_train

        primary, secondary, _ = transforms_imagenet_train(
            size, scale=tuple(scale), hflip=flip_p, color_jitter=color_jitter, auto_augment=auto_augment or None,
            interpolation=interpolation, mean=tuple(mean), separate=True)
        self.transform = T.Compose([*primary.transforms, *secondary.transforms])
        for t in secondary.transforms:  # RandAugment's posterize, as the Pillow the references ran with had it
            for op in getattr(t, "ops", ()):
                if op.aug_fn.__name__ == "posterize":
                    op.aug_fn = _posterize
        self.size, self.n_local, self.local_size = size, 0, size

    def __call__(self, img: Image.Image) -> Views:
        import random

        seed = int(torch.randint(2**31 - 1, (1,)))
        py, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            view = T.functional.pil_to_tensor(self.transform(img))
        finally:
            random.setstate(py)
            np.random.set_state(np_state)
        return Views([view], [])


@functools.cache
def _scaled(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """255 * values as a [3, 1, 1] fp32 tensor on `device`, made once (torch.tensor(..., device=cuda)
    is a blocking copy: once per batch it made the host wait for the GPU)."""
    return (torch.tensor(values, dtype=torch.float32) * 255).view(3, 1, 1).to(device)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> (x / 255 - mean) / std in `dtype` (computed in fp32)."""
    m, s = _scaled(tuple(mean), images.device), _scaled(tuple(std), images.device)
    out = images.to(torch.float32).sub_(m).div_(s)  # in place: one float tensor, not three
    return out if dtype == torch.float32 else out.to(dtype)


def normalize_batch(batch: dict, mean: Sequence[float], std: Sequence[float],
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Move a loader batch to `device`, do the colour work the loader deferred (its `*_params`), and
    normalise the crops there; other entries just move."""
    out = {}
    if isinstance(batch.get("masks"), torch.Tensor) and batch["masks"].device.type == "cpu":
        # The masked positions, found here on the host, where the loader's masks are: on the GPU a
        # nonzero or a boolean-mask index makes the host wait for the device (methods read them).
        index = np.flatnonzero(batch["masks"].numpy())
        out["mask_index"] = torch.from_numpy(index).to(device, non_blocking=True)
    for key, value in batch.items():
        if key.endswith("_params"):
            continue
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key in ("global_crops", "local_crops"):
                params = batch.get(key.replace("_crops", "_params"))
                if params is not None and value.numel():  # [V, B, 3, H, W] crops, [V, B, N_PARAMS] rows
                    value = photometric.apply_batch(value.flatten(0, 1), params.flatten(0, 1)).view(value.shape)
                value = normalize(value, mean, std, dtype)
        out[key] = value
    return out
