import numpy as np
import torch
from PIL import Image

from data.transforms import MultiCrop, normalize, normalize_batch


def _image(seed=0, size=(120, 90)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_crop_shapes_and_counts():
    mc = MultiCrop(global_size=64, n_global=2, local_size=32, n_local=5)
    g, loc = mc(_image())[:2]
    assert len(g) == 2 and len(loc) == 5
    assert all(t.shape == (3, 64, 64) and t.dtype == torch.uint8 for t in g)
    assert all(t.shape == (3, 32, 32) and t.dtype == torch.uint8 for t in loc)


def test_no_local_crops():
    g, loc = MultiCrop(global_size=32, local_size=16, n_local=0)(_image())[:2]
    assert len(g) == 2 and loc == []


def test_crops_are_a_function_of_the_seed():
    mc = MultiCrop(global_size=48, local_size=24, n_local=3)
    img = _image(1)
    torch.manual_seed(5)
    a = mc(img)
    torch.manual_seed(5)
    b = mc(img)
    torch.manual_seed(6)
    c = mc(img)
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
    assert not all(torch.equal(x, y) for x, y in zip(a[0] + a[1], c[0] + c[1]))


def test_solarize_and_blur_follow_their_probabilities():
    img = _image(2)
    kw = dict(global_size=32, global_scale=(1.0, 1.0), local_size=16, n_local=0, flip_p=0, color_jitter_p=0,
              grayscale_p=0, blur_p=(0.0, 0.0), solarize_p=(1.0, 0.0))
    torch.manual_seed(0)
    g = MultiCrop(**kw)(img).global_crops
    torch.manual_seed(0)  # the same draws, the colour work left undone: the plain crops
    plain = MultiCrop(**kw, photometric="device")(img).global_crops
    # solarisation inverts every pixel >= 128 of crop 1 only
    assert torch.equal(g[1], plain[1])
    assert torch.equal(g[0], torch.where(plain[0] >= 128, 255 - plain[0], plain[0]))


def test_normalize_matches_torchvision():
    from torchvision.transforms import functional as F

    x = torch.randint(0, 256, (2, 4, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = normalize(x, mean, std)
    ref = F.normalize(x.float() / 255, mean, std)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    batch = normalize_batch({"global_crops": x, "labels": torch.arange(4), "keys": ["a"]}, mean, std,
                            dtype=torch.bfloat16)
    assert batch["global_crops"].dtype == torch.bfloat16 and batch["labels"].dtype == torch.long
    assert batch["keys"] == ["a"]
