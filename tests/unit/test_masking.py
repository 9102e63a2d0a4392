import math
import random

import numpy as np
import pytest
from scipy import ndimage

from data.masking import MaskSampler, block_mask, block_shape, ibot_min_block, random_mask


def ibot_block_mask(H, W, high, r: random.Random):
    """A transcription of bytedance/ibot loader.py ImageFolderMask.__getitem__ (pred_shape 'block'),
    with its module-level `random` replaced by `r`."""
    log_aspect = (math.log(0.3), math.log(1 / 0.3))  # pred_aspect_ratio=(0.3, 1/0.3)
    mask = np.zeros((H, W), dtype=bool)
    mask_count = 0
    while mask_count < high:
        max_mask_patches = high - mask_count
        delta = 0
        for _attempt in range(10):
            low = (min(H, W) // 3) ** 2
            target_area = r.uniform(low, max_mask_patches)
            aspect_ratio = math.exp(r.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < W and h < H:
                top = r.randint(0, H - h)
                left = r.randint(0, W - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        else:
            mask_count += delta
    return mask


class PythonRandom:
    """numpy-Generator-shaped view of Python's `random.Random`, consuming the same numbers as the
    reference's calls: random() for uniform(), randint(lo, hi - 1) for integers(lo, hi)."""

    def __init__(self, seed):
        self.r = random.Random(seed)

    def random(self):
        return self.r.random()

    def integers(self, lo, hi):
        return self.r.randint(lo, hi - 1)


@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (4, 4), (7, 10)])
def test_block_mask_equals_ibots_loader_draw_for_draw(grid):
    """With the same stream of random numbers our generator makes iBOT's masks exactly: the minimum block
    (min(H, W) // 3)^2, the strict fit test, 10 attempts, stopping short when nothing fits."""
    H, W = grid
    differing = 0
    for seed in range(300):
        high = random.Random(10_000 + seed).uniform(0.1, 0.5) * H * W
        ref = ibot_block_mask(H, W, high, random.Random(seed))
        ours = block_mask(H, W, high, PythonRandom(seed), fill_exact=False)
        differing += not np.array_equal(ref, ours)
    assert differing == 0


def test_ibot_min_block_and_its_effect():
    assert (ibot_min_block(14, 14), ibot_min_block(16, 16), ibot_min_block(4, 4)) == (16, 25, 1)
    # a fixed minimum of 16 on a 16 x 16 grid (ViT/14 at 224) makes more, smaller blocks than iBOT's 25
    regions = {}
    for low in (None, 16):
        rng = np.random.default_rng(0)
        regions[low] = np.mean([ndimage.label(block_mask(16, 16, 0.4 * 256, rng, low, fill_exact=False))[1]
                                for _ in range(300)])
    assert regions[None] < regions[16]


@pytest.mark.parametrize("kind", ["block", "random"])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.4, 0.5, 0.75])
@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (8, 8), (7, 10)])
def test_exact_count_and_shape(kind, ratio, grid):
    rng = np.random.default_rng(0)
    h, w = grid
    count = int(round(ratio * h * w))
    for _ in range(20):
        m = block_mask(h, w, count, rng, fill_exact=True) if kind == "block" else random_mask(h, w, count, rng)
        assert m.shape == grid and m.dtype == bool
        assert m.sum() == count


def test_block_aspect_within_bounds():
    rng = np.random.default_rng(1)
    for _ in range(5000):
        area = rng.uniform(16, 80)
        h, w = block_shape(area, rng, 0.3)
        # rounding each side moves the ratio by at most half a patch on each side
        assert (h + 0.5) / max(w - 0.5, 0.5) >= 0.3
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3
        assert abs(h * w - area) <= h + w  # the block has about the requested area


def test_blocks_are_blocks():
    """Blockwise masks form a few large connected regions; random masks form many small ones."""
    rng = np.random.default_rng(2)
    block_regions, random_regions, smallest = [], [], []
    for _ in range(200):
        b = block_mask(14, 14, 78, rng, min_block_patches=16)
        labels, n = ndimage.label(b)
        block_regions.append(n)
        smallest.append(np.bincount(labels.ravel())[1:].min())
        random_regions.append(ndimage.label(random_mask(14, 14, 78, rng))[1])
    assert np.mean(block_regions) < 4
    assert np.mean(random_regions) > 10
    assert np.median(smallest) >= 16  # regions are at least one minimum block


def test_small_remainder_uses_smaller_blocks_and_stays_exact():
    rng = np.random.default_rng(3)
    m = block_mask(8, 8, 5, rng, min_block_patches=16)  # target below the minimum block
    assert m.sum() == 5


def test_stopping_short_like_the_reference_never_overshoots():
    rng = np.random.default_rng(4)
    counts = [block_mask(14, 14, 0.45 * 196, rng, fill_exact=False).sum() for _ in range(300)]
    assert max(counts) <= int(0.45 * 196) and min(counts) > 0.3 * 196


def test_sampler_probability_and_ratio_range():
    sampler = MaskSampler((14, 14), "block", (0.1, 0.5), prob=0.5)
    rng = np.random.default_rng(4)
    counts = np.array([sampler(rng).sum() for _ in range(2000)])
    masked = counts[counts > 0]
    assert abs(len(masked) / len(counts) - 0.5) < 0.05
    assert masked.min() >= 10 and masked.max() <= int(0.5 * 196)  # short of the target at most by a block
    # ratios spread over the whole range, not a constant
    assert masked.min() < 0.15 * 196 and masked.max() > 0.45 * 196


def test_sampler_is_a_function_of_its_seed():
    sampler = MaskSampler((14, 14), "random", (0.3, 0.3), prob=1.0)
    a = sampler(np.random.default_rng(7))
    b = sampler(np.random.default_rng(7))
    c = sampler(np.random.default_rng(8))
    assert (a == b).all() and not (a == c).all()
    assert a.sum() == int(0.3 * 196)  # iBOT's 'rand' shape: int(ratio * N)


def test_sampler_prob_zero_never_masks():
    sampler = MaskSampler((14, 14), "block", (0.1, 0.5), prob=0.0)
    rng = np.random.default_rng(5)
    assert sum(sampler(rng).sum() for _ in range(100)) == 0
