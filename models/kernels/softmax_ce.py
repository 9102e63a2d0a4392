"""The DINO/iBOT distillation cross-entropy over K prototypes, per row.

    loss[r] = - sum_k softmax((t[r] - c) / tt)_k * log_softmax(s[r] / ts)_k

`softmax_ce_reference` is the PyTorch definition; `softmax_ce_triton` computes the same thing in
one pass over K per row (online max / sum for both softmaxes, so no [R, K] fp32 temporaries) and
its backward in a second pass from three fp32 numbers saved per row. Both compute in fp32
whatever the input dtype: the softmaxes over 8k-64k prototypes are where bf16 runs go NaN.

Gradients flow to the student logits only: the teacher side is a target (iBOT computes it under
no_grad), so the Triton version returns no gradient for the teacher logits or the center.

Also here: `fused_linear_softmax_ce` (the prototype projection fused in, so the [R, K] student
logits never exist whole) and `hard_ce_*` (cross-entropy against class indices: BEiT's tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with Linux torch wheels
    triton = None

SoftmaxCEFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def softmax_ce_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
                         student_temp: float, teacher_temp: float) -> torch.Tensor:
    """student_logits, teacher_logits: [R, K]; center: [K] or [1, K]. Returns [R] fp32."""
    teacher = F.softmax((teacher_logits.float() - center.float()) / teacher_temp, dim=-1)
    return -(teacher * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)


if triton is not None:

    @triton.jit
    def _scaled_logits(s_row, t_row, C, offs, valid, inv_ts, inv_tt):
        """One chunk of s / ts and (t - c) / tt in fp32 (0 outside the row)."""
        s = tl.load(s_row + offs, mask=valid, other=0.0).to(tl.float32) * inv_ts
        c = tl.load(C + offs, mask=valid, other=0.0).to(tl.float32)
        t = (tl.load(t_row + offs, mask=valid, other=0.0).to(tl.float32) - c) * inv_tt
        return s, t

    @triton.jit
    def _softmax_ce_fwd(S, T, C, LOSS, STATS, K, stride_s, stride_t, inv_ts, inv_tt, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s_row, t_row = S + row * stride_s, T + row * stride_t
        m_t = tl.full([], float("-inf"), tl.float32)  # teacher running max, sum of exp, and
        l_t = tl.zeros([], tl.float32)                # sum of exp(t' - m_t) * s' (rescaled alike)
        acc = tl.zeros([], tl.float32)
        m_s = tl.full([], float("-inf"), tl.float32)  # student running max and sum of exp
        l_s = tl.zeros([], tl.float32)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < K
            s, t = _scaled_logits(s_row, t_row, C, offs, valid, inv_ts, inv_tt)
            t = tl.where(valid, t, float("-inf"))
            m_new = tl.maximum(m_t, tl.max(t, axis=0))
            p = tl.exp(t - m_new)  # 0 where invalid
            scale = tl.exp(m_t - m_new)
            l_t = l_t * scale + tl.sum(p, axis=0)
            acc = acc * scale + tl.sum(p * s, axis=0)
            m_t = m_new
            s_masked = tl.where(valid, s, float("-inf"))
            ms_new = tl.maximum(m_s, tl.max(s_masked, axis=0))
            l_s = l_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(s_masked - ms_new), axis=0)
            m_s = ms_new
        lse_s = m_s + tl.log(l_s)
        tl.store(LOSS + row, lse_s - acc / l_t)  # -sum p log q = lse_s - sum p s'
        tl.store(STATS + row * 2, lse_s)
        tl.store(STATS + row * 2 + 1, m_t + tl.log(l_t))

    @triton.jit
    def _softmax_ce_bwd(S, T, C, STATS, GRAD, GRAD_S, K, stride_s, stride_t, stride_g, inv_ts, inv_tt,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s_row, t_row, g_row = S + row * stride_s, T + row * stride_t, GRAD_S + row * stride_g
        lse_s = tl.load(STATS + row * 2)
        lse_t = tl.load(STATS + row * 2 + 1)
        g = tl.load(GRAD + row).to(tl.float32) * inv_ts
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < K
            s, t = _scaled_logits(s_row, t_row, C, offs, valid, inv_ts, inv_tt)
            grad = g * (tl.exp(s - lse_s) - tl.exp(t - lse_t))  # d loss / d s = (q - p) / ts
            tl.store(g_row + offs, grad.to(GRAD_S.dtype.element_ty), mask=valid)


    @triton.jit
    def _hard_ce_fwd(S, Y, LOSS, LSE, K, stride_s, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s_row = S + row * stride_s
        m = tl.full([], float("-inf"), tl.float32)
        l = tl.zeros([], tl.float32)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            s = tl.load(s_row + offs, mask=offs < K, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(s, axis=0))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
            m = m_new
        lse = m + tl.log(l)
        target = tl.load(s_row + tl.load(Y + row)).to(tl.float32)
        tl.store(LOSS + row, lse - target)
        tl.store(LSE + row, lse)

    @triton.jit
    def _hard_ce_bwd(S, Y, LSE, GRAD, GRAD_S, K, stride_s, stride_g, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        lse = tl.load(LSE + row)
        g = tl.load(GRAD + row).to(tl.float32)
        y = tl.load(Y + row)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < K
            s = tl.load(S + row * stride_s + offs, mask=valid, other=0.0).to(tl.float32)
            grad = g * (tl.exp(s - lse) - tl.where(offs == y, 1.0, 0.0))  # softmax - one-hot
            tl.store(GRAD_S + row * stride_g + offs, grad.to(GRAD_S.dtype.element_ty), mask=valid)


_BLOCK = 1024


class _SoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, center, student_temp, teacher_temp):
        student, teacher = student.contiguous(), teacher.contiguous()
        center = center.reshape(-1).clone()  # a copy: iBOT updates its center in place before backward
        R, K = student.shape
        loss = torch.empty(R, device=student.device, dtype=torch.float32)
        stats = torch.empty(R, 2, device=student.device, dtype=torch.float32)
        block = min(_BLOCK, triton.next_power_of_2(K))
        if R:
            _softmax_ce_fwd[(R,)](student, teacher, center, loss, stats, K, student.stride(0), teacher.stride(0),
                                  1.0 / student_temp, 1.0 / teacher_temp, BLOCK=block)
        ctx.save_for_backward(student, teacher, center, stats)
        ctx.temps, ctx.block = (student_temp, teacher_temp), block
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        student, teacher, center, stats = ctx.saved_tensors
        R, K = student.shape
        grad = torch.empty_like(student)
        if R:
            ts, tt = ctx.temps
            _softmax_ce_bwd[(R,)](student, teacher, center, stats, grad_loss.contiguous(), grad, K, student.stride(0),
                                  teacher.stride(0), grad.stride(0), 1.0 / ts, 1.0 / tt, BLOCK=ctx.block)
        return grad, None, None, None, None


class _HardCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels):
        logits, labels = logits.contiguous(), labels.contiguous()
        R, K = logits.shape
        loss = torch.empty(R, device=logits.device, dtype=torch.float32)
        lse = torch.empty(R, device=logits.device, dtype=torch.float32)
        block = min(_BLOCK, triton.next_power_of_2(K))
        if R:
            _hard_ce_fwd[(R,)](logits, labels, loss, lse, K, logits.stride(0), BLOCK=block)
        ctx.save_for_backward(logits, labels, lse)
        ctx.block = block
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, lse = ctx.saved_tensors
        R, K = logits.shape
        grad = torch.empty_like(logits)
        if R:
            _hard_ce_bwd[(R,)](logits, labels, lse, grad_loss.contiguous(), grad, K, logits.stride(0), grad.stride(0),
                               BLOCK=ctx.block)
        return grad, None


def hard_ce_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class indices (BEiT's visual tokens), per row, in fp32: [R]."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def hard_ce_triton(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Same contract as `hard_ce_reference`: one online pass over K forward, one backward."""
    if triton is None:
        raise RuntimeError("hard_ce_triton needs the triton package")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]})")
    return _HardCE.apply(logits, labels.long())


def softmax_ce_triton(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
                      student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Same contract as `softmax_ce_reference` (gradients for the student logits only)."""
    if triton is None:
        raise RuntimeError("softmax_ce_triton needs the triton package")
    return _SoftmaxCE.apply(student_logits, teacher_logits.detach(), center.detach(), student_temp, teacher_temp)


class _FusedLinearSoftmaxCE(torch.autograd.Function):
    """loss = softmax_ce(hidden @ weight^T, ...) with the logits alive one row chunk at a time:
    forward computes each chunk's logits, runs the kernel and drops them; backward recomputes
    them (one extra matmul) and turns the kernel's chunk of dL/dlogits into dL/dhidden and
    dL/dweight at once."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher, center, student_temp, teacher_temp, chunk_rows):
        hidden, teacher = hidden.contiguous(), teacher.contiguous()
        center = center.reshape(-1).clone()
        R, K = hidden.shape[0], weight.shape[0]
        loss = torch.empty(R, device=hidden.device, dtype=torch.float32)
        stats = torch.empty(R, 2, device=hidden.device, dtype=torch.float32)
        block = min(_BLOCK, triton.next_power_of_2(K))
        for a in range(0, R, chunk_rows):
            b = min(a + chunk_rows, R)
            logits = hidden[a:b] @ weight.t()
            _softmax_ce_fwd[(b - a,)](logits, teacher[a:b], center, loss[a:b], stats[a:b], K, logits.stride(0),
                                      teacher.stride(0), 1.0 / student_temp, 1.0 / teacher_temp, BLOCK=block)
        ctx.save_for_backward(hidden, weight, teacher, center, stats)
        ctx.args = (student_temp, teacher_temp, chunk_rows, block)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, teacher, center, stats = ctx.saved_tensors
        ts, tt, chunk_rows, block = ctx.args
        R, K = hidden.shape[0], weight.shape[0]
        grad_loss = grad_loss.contiguous()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        for a in range(0, R, chunk_rows):
            b = min(a + chunk_rows, R)
            logits = hidden[a:b] @ weight.t()
            grad_logits = torch.empty_like(logits)
            _softmax_ce_bwd[(b - a,)](logits, teacher[a:b], center, stats[a:b], grad_loss[a:b], grad_logits, K,
                                      logits.stride(0), teacher.stride(0), grad_logits.stride(0), 1.0 / ts, 1.0 / tt,
                                      BLOCK=block)
            grad_hidden[a:b] = grad_logits @ weight
            grad_weight.addmm_(grad_logits.t().float(), hidden[a:b].float())
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def fused_linear_softmax_ce(hidden: torch.Tensor, weight: torch.Tensor, teacher_logits: torch.Tensor,
                            center: torch.Tensor, student_temp: float, teacher_temp: float,
                            chunk_rows: int = 1024) -> torch.Tensor:
    """softmax_ce(hidden @ weight^T, teacher_logits, ...) without the [R, K] student logits.

    hidden: [R, C] (the head's normalised bottleneck), weight: [K, C] (the prototypes, already
    weight-normalised by the caller, so that normalisation keeps its own autograd). Gradients for
    hidden and weight; none for the teacher side. Peak extra memory: one [chunk_rows, K] block.
    """
    if triton is None:
        raise RuntimeError("fused_linear_softmax_ce needs the triton package")
    return _FusedLinearSoftmaxCE.apply(hidden, weight, teacher_logits.detach(), center.detach(), student_temp,
                                       teacher_temp, chunk_rows)


IMPLEMENTATIONS: dict[str, SoftmaxCEFn] = {"torch": softmax_ce_reference}
if triton is not None:
    IMPLEMENTATIONS["triton"] = softmax_ce_triton


def get_softmax_ce(impl: str = "auto") -> SoftmaxCEFn:
    """'torch', 'triton', or 'auto' (the reference until the kernel has been measured faster on a GPU)."""
    if impl == "auto":
        return softmax_ce_reference
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"softmax-CE implementation {impl!r} is not one of {sorted(IMPLEMENTATIONS)} or 'auto'")
    return IMPLEMENTATIONS[impl]
