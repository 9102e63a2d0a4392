"""The DINO/iBOT distillation cross-entropy over K prototypes, per row.

    loss[r] = - sum_k softmax((t[r] - c) / tt)_k * log_softmax(s[r] / ts)_k

`softmax_ce_reference` is the PyTorch definition the Triton kernel must match (same signature).
Everything is computed in fp32 whatever the input dtype: the softmaxes over 8k-64k prototypes
are where bf16 runs go NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_ce_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
                         student_temp: float, teacher_temp: float) -> torch.Tensor:
    """student_logits, teacher_logits: [R, K]; center: [K] or [1, K]. Returns [R] fp32."""
    teacher = F.softmax((teacher_logits.float() - center.float()) / teacher_temp, dim=-1)
    return -(teacher * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)
