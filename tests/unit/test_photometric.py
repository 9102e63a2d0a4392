"""The colour work done on the consumer's device (data/photometric.py) equals PIL's, bit for bit,
and the worker path draws and applies exactly what torchvision's transforms did before."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as F

from data import photometric as P
from data.transforms import MultiCrop, normalize_batch


def _photo(h: int = 120, w: int = 160) -> Image.Image:
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[1][100:100 + h, 200:200 + w])


def _tensor(img: Image.Image) -> torch.Tensor:
    return F.pil_to_tensor(img).unsqueeze(0)


def _random_crops(n: int, size: int = 24, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n - 1)]
    return out + [_photo(size, size)]  # smooth regions too


@pytest.mark.parametrize("op, pil", [(P.brightness, F.adjust_brightness), (P.contrast, F.adjust_contrast),
                                     (P.saturation, F.adjust_saturation), (P.hue, F.adjust_hue)])
def test_each_jitter_op_is_pils(op, pil):
    factors = [-0.5, -0.1, -0.003, 0.0, 0.05, 0.5] if op is P.hue else [0.0, 0.6, 0.9999, 1.0, 1.37, 2.5]
    for img in _random_crops(4):
        x = _tensor(img).float()
        for f in factors:
            f = float(np.float32(f))  # the loader's factors are float32 draws
            got = op(x, torch.tensor([f]))
            assert torch.equal(got.to(torch.uint8), _tensor(pil(img, f))), (op.__name__, f)


def test_hue_round_trip_is_pils_on_a_million_colours():
    """rgb2hsv and hsv2rgb over 2^20 random colours and every grey and saturated edge: all bit-exact."""
    rng = np.random.default_rng(1)
    colours = rng.integers(0, 256, (1 << 20, 3), dtype=np.uint8)
    edges = np.array([[v, v, v] for v in range(256)] + [[255, 0, v] for v in range(256)] + [[0, v, 255] for v in
                                                                                           range(256)], np.uint8)
    img = Image.fromarray(np.concatenate([colours, edges]).reshape(1, -1, 3))
    x = _tensor(img).float()
    for f in (-0.5, -0.25, 0.1, 0.499):
        f = float(np.float32(f))
        assert torch.equal(P.hue(x, torch.tensor([f])).to(torch.uint8), _tensor(F.adjust_hue(img, f))), f


def test_blur_is_pils_box_approximation_for_every_sigma():
    imgs = _random_crops(3, size=40)
    sigmas = [float(np.float32(s)) for s in np.linspace(0.1, 2.0, 39)] + [0.1, 2.0]
    x = torch.cat([_tensor(i) for i in imgs]).float()
    for s in sigmas:
        got = P.gaussian_blur(x, [s] * len(imgs)).to(torch.uint8)
        want = torch.cat([_tensor(i.filter(ImageFilter.GaussianBlur(radius=s))) for i in imgs])
        assert torch.equal(got, want), s


def test_grayscale_and_solarize_are_pils():
    for img in _random_crops(3):
        x = _tensor(img).float()
        assert torch.equal(P.grayscale(x).to(torch.uint8), _tensor(F.rgb_to_grayscale(img, 3)))
        assert torch.equal(P.solarize(x).to(torch.uint8), _tensor(ImageOps.solarize(img, 128)))


class _Blur:  # the transforms before data/photometric.py (data/transforms.py, issue 19)
    def __init__(self, p, sigma=(0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, img):
        if self.p <= 0 or torch.rand(()).item() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=torch.empty(()).uniform_(*self.sigma).item()))


class _Solarize:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if self.p <= 0 or torch.rand(()).item() >= self.p:
            return img
        return ImageOps.solarize(img, threshold=128)


def _torchvision_multicrop(size=64, local=32, n_local=4):
    """DINO/iBOT's multi-crop as torchvision Compose pipelines (what MultiCrop was)."""
    bicubic = T.InterpolationMode.BICUBIC
    colour = [T.RandomHorizontalFlip(0.5), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
              T.RandomGrayscale(0.2)]
    glob = [T.Compose([T.RandomResizedCrop(size, scale=(0.32, 1.0), interpolation=bicubic), *colour, _Blur(b),
                       _Solarize(s), T.PILToTensor()]) for b, s in ((1.0, 0.0), (0.1, 0.2))]
    loc = T.Compose([T.RandomResizedCrop(local, scale=(0.05, 0.32), interpolation=bicubic), *colour, _Blur(0.5),
                     T.PILToTensor()])
    return lambda img: ([t(img) for t in glob], [loc(img) for _ in range(n_local)])


def test_worker_and_device_paths_equal_torchvision_transforms():
    img = _photo()
    reference = _torchvision_multicrop()
    worker = MultiCrop(global_size=64, local_size=32, n_local=4, photometric="worker")
    device = MultiCrop(global_size=64, local_size=32, n_local=4, photometric="device")
    applied = {"jitter": 0, "grayscale": 0, "blur": 0, "solarize": 0}
    for seed in range(40):
        torch.manual_seed(seed)
        want_g, want_l = reference(img)
        torch.manual_seed(seed)
        w = worker(img)
        torch.manual_seed(seed)
        d = device(img)
        assert w.global_params is None and len(d.global_params) == 2 and len(d.local_params) == 4
        for want, got in ((want_g, w.global_crops), (want_l, w.local_crops)):
            assert all(torch.equal(a, b) for a, b in zip(want, got)), seed
        for want, crops, rows in ((want_g, d.global_crops, d.global_params), (want_l, d.local_crops, d.local_params)):
            rows = torch.stack(rows)
            assert torch.equal(P.apply_batch(torch.stack(crops), rows), torch.stack(want)), seed
            for name, col in (("jitter", 0), ("grayscale", 9), ("blur", 10), ("solarize", 11)):
                applied[name] += int((rows[:, col] > 0).sum())
    # every op was exercised (40 images x 6 crops: jitter ~80%, grayscale ~20%, blur ~50%, solarize 20% of 40)
    assert applied["jitter"] > 150 and applied["grayscale"] > 25 and applied["blur"] > 80 and applied["solarize"] > 2


def test_normalize_batch_applies_the_deferred_work():
    img = _photo()
    device = MultiCrop(global_size=32, local_size=16, n_local=2, photometric="device")
    worker = MultiCrop(global_size=32, local_size=16, n_local=2, photometric="worker")

    def batch(mc):
        views = []
        for seed in range(3):
            torch.manual_seed(seed)
            views.append(mc(img))
        out = {"global_crops": torch.stack([torch.stack(v) for v in zip(*(v.global_crops for v in views))]),
               "local_crops": torch.stack([torch.stack(v) for v in zip(*(v.local_crops for v in views))])}
        if views[0].global_params is not None:
            out["global_params"] = torch.stack([torch.stack(r) for r in zip(*(v.global_params for v in views))])
            out["local_params"] = torch.stack([torch.stack(r) for r in zip(*(v.local_params for v in views))])
        return out

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    a, b = normalize_batch(batch(device), mean, std), normalize_batch(batch(worker), mean, std)
    assert set(a) == set(b) == {"global_crops", "local_crops"}  # the parameter rows are used up
    assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["local_crops"], b["local_crops"])


def test_torch_resize_draws_the_same_and_resamples_within_a_level_or_so_of_pils():
    """data.augment.resize torch: the same crops (same draws, same boxes), torch's antialiased bicubic
    instead of PIL's: statistically the same images (seen: mean |diff| 0.03 levels, max 9)."""
    img = _photo(375, 500)
    pil = MultiCrop(photometric="device")
    fast = MultiCrop(photometric="device", resize="torch")
    diffs, means = [], []
    for seed in range(6):
        torch.manual_seed(seed)
        a = pil(img)
        torch.manual_seed(seed)
        b = fast(img)
        for ra, rb in zip(a.global_params + a.local_params, b.global_params + b.local_params):
            assert torch.equal(ra.nan_to_num(-1), rb.nan_to_num(-1))  # the same colour work drawn after
        for x, y in zip(a.global_crops + a.local_crops, b.global_crops + b.local_crops):
            assert x.shape == y.shape and y.dtype == torch.uint8
            diffs.append((x.int() - y.int()).abs())
            means.append(abs(x.float().mean() - y.float().mean()))
    d = torch.cat([t.flatten() for t in diffs]).float()
    assert d.mean() < 0.1 and d.max() <= 16 and max(means) < 0.05, (d.mean(), d.max(), max(means))
    with pytest.raises(ValueError, match="resize 'torch'"):
        MultiCrop(photometric="worker", resize="torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_batch_on_the_gpu_equals_pil():
    """The deferred colour work where it is meant to run: a CUDA batch, against PIL crop by crop."""
    img = _photo(375, 500)
    device = MultiCrop(photometric="device", resize="torch")
    crops, rows = [], []
    for seed in range(8):
        torch.manual_seed(seed)
        v = device(img)
        crops += v.local_crops
        rows += v.local_params
    got = P.apply_batch(torch.stack(crops).cuda(), torch.stack(rows).cuda()).cpu()
    want = torch.stack([F.pil_to_tensor(P.apply_pil(F.to_pil_image(c), r)) for c, r in zip(crops, rows)])
    assert torch.equal(got, want)
