"""Feature alignment to a frozen teacher: adapters and MaskAlign's Dynamic Alignment (seed 001).

These modules exist only during pretraining: they live beside the student backbone, not inside
it, so an exported backbone never contains them.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def adapter(in_dim: int, out_dim: int, hidden_dim: int | None = None) -> nn.Sequential:
    """A light 2-layer MLP from student width to teacher width."""
    hidden_dim = hidden_dim or out_dim
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


def layerwise_matrix(n_student: int, n_teacher: int) -> torch.Tensor:
    """S x T matrix with a single 1 per column: teacher level j <- the student level at the same
    relative depth. With S == T it is the identity (the paper's layer-wise alignment)."""
    w = torch.zeros(n_student, n_teacher)
    for j in range(n_teacher):
        i = round(j * (n_student - 1) / (n_teacher - 1)) if n_teacher > 1 else n_student - 1
        w[i, j] = 1.0
    return w


class DynamicAlign(nn.Module):
    """y_hat_j = sum_i w_ij A_i(x_i): an adapter A_i per student level and a learnable S x T
    matrix W mixing the adapted student levels into each teacher level.

    W starts as the layer-wise mapping so the first steps already align matching depths; with
    `dynamic=False` it stays there (the paper's layer-wise ablation).
    """

    def __init__(self, student_dim: int, teacher_dim: int, n_student: int, n_teacher: int,
                 hidden_dim: int | None = None, dynamic: bool = True):
        super().__init__()
        self.adapters = nn.ModuleList(adapter(student_dim, teacher_dim, hidden_dim) for _ in range(n_student))
        w = layerwise_matrix(n_student, n_teacher)
        if dynamic:
            self.weight = nn.Parameter(w)
        else:
            self.register_buffer("weight", w)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features: S tensors [B, K, C_s] -> [T, B, K, C_t]."""
        adapted = torch.stack([a(x) for a, x in zip(self.adapters, features)])  # [S, B, K, C_t]
        return torch.einsum("st,sbkc->tbkc", self.weight.to(adapted.dtype), adapted)
