"""Weighted k-nearest-neighbour accuracy of frozen features (DINO's protocol: k=20, T=0.07)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Top-1 accuracy (%) of cosine-similarity kNN with votes weighted by exp(sim / T)."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    num_classes = int(train_labels.max()) + 1
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, test.shape[0], chunk):
        sim, idx = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[start:start + chunk]).sum().item()
    return 100.0 * correct / test.shape[0]


@torch.no_grad()
def extract_features(features: Callable[[torch.Tensor], torch.Tensor], batches: Iterator,
                     prepare: Callable[[torch.Tensor], torch.Tensor],
                     dummy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every sample over all ranks, on every rank.

    Ranks step in lockstep (under ZeRO-3 every forward is collective): a rank whose share is
    exhausted runs a one-image dummy forward until all are done.
    """
    distributed = dist.is_available() and dist.is_initialized()
    out_f, out_y = [], []
    while True:
        batch = next(batches, None)
        more = torch.tensor([0 if batch is None else 1])
        if distributed:
            dist.all_reduce(more)
        if more.item() == 0:
            break
        if batch is None:
            features(prepare(dummy))
            continue
        images, labels = batch
        out_f.append(features(prepare(images)).float().cpu())
        out_y.append(labels)
    f = torch.cat(out_f) if out_f else torch.zeros(0, 0)
    y = torch.cat(out_y) if out_y else torch.zeros(0, dtype=torch.long)
    if distributed:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (f, y))
        f = torch.cat([g[0] for g in gathered if g[0].numel()])
        y = torch.cat([g[1] for g in gathered if g[1].numel()])
    return f, y
