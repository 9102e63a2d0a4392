"""Linear probe on cached frozen features, as iBOT/DINO evaluate (a linear layer on the [CLS]
token, optionally concatenated with the average patch token), but trained on features computed
once rather than re-extracted every epoch: seconds on digits (CPU). It runs where the features are
(the GPU in scripts/evaluate.py); its cost at ImageNet scale (7 learning rates x epochs passes over
the cached features) has not been measured here.

The learning rate is picked by accuracy on a held-out part of the train split (never on val),
from a small sweep; each candidate is SGD with momentum 0.9, no weight decay and a cosine
schedule, as DINO's `eval_linear.py`. Features are standardised with the fit part's mean and
standard deviation (what a BatchNorm without affine parameters in front of the layer does at
evaluation), which lets one learning-rate grid serve every backbone width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top1 = (ranked[:, 0] == labels).float().mean().item()
    top5 = (ranked == labels.unsqueeze(1)).any(dim=1).float().mean().item()
    return 100.0 * top1, 100.0 * top5


def _train(x: torch.Tensor, y: torch.Tensor, num_classes: int, lr: float, epochs: int, batch_size: int,
           generator: torch.Generator) -> torch.nn.Linear:
    layer = torch.nn.Linear(x.shape[1], num_classes, device=x.device)
    torch.nn.init.normal_(layer.weight, std=0.01, generator=generator)  # DINO's LinearClassifier init
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator, device="cpu").to(x.device)
        for start in range(0, x.shape[0], batch_size):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(layer(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return layer


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, lrs: tuple[float, ...] = LRS, epochs: int = 100, batch_size: int = 256,
                 held_out: float = 0.1, seed: int = 0) -> dict:
    """-> {"top1", "top5" (on val, %), "lr" (picked), "held_out_top1" {lr: %}}."""
    g = torch.Generator().manual_seed(seed)
    n = train_features.shape[0]
    order = torch.randperm(n, generator=g)
    n_hold = max(1, int(round(n * held_out)))
    hold, fit = order[:n_hold], order[n_hold:]
    x, y = train_features.float(), train_labels.long()
    mean, std = x[fit].mean(0), x[fit].std(0).clamp_min(1e-6)
    x, xv = (x - mean) / std, (val_features.float() - mean) / std
    num_classes = int(max(y.max(), val_labels.max())) + 1
    scores, layers = {}, {}
    for lr in lrs:
        layer = _train(x[fit], y[fit], num_classes, lr, epochs, batch_size, g)
        with torch.no_grad():
            scores[lr] = _accuracy(layer(x[hold]), y[hold])[0]
        layers[lr] = layer
    best = max(lrs, key=lambda lr: (scores[lr], -lr))
    with torch.no_grad():
        top1, top5 = _accuracy(layers[best](xv), val_labels.long())
    return {"top1": top1, "top5": top5, "lr": best, "held_out_top1": scores}
