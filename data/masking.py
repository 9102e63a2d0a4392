"""Patch masks for masked image modeling.

A mask is a boolean [H, W] array over the patch grid of one view (True = masked). Every generator
takes a `numpy.random.Generator`, so a mask is a pure function of its seed (resume exactness).

- `block_mask`: BEiT's blockwise masking (Algorithm 1): rectangles of at least `min_block_patches`
  patches with log-uniform aspect ratio in [min_aspect, 1/min_aspect], added until the target is
  reached; a block may overlap earlier ones but never overshoots the target. If no block fits
  (tiny grids, tiny remainders), the masked region grows by neighbouring patches until the count
  is exact.
- `random_mask`: exactly `count` patches, uniformly.
- `MaskSampler`: iBOT's per-view policy: with probability `prob` a view is masked, its ratio drawn
  uniformly from `ratio`; otherwise it is left whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def random_mask(height: int, width: int, count: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(height * width, dtype=bool)
    mask[rng.choice(height * width, size=count, replace=False)] = True
    return mask.reshape(height, width)


def block_shape(area: float, rng: np.random.Generator, min_aspect: float = 0.3) -> tuple[int, int]:
    """(height, width) of a block of about `area` patches, aspect log-uniform in [a, 1/a]."""
    aspect = math.exp(rng.uniform(math.log(min_aspect), -math.log(min_aspect)))
    return int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))


def block_mask(
    height: int,
    width: int,
    count: int,
    rng: np.random.Generator,
    min_block_patches: int = 16,
    min_aspect: float = 0.3,
    attempts: int = 10,
) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    masked = 0
    while masked < count:
        remaining = count - masked
        added = 0
        for _ in range(attempts):
            # BEiT: s ~ U(min, remaining). A block may overlap masked patches, which is how
            # remainders smaller than a block get placed.
            lo, hi = sorted((min_block_patches, remaining))
            h, w = block_shape(rng.uniform(lo, hi), rng, min_aspect)
            if not (1 <= h <= height and 1 <= w <= width):
                continue
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= remaining:
                block[...] = True
                added = new
                break
        if added == 0:
            break
        masked += added
    while masked < count:  # no block fits: grow the masked region patch by patch
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        border = np.flatnonzero((grown & ~mask).reshape(-1))
        if border.size == 0:
            border = np.flatnonzero(~mask.reshape(-1))
        pick = rng.choice(border, size=min(count - masked, border.size), replace=False)
        mask.reshape(-1)[pick] = True
        masked += pick.size
    return mask


@dataclass(frozen=True)
class MaskSampler:
    """Draws one view's mask: masked with probability `prob`, ratio ~ U(ratio)."""

    grid: tuple[int, int]
    kind: str = "block"
    ratio: tuple[float, float] = (0.1, 0.5)
    prob: float = 0.5
    min_block_patches: int = 16
    min_aspect: float = 0.3

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        h, w = self.grid
        if self.ratio[1] <= 0 or rng.random() >= self.prob:
            return np.zeros((h, w), dtype=bool)
        count = int(round(rng.uniform(*self.ratio) * h * w))
        if self.kind == "block":
            return block_mask(h, w, count, rng, self.min_block_patches, self.min_aspect)
        if self.kind == "random":
            return random_mask(h, w, count, rng)
        raise ValueError(f"mask kind {self.kind!r} is not one of 'block', 'random'")
