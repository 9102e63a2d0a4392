"""Weighted k-nearest-neighbour classification of frozen features (DINO's protocol, `eval_knn.py`):
cosine similarity, the k most similar training samples vote with weight exp(sim / T), T = 0.07."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DINO_KS = (10, 20, 100, 200)


def percent(value: float | None) -> str:
    """An accuracy for people: '69.00%', or 'not measured'."""
    return f"{value:.2f}%" if value is not None else "not measured"


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: tuple[int, ...] = DINO_KS, temperature: float = 0.07,
                 chunk: int = 1024) -> dict[int, dict[str, float]]:
    """{k: {"top1": %, "top5": %}} for every k (capped at the number of training samples)."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    kmax = min(max(ks), train.shape[0])
    correct = {k: [0, 0] for k in ks}
    for start in range(0, test.shape[0], chunk):
        sim, idx = (test[start:start + chunk] @ train.T).topk(kmax, dim=1)  # sorted: any k is a prefix
        weights, neighbours = (sim / temperature).exp(), train_labels[idx]
        truth = test_labels[start:start + chunk].unsqueeze(1)
        for k in ks:
            kk = min(k, kmax)
            votes = torch.zeros(sim.shape[0], num_classes).scatter_add_(1, neighbours[:, :kk], weights[:, :kk])
            ranked = votes.topk(min(5, num_classes), dim=1).indices
            correct[k][0] += (ranked[:, :1] == truth).sum().item()
            correct[k][1] += (ranked == truth).any(dim=1).sum().item()
    n = test.shape[0]
    return {k: {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n} for k, (c1, c5) in correct.items()}
