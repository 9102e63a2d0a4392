"""The multi-crop's colour augmentations, drawn per crop and applied to a batch of crops at once.

Each crop's random draws (colour jitter: whether, op order, four factors; grayscale; blur sigma;
solarisation) are made in the worker in exactly torchvision's order and packed into one row of
`PARAMS`. `apply_pil` then applies them to a PIL crop (what torchvision's transforms do), or
`apply_batch` applies a batch of rows to uint8 crops with torch ops on any device: the training
process's GPU, where this work leaves the loader's CPUs.

`apply_batch` is bit-identical to `apply_pil`: every op reproduces Pillow's C code (Blend.c,
Convert.c's rgb2l / rgb2hsv / hsv2rgb, BoxBlur.c) with its float32 / float64 mix, truncations and
roundings, so the augmentation distribution is the same on either side (tests/unit/test_photometric.py).
Working values are integer-valued float32 (float64 and int64 where the C is), one op after another
as Pillow rounds to uint8 after each.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import functional as F

# One row per crop: jitter applied (0/1); the four ops' order (torch.randperm(4): 0 brightness,
# 1 contrast, 2 saturation, 3 hue); their factors (NaN: the op is off, its jitter range is 0);
# grayscale (0/1); blur sigma (0: no blur); solarise (0/1).
PARAMS = ("jitter", "op0", "op1", "op2", "op3", "brightness", "contrast", "saturation", "hue", "grayscale",
          "blur_sigma", "solarize")
N_PARAMS = len(PARAMS)
_NAN = float("nan")


def draw(jitter, jitter_p: float, grayscale_p: float, blur_p: float, blur_sigma, solarize_p: float) -> torch.Tensor:
    """One crop's row, consuming torch's global generator exactly as torchvision's RandomApply(ColorJitter),
    RandomGrayscale and our RandomGaussianBlur / RandomSolarize would, in that order. `jitter`: a
    torchvision ColorJitter (its checked ranges)."""
    row = torch.zeros(N_PARAMS)
    row[5:9] = _NAN
    if not jitter_p < torch.rand(1):  # RandomApply: applied when rand <= p
        order, *factors = jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        row[0] = 1
        row[1:5] = order.float()
        row[5:9] = torch.tensor([_NAN if f is None else f for f in factors])
    row[9] = float(torch.rand(1) < grayscale_p)
    if blur_p > 0 and torch.rand(()).item() < blur_p:
        row[10] = torch.empty(()).uniform_(*blur_sigma).item()
    if solarize_p > 0 and torch.rand(()).item() < solarize_p:
        row[11] = 1
    return row


def apply_pil(img: Image.Image, row: torch.Tensor) -> Image.Image:
    """The row's augmentations on one PIL crop, with torchvision's and Pillow's own functions."""
    if row[0]:
        adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
        for op in row[1:5].long().tolist():
            factor = row[5 + op].item()
            if factor == factor:  # not NaN
                img = adjust[op](img, factor)
    if row[9]:
        img = F.rgb_to_grayscale(img, num_output_channels=3)
    if row[10]:
        img = img.filter(ImageFilter.GaussianBlur(radius=row[10].item()))
    if row[11]:
        img = ImageOps.solarize(img, threshold=128)
    return img


# ----------------------------------------------------------------------------- batched, on tensors
# x: float32 [N, 3, H, W] holding the integers 0..255; factors: [N] float32.


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L: (R 19595 + G 38470 + B 7471 + 0x8000) >> 16 (exact in float32: sums < 2^24)."""
    r, g, b = x.unbind(1)
    return torch.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, x, alpha): (uint8)(deg + alpha * (x - deg)) in C float, clipped."""
    a = alpha.view(-1, 1, 1, 1)
    return torch.floor(((x - degenerate) * a + degenerate).clamp(0.0, 255.0))


def brightness(x, f):
    return _blend(torch.zeros_like(x), x, f)


def contrast(x, f):
    luma = _luma(x)  # ImageEnhance.Contrast: int(mean(L) + 0.5), mean in double
    mean = torch.floor(luma.double().mean(dim=(1, 2)) + 0.5).float()
    return _blend(mean.view(-1, 1, 1, 1).expand_as(x), x, f)


def saturation(x, f):
    return _blend(_luma(x).unsqueeze(1).expand_as(x), x, f)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Convert.c rgb2hsv_row: float32 ratios, the hue sum and fmod in double, truncation to uint8."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    grey = maxc == minc
    cr = torch.where(grey, 1.0, maxc - minc)
    s = cr / torch.where(maxc == 0, 1.0, maxc)
    rc, gc, bc = (maxc - r) / cr, (maxc - g) / cr, (maxc - b) / cr
    h = torch.where(r == maxc, (bc - gc).double(),
                    torch.where(g == maxc, 2.0 + rc.double() - bc.double(), 4.0 + gc.double() - rc.double()))
    h = torch.fmod(h.float().double() / 6.0 + 1.0, 1.0).float()
    uh = torch.where(grey, 0.0, torch.trunc(h.double() * 255.0).clamp(0, 255).float())
    us = torch.where(grey, 0.0, torch.trunc(s.double() * 255.0).clamp(0, 255).float())
    return uh, us, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Convert.c hsv2rgb: sector and remainder in double, C round() (halves away from zero; all >= 0)."""
    h6 = h.double() * 6.0 / 255.0
    i = torch.floor(h6)
    f = (h6 - i).float()
    fs = (s.double() / 255.0).float()
    vd = v.double()

    def c_round(z):  # z >= 0; z - floor(z) is exact, floor(z + 0.5) would not always be
        down = torch.floor(z)
        return torch.where(z - down >= 0.5, down + 1.0, down).clamp(0, 255).float()

    p = c_round(vd * (1.0 - fs.double()))
    q = c_round(vd * (1.0 - (fs * f).double()))  # fs * f is a float product in the C
    t = c_round(vd * (1.0 - fs.double() * (1.0 - f.double())))
    # sector -> (R, G, B) from (v, t, p, q): 0 v t p, 1 q v p, 2 p v t, 3 p q v, 4 t p v, 5 v p q
    sources = torch.tensor([[0, 1, 2], [3, 0, 2], [2, 0, 1], [2, 3, 0], [1, 2, 0], [0, 2, 3]], device=h.device)
    pick = sources[i.long() % 6]  # [N, H, W, 3]
    rgb = torch.gather(torch.stack([v, t, p, q], dim=-1), -1, pick).permute(0, 3, 1, 2)
    return torch.where((s == 0).unsqueeze(1), v.unsqueeze(1).expand_as(rgb), rgb)


def hue(x, f):
    """torchvision's PIL adjust_hue: H += uint8(int32(f * 255)) with uint8 wrap-around, in Pillow's HSV."""
    h, s, v = _rgb_to_hsv(x)
    shift = torch.trunc(f.double() * 255.0).remainder(256.0).float()  # np.int32 truncates, astype(uint8) wraps
    return _hsv_to_rgb(torch.remainder(h + shift.view(-1, 1, 1), 256.0), s, v)


def grayscale(x):
    return _luma(x).unsqueeze(1).expand_as(x).contiguous()


def solarize(x):
    return torch.where(x < 128.0, x, 255.0 - x)


def box_radius(sigma: float) -> tuple[int, int, int]:
    """BoxBlur.c for GaussianBlur(sigma), 3 passes: the extended box's float radius
    (_gaussian_blur_radius, in C float with double sqrt and floor) -> (int radius, inner weight, edge weight)."""
    f32 = np.float32
    sigma2 = f32(f32(sigma) * f32(sigma) / f32(3))
    big_l = f32(np.sqrt(12.0 * np.float64(sigma2) + 1.0))
    small_l = f32(np.floor((np.float64(big_l) - 1.0) / 2.0))
    a = f32(f32(f32(2) * small_l + f32(1)) * f32(small_l * f32(small_l + f32(1)) - f32(3) * sigma2))
    a = f32(a / f32(f32(6) * f32(sigma2 - f32(small_l + f32(1)) * f32(small_l + f32(1)))))
    radius = f32(small_l + a)
    r = int(radius)
    inner = int(f32(f32(1 << 24) / f32(radius * f32(2) + f32(1))))
    return r, inner, ((1 << 24) - (r * 2 + 1) * inner) // 2


def gaussian_blur(x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """img.filter(GaussianBlur(sigma)) per crop: three box passes along W, then three along H, each
    (sum * weights + 2^23) >> 24 in integers, edges repeated."""
    boxes = [box_radius(s) for s in sigmas]
    reach = max(r for r, _, _ in boxes) + 1
    w = torch.zeros(len(boxes), 2 * reach + 1, dtype=torch.int64)
    for n, (r, inner, edge) in enumerate(boxes):
        w[n, reach - r:reach + r + 1] = inner
        w[n, reach - r - 1] = w[n, reach + r + 1] = edge
    w = w.to(x.device)
    y = x.to(torch.int64)
    for dim in (3, 2):
        size = y.shape[dim]
        idx = torch.arange(-reach, size + reach, device=x.device).clamp(0, size - 1)
        for _ in range(3):
            padded = y.index_select(dim, idx)
            acc = torch.zeros_like(y)
            for k in range(2 * reach + 1):
                acc += padded.narrow(dim, k, size) * w[:, k].view(-1, 1, 1, 1)
            y = (acc + (1 << 23)) >> 24
    return y.float()


_JITTER = (brightness, contrast, saturation, hue)


def apply_batch(crops: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """uint8 crops [N, 3, H, W] and their rows [N, N_PARAMS] (on any device) -> the augmented uint8
    crops, equal to `apply_pil` on each."""
    x = crops.float()
    # Which crops each op takes is read from the rows where the loader made them, on the host (NumPy):
    # a nonzero or a .tolist() of device tensors would make the host wait for the GPU at every op.
    host = rows.detach().cpu().numpy() if rows.device.type != "cpu" else rows.numpy()
    rows = rows.to(x.device, non_blocking=True)

    def where(flags: np.ndarray) -> torch.Tensor | None:
        sel = np.flatnonzero(flags)
        return torch.from_numpy(sel).to(x.device, non_blocking=True) if sel.size else None

    jitter = host[:, 0] > 0
    for k in range(4):
        for op, fn in enumerate(_JITTER):
            sel = where(jitter & (host[:, 1 + k] == op) & ~np.isnan(host[:, 5 + op]))
            if sel is not None:
                x[sel] = fn(x[sel], rows[:, 5 + op][sel])
    sel = where(host[:, 9] > 0)
    if sel is not None:
        x[sel] = grayscale(x[sel])
    blurred = np.flatnonzero(host[:, 10] > 0)
    if blurred.size:
        sel = torch.from_numpy(blurred).to(x.device, non_blocking=True)
        x[sel] = gaussian_blur(x[sel], host[blurred, 10].tolist())
    sel = where(host[:, 11] > 0)
    if sel is not None:
        x[sel] = solarize(x[sel])
    return x.to(torch.uint8)
