"""Patch masks for masked image modeling.

A mask is a boolean [H, W] array over the patch grid of one view (True = masked). Every generator
takes a `numpy.random.Generator`, so a mask is a pure function of its seed (resume exactness).

- `block_mask`: blockwise masking as iBOT's loader does it (bytedance/ibot loader.py, after BEiT's
  Algorithm 1): rectangles of area ~ U(min_block, remaining) and log-uniform aspect ratio in
  [min_aspect, 1/min_aspect], strictly smaller than the grid on both sides, added while some block
  adds at least one and at most `remaining` new patches (10 attempts per block). The random draws
  come in the reference's order, so with the same stream of numbers the masks are identical
  (tests/unit/test_masking.py runs both). Like the reference it can stop short of the target when no
  block fits; `fill_exact` then grows the masked region patch by patch to the exact count.
- `ibot_min_block(h, w)`: iBOT's smallest block, (min(h, w) // 3)^2.
- `random_mask`: exactly `count` patches, uniformly.
- `MaskSampler`: iBOT's per-view policy: with probability `prob` a view is masked, its ratio drawn
  uniformly from `ratio`, the target ratio * h * w patches (at most its int()); otherwise it is left whole.
  With `patches` the target is that count instead (BEiT's MaskingGenerator: 75 of 196, blocks of at
  least 16 patches, microsoft/unilm beit/masking_generator.py; the same algorithm as iBOT's).
  `MaskSampler.batch` is DINOv2's policy instead, over a batch's global crops together (`spread`).

Visible-patch masks, drawn in the step on the device (MaskAlign, iTPN: the student sees only the
visible patches, as [B, keep] indices in increasing order):
- `visible_count`: how many patches a ratio keeps (the reference's `len_keep`).
- `step_generator`: their random numbers, a pure function of (seed, rank, micro-step).
- `random_visible`: uniformly random (MAE, iTPN; MaskAlign's random masking).
- `attentive_visible`: drawn by the teacher's [CLS] attention (MaskAlign's attentive masking).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def random_mask(height: int, width: int, count: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(height * width, dtype=bool)
    mask[rng.choice(height * width, size=count, replace=False)] = True
    return mask.reshape(height, width)


def ibot_min_block(height: int, width: int) -> int:
    """iBOT's minimum block area: (min(H, W) // 3)^2 patches (16 on 14 x 14, 25 on 16 x 16, 1 on 4 x 4)."""
    return (min(height, width) // 3) ** 2


def _uniform(rng: np.random.Generator, a: float, b: float) -> float:
    """Python's random.uniform: a + (b - a) * U[0, 1), also for a > b (numpy's refuses that)."""
    return a + (b - a) * rng.random()


def block_shape(area: float, rng: np.random.Generator, min_aspect: float = 0.3) -> tuple[int, int]:
    """(height, width) of a block of about `area` patches, aspect log-uniform in [a, 1/a]."""
    aspect = math.exp(_uniform(rng, math.log(min_aspect), -math.log(min_aspect)))
    return int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))


def block_mask(height: int, width: int, count: float, rng: np.random.Generator, min_block_patches: int | None = None,
               min_aspect: float = 0.3, attempts: int = 10, fill_exact: bool = True,
               max_block_patches: float | None = None) -> np.ndarray:
    """Blocks until `count` patches are masked or no block fits (see the module docstring). `count` may
    be fractional, as iBOT's ratio * h * w: at most int(count) patches are masked, and the fractional
    part only widens the range block areas are drawn from, as in the reference. `max_block_patches`
    caps what one block may add (DINOv2's MaskingGenerator max_num_patches, half the grid)."""
    low = ibot_min_block(height, width) if min_block_patches is None else min_block_patches
    mask = np.zeros((height, width), dtype=bool)
    masked = 0
    while masked < count:
        remaining = count - masked if max_block_patches is None else min(count - masked, max_block_patches)
        added = 0
        for _ in range(attempts):
            h, w = block_shape(_uniform(rng, low, remaining), rng, min_aspect)  # low > remaining is allowed
            if w < width and h < height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= remaining:
                    block[...] = True
                    added = new
            if added:
                break
        if added == 0:
            break
        masked += added
    if fill_exact:
        _grow(mask, int(count) - masked, rng)
    return mask


def _grow(mask: np.ndarray, missing: int, rng: np.random.Generator) -> None:
    """Mask `missing` more patches, each next to the masked region where possible."""
    while missing > 0:
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        border = np.flatnonzero((grown & ~mask).reshape(-1))
        if border.size == 0:
            border = np.flatnonzero(~mask.reshape(-1))
        pick = rng.choice(border, size=min(missing, border.size), replace=False)
        mask.reshape(-1)[pick] = True
        missing -= pick.size


@dataclass(frozen=True)
class MaskSampler:
    """Draws one view's mask: masked with probability `prob`, ratio ~ U(ratio)."""

    grid: tuple[int, int]
    kind: str = "block"
    ratio: tuple[float, float] = (0.1, 0.5)
    prob: float = 0.5
    min_block_patches: int | None = None
    min_aspect: float = 0.3
    fill_exact: bool = False
    patches: int | None = None
    spread: bool = False  # DINOv2's batch policy (`batch`); the loader then calls `batch`, not this
    max_block_fraction: float | None = None

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        h, w = self.grid
        if (self.ratio[1] <= 0 and self.patches is None) or rng.random() >= self.prob:
            return np.zeros((h, w), dtype=bool)
        high = rng.uniform(*self.ratio) * h * w if self.patches is None else self.patches
        if self.kind == "block":
            return block_mask(h, w, high, rng, self.min_block_patches, self.min_aspect, fill_exact=self.fill_exact)
        if self.kind == "random":
            return random_mask(h, w, int(high), rng)  # iBOT's 'rand' shape: int(high) patches
        raise ValueError(f"mask kind {self.kind!r} is not one of 'block', 'random'")

    def batch(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """[n, h, w]: the masks of a batch's n global crops as DINOv2 draws them (facebookresearch/dinov2
        dinov2/data/collate.py): exactly int(n * prob) of them masked, the i-th with int(ratio * h * w)
        patches for a ratio ~ U(r_i, r_(i+1)) on linspace(ratio, int(n * prob) + 1), the rest whole,
        then shuffled; blocks of at least `min_block_patches`, each adding at most
        max_block_fraction * h * w (its MaskingGenerator, max_num_patches 0.5 * h * w)."""
        h, w = self.grid
        masked = int(n * self.prob)
        edges = np.linspace(self.ratio[0], self.ratio[1], masked + 1)
        cap = None if self.max_block_fraction is None else self.max_block_fraction * h * w
        out = np.zeros((n, h, w), dtype=bool)
        for i in range(masked):
            count = int(h * w * _uniform(rng, edges[i], edges[i + 1]))
            if self.kind == "random":
                out[i] = random_mask(h, w, count, rng)
            else:
                out[i] = block_mask(h, w, count, rng, self.min_block_patches, self.min_aspect,
                                    fill_exact=self.fill_exact, max_block_patches=cap)
        return out[rng.permutation(n)]


# ----------------------------------------------------------------------------- visible patches


def visible_count(num_patches: int, mask_ratio: float) -> int:
    """int(N * (1 - r)) as the reference (`len_keep`), at least one."""
    return max(1, int(num_patches * (1.0 - mask_ratio)))


def dropped_mask(keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[B, K] kept (visible) patch indices -> [B, N] bool, True at the dropped (masked) patches."""
    return torch.ones(keep.shape[0], num_patches, dtype=torch.bool, device=keep.device).scatter(1, keep, False)


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """The masks' random numbers: a pure function of (seed, rank, micro-step), so a resume draws the
    same masks and ranks draw different ones (hash of a tuple of ints: the same in every process)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return torch.Generator().manual_seed(hash((seed, rank, micro_step)) & (2**62 - 1))


def random_visible(batch: int, num_patches: int, keep: int, generator: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """[B, keep] patch indices, uniformly random per image, in increasing order."""
    noise = torch.rand(batch, num_patches, generator=generator, device=generator.device).to(device)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def attentive_visible(cls_attn: torch.Tensor, keep: int, generator: torch.Generator | None = None,
                      sampling: str = "multinomial") -> torch.Tensor:
    """[B, keep] indices, in increasing order, of patches drawn without replacement with probability
    proportional to the teacher's [CLS] attention (`multinomial`), or of the `keep` most attended (`topk`).
    The first `keep` of a full multinomial permutation (what the reference keeps) are a `keep`-draw."""
    if sampling == "topk":
        return cls_attn.topk(keep, dim=1).indices.sort(dim=1).values
    weights = cls_attn.detach().float().to(generator.device if generator is not None else cls_attn.device)
    picked = torch.multinomial(weights, keep, replacement=False, generator=generator)
    return picked.to(cls_attn.device).sort(dim=1).values
