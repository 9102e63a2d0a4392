import numpy as np
import pytest
from scipy import ndimage

from data.masking import MaskSampler, block_mask, block_shape, random_mask


@pytest.mark.parametrize("kind", ["block", "random"])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.4, 0.5, 0.75])
@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (8, 8), (7, 10)])
def test_exact_count_and_shape(kind, ratio, grid):
    rng = np.random.default_rng(0)
    h, w = grid
    count = int(round(ratio * h * w))
    for _ in range(20):
        m = block_mask(h, w, count, rng) if kind == "block" else random_mask(h, w, count, rng)
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


def test_sampler_probability_and_ratio_range():
    sampler = MaskSampler((14, 14), "block", (0.1, 0.5), prob=0.5)
    rng = np.random.default_rng(4)
    counts = np.array([sampler(rng).sum() for _ in range(2000)])
    masked = counts[counts > 0]
    assert abs(len(masked) / len(counts) - 0.5) < 0.05
    assert masked.min() >= round(0.1 * 196) and masked.max() <= round(0.5 * 196)
    # ratios spread over the whole range, not a constant
    assert masked.min() < 0.15 * 196 and masked.max() > 0.45 * 196


def test_sampler_is_a_function_of_its_seed():
    sampler = MaskSampler((14, 14), "random", (0.3, 0.3), prob=1.0)
    a = sampler(np.random.default_rng(7))
    b = sampler(np.random.default_rng(7))
    c = sampler(np.random.default_rng(8))
    assert (a == b).all() and not (a == c).all()
    assert a.sum() == round(0.3 * 196)


def test_sampler_prob_zero_never_masks():
    sampler = MaskSampler((14, 14), "block", (0.1, 0.5), prob=0.0)
    rng = np.random.default_rng(5)
    assert sum(sampler(rng).sum() for _ in range(100)) == 0
