"""Feature alignment to a frozen teacher: adapters and MaskAlign's Dynamic Alignment (seed 001).

These modules exist only during pretraining: they live beside the student backbone, not inside
it, so an exported backbone never contains them.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def adapter(in_dim: int, out_dim: int, hidden_dim: int | None = None, kind: str = "mlp") -> nn.Module:
    """'linear': one layer (MaskAlign's --head_type linear); 'mlp': Linear-GELU-Linear, hidden width
    `hidden_dim` (default: `in_dim`, as the reference's --head_type mlp)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind != "mlp":
        raise ValueError(f"adapter kind {kind!r} is not 'linear' or 'mlp'")
    hidden_dim = hidden_dim or in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


def layerwise_matrix(student_blocks: list[int], teacher_blocks: list[int], student_depth: int,
                     teacher_depth: int) -> torch.Tensor:
    """[T, S]: a single 1 per row, teacher block t <- the chosen student block nearest to the same
    relative depth. With equal depths and every block chosen it is the identity."""
    # On the CPU whatever the default device (a model built on the meta device needs its values)
    w = torch.zeros(len(teacher_blocks), len(student_blocks), device="cpu")
    s_rel = torch.tensor([b / max(student_depth - 1, 1) for b in student_blocks], device="cpu")
    for j, t in enumerate(teacher_blocks):
        w[j, (s_rel - t / max(teacher_depth - 1, 1)).abs().argmin()] = 1.0
    return w


class DynamicAlign(nn.Module):
    """Maps S student levels onto T teacher levels through a learnable T x S matrix W.

    `adapter_on`:
    - 'teacher_level' (MaskAlign's code, models_pretrain.py `get_student`): y_j = A_j(sum_i W_ji x_i),
      W mixes the raw student levels, then one adapter per teacher level;
    - 'student_level' (the paper, y_j = sum_i w_ij A_i(x_i)): one adapter per student level, then W
      mixes the adapted features.
    W starts at `start` (the layer-wise mapping) plus `offset` everywhere (the code: eye + 0.01); with
    `dynamic=False` it stays there (the paper's layer-wise ablation). The layout is the code's
    `distill_weights`: row j is teacher level j.
    """

    def __init__(self, student_dim: int, teacher_dim: int, start: torch.Tensor, adapter_on: str = "teacher_level",
                 kind: str = "linear", hidden_dim: int | None = None, dynamic: bool = True, offset: float = 0.01):
        super().__init__()
        if adapter_on not in ("teacher_level", "student_level"):
            raise ValueError(f"adapter_on {adapter_on!r} is not 'teacher_level' or 'student_level'")
        n_teacher, n_student = start.shape
        self.adapter_on = adapter_on
        count = n_teacher if adapter_on == "teacher_level" else n_student
        self.adapters = nn.ModuleList(adapter(student_dim, teacher_dim, hidden_dim, kind) for _ in range(count))
        w = start.float() + offset
        if dynamic:
            self.weight = nn.Parameter(w)
        else:
            self.register_buffer("weight", w)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features: S tensors [B, n, C_s] -> [T, B, n, C_t]."""
        x = torch.stack(features)  # [S, B, n, C_s]
        w = self.weight.to(x.dtype)
        if self.adapter_on == "teacher_level":
            mixed = torch.einsum("ts,sbnc->tbnc", w, x)
            return torch.stack([a(m) for a, m in zip(self.adapters, mixed)])
        adapted = torch.stack([a(f) for a, f in zip(self.adapters, features)])  # [S, B, n, C_t]
        return torch.einsum("ts,sbnc->tbnc", w, adapted)
