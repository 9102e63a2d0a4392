"""Features of a labelled data set on one rank or many: each rank its share, gathered once at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (any count, possibly none), as tensors: sizes first, then one
    padded all_gather (gloo and NCCL both need equal shapes)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    most = max(int(c) for c in counts)
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(c)] for o, c in zip(out, counts)])


@torch.no_grad()
def extract_features(features: Callable[[torch.Tensor], torch.Tensor], batches: Iterator,
                     prepare: Callable[[torch.Tensor], torch.Tensor], dummy: torch.Tensor,
                     device: torch.device | None = None, progress: bool = False,
                     everywhere: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, C], labels [N]) of every sample over all ranks, on every rank.

    Ranks step in lockstep (under ZeRO-3 every forward is collective): a rank whose share is
    exhausted runs a one-image dummy forward until all are done, which also tells a rank without
    samples the feature width. `device`: where the collectives' tensors live (the GPU under NCCL).
    `everywhere=False`: only rank 0 keeps the gathered result (the others return empty tensors), so
    a node with 8 ranks holds one copy in host memory, not 8.
    """
    distributed = dist.is_available() and dist.is_initialized()
    device = device or dummy.device
    bar, width = None, None
    if progress and (not distributed or dist.get_rank() == 0):
        from tqdm import tqdm

        bar = tqdm(desc="features", unit="img")
    out_f, out_y = [], []
    while True:
        batch = next(batches, None)
        more = torch.tensor([0 if batch is None else 1], device=device)
        if distributed:
            dist.all_reduce(more)
        if more.item() == 0:
            break
        if batch is None:
            width = features(prepare(dummy)).shape[1]
            continue
        images, labels = batch
        f = features(prepare(images)).float()
        out_f.append(f)
        out_y.append(labels.to(device))
        width = f.shape[1]
        if bar is not None:
            bar.update(len(labels) * (dist.get_world_size() if distributed else 1))
    if bar is not None:
        bar.close()
    if width is None:  # no rank had a sample: every rank is here, so this forward is collective too
        width = features(prepare(dummy)).shape[1]
    f = torch.cat(out_f) if out_f else torch.zeros(0, width, device=device)
    y = torch.cat(out_y) if out_y else torch.zeros(0, dtype=torch.long, device=device)
    f, y = gather_rows(f), gather_rows(y)
    if not everywhere and distributed and dist.get_rank() != 0:
        return f[:0].cpu(), y[:0].cpu()
    return f.cpu(), y.cpu()
