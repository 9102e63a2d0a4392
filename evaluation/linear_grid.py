"""DINOv2's linear evaluation (facebookresearch/dinov2 dinov2/eval/linear.py) and its logistic
regression (dinov2/eval/log_regression.py), on frozen features.

Linear grid: one linear layer per (learning rate, last 1 or 4 blocks' [CLS] tokens concatenated,
with or without the last block's mean patch token appended), every token through the final norm
(DINOv2's `get_intermediate_layers(norm=True)`), all trained side by side on the same batches
(10 epochs of 1,250 steps of 128) of features of augmented crops (RandomResizedCrop 0.08-1, bicubic, and flips, DINOv2's
`make_classification_train_transform`): SGD with momentum 0.9, no weight decay, lr x batch / 256,
cosine to 0, weights N(0, 0.01). Where DINOv2 keeps the classifier best on its validation set,
this one is chosen on a held-out tenth of the train images (centre crops) and the validation
figure of DINOv2's choice is reported beside it. One difference in how: DINOv2 crops anew at every
step; here `views` crops of each train image are cut and their features cached once, so the
grid costs `views` passes of the backbone.

Logistic regression: L2-regularised multinomial regression (scikit-learn's lbfgs, float64, at most
1,000 iterations) on the pooled features of centre crops, C from 10^-6 to 10^5 in 45 log steps
chosen on a random tenth of the train images (seed 0), then refitted on all of train with that C,
as DINOv2 does with cuML on the GPU. scikit-learn runs on the CPU: fine for the digits and for
few-label subsets (iBOT's 1% of ImageNet), not for all of ImageNet.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .linear import _accuracy

DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
BLOCKS = 4  # the last 1 and the last 4 blocks (fewer in a network that has fewer)
C_VALUES = tuple(10 ** float(p) for p in np.linspace(-6, 5, 45))


def grid_features(tokens: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The last t blocks' (cls [B, C], patch [B, N, C]), oldest first -> [B, (t + 1) C]: their [CLS]
    tokens, then the last block's mean patch token. Every configuration's input is a slice of it."""
    return torch.cat([*(c for c, _ in tokens), tokens[-1][1].mean(dim=1)], dim=-1)


def grid_inputs(features: torch.Tensor, blocks: int) -> dict[tuple[int, bool], torch.Tensor]:
    """[B, (blocks + 1) C] -> {(n, avgpool): [B, nC (+ C)]} for n in 1 and `blocks`, as DINOv2's
    create_linear_input orders them: the last n [CLS] tokens concatenated, then the mean patch
    token if avgpool."""
    c = features.shape[1] // (blocks + 1)
    last = blocks * c
    return {(n, avg): features[:, last - n * c: last + (c if avg else 0)] for n in sorted({1, blocks})
            for avg in (False, True)}


def split_held_out(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held-out) indices: a random tenth held out, as DINOv2's log regression holds out 10% of train."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, n // 10)
    return order[k:], order[:k]


def grid_masks(width: int, blocks: int) -> tuple[list[tuple[int, bool]], torch.Tensor]:
    """The configurations and, for the [B, (blocks + 1) C] features, which columns each one reads [G, width]."""
    index = torch.arange(width)[None]
    keys, masks = [], []
    for key, cols in grid_inputs(index, blocks).items():
        keys.append(key)
        masks.append(torch.zeros(width).index_fill_(0, cols[0], 1.0))
    return keys, torch.stack(masks)


def train_grid(features: torch.Tensor, y_train: torch.Tensor, num_classes: int, blocks: int, lrs=DINOV2_LRS,
               epochs: int = 10, epoch_length: int = 1250, batch_size: int = 128, seed: int = 0) -> dict:
    """Every (configuration, lr)'s linear layer, trained on the same batches of `features` [N, (blocks + 1) C] for
    `epochs` x `epoch_length` steps (DINOv2's epochs are 1,250 steps whatever the data set's size)
    -> {(n, avg, lr): (weight [5C, K], bias [K])}.

    All layers are one [(blocks + 1) C, G x L x K] weight whose rows outside a configuration's input stay zero
    (a layer on a slice of the features), trained with the softmax cross-entropy's gradient written
    out: one matmul per step instead of G x L small ones. SGD with momentum 0.9 and no weight
    decay is linear in the gradient, so each layer's lr (x batch / 256, DINOv2's scale_lr, times the
    cosine) scales its gradient before the momentum."""
    g = torch.Generator().manual_seed(seed)
    keys, masks = grid_masks(features.shape[1], blocks)
    layers = [(key, lr) for key in keys for lr in lrs]
    m, d, k = len(layers), features.shape[1], num_classes
    # one [D, M x K] matrix: a single GEMM per step; mask: which rows feed each layer's K columns
    mask = masks.repeat_interleave(len(lrs), dim=0).T.repeat_interleave(k, dim=1)  # [D, M x K]
    scale = (torch.tensor(lrs * len(keys), dtype=torch.float32) * batch_size / 256).repeat_interleave(k)
    w = torch.randn(d, m * k, generator=g) * 0.01 * mask
    b = torch.zeros(m * k)
    mw, mb = torch.zeros_like(w), torch.zeros_like(b)
    n, total = y_train.shape[0], epochs * epoch_length
    order, at = torch.randperm(n, generator=g), 0
    rows = torch.arange(batch_size)
    for step in range(total):
        if at + batch_size > n:  # a new pass over the shuffled features (DINOv2's infinite sampler)
            order, at = torch.randperm(n, generator=g), 0
        idx = order[at:at + batch_size]
        at += batch_size
        x, y = features[idx], y_train[idx]
        p = torch.softmax((x @ w + b).view(len(idx), m, k), dim=-1)  # [B, M, K]
        p[rows[:len(idx)], :, y] -= 1.0
        p = p.view(len(idx), m * k) / len(idx)  # d(mean cross-entropy) / d logits, per layer
        factor = scale * 0.5 * (1 + math.cos(math.pi * step / total))
        mw.mul_(0.9).add_((x.T @ p) * mask * factor)
        mb.mul_(0.9).add_(p.sum(dim=0) * factor)
        w -= mw
        b -= mb
    return {(*key, lr): (w[:, i * k:(i + 1) * k], b[i * k:(i + 1) * k]) for i, (key, lr) in enumerate(layers)}


@torch.no_grad()
def score_grid(layers: dict, held: torch.Tensor, y_held: torch.Tensor, val: torch.Tensor, y_val: torch.Tensor) -> dict:
    """held, val: grid features -> {"rows": [(n, avg, lr, held-out top-1, val top-1, val top-5)],
    "chosen": the row best on the held-out part, "best_on_val": DINOv2's choice}."""
    rows = []
    for (n, avg, lr), (w, b) in layers.items():
        held_top1 = _accuracy(held @ w + b, y_held)[0]
        top1, top5 = _accuracy(val @ w + b, y_val)
        rows.append((n, avg, lr, held_top1, top1, top5))
    chosen = max(rows, key=lambda r: (r[3], -r[2]))
    return {"rows": rows, "chosen": chosen, "best_on_val": max(rows, key=lambda r: (r[4], -r[2]))}


def log_regression(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                   c_values=C_VALUES, max_iter: int = 1000) -> dict:
    """-> {"top1", "top5" (val, %), "C", "held_out_top1" {C: %}}: C chosen on a tenth of train (seed 0),
    the final fit on all of train."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    x, y = x_train.double().numpy(), y_train.numpy()
    fit, held = (i.numpy() for i in split_held_out(len(y)))
    scores = {}
    # one BLAS thread: on these small problems more threads cost more than they give (20x slower per fit
    # measured on 2 busy cores)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol 1e-12, as DINOv2: the iteration cap ends most fits
        for c in c_values:
            model = LogisticRegression(C=c, max_iter=max_iter, tol=1e-12).fit(x[fit], y[fit])
            scores[c] = 100.0 * float((model.predict(x[held]) == y[held]).mean())
        best = max(c_values, key=lambda c: (scores[c], -c))
        model = LogisticRegression(C=best, max_iter=max_iter, tol=1e-12).fit(x, y)
    probs = torch.from_numpy(model.predict_proba(x_val.double().numpy()))
    full = torch.zeros(len(probs), int(max(y.max(), y_val.max())) + 1, dtype=probs.dtype)
    full[:, torch.from_numpy(model.classes_).long()] = probs
    top1, top5 = _accuracy(full, y_val.long())
    return {"top1": top1, "top5": top5, "C": best, "held_out_top1": scores}
