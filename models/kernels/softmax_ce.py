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

SoftmaxCEFn = Callable[..., torch.Tensor]


def softmax_ce_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
                         student_temp: float, teacher_temp: float, teacher_rows: torch.Tensor | None = None,
                         teacher_sum: torch.Tensor | None = None) -> torch.Tensor:
    """student_logits: [R, K]; teacher_logits: [R_t, K]; center: [K] or [1, K]. Returns [R] fp32.

    Student row i is paired with teacher row `teacher_rows[i]` (default: row i, R_t == R).
    `teacher_sum` ([K] fp32), if given, gets the column sums of every row of `teacher_logits`
    added to it: the statistics of the teacher center's update.
    """
    if teacher_sum is not None:
        teacher_sum += teacher_logits.detach().float().sum(0)
    if teacher_rows is not None:
        teacher_logits = teacher_logits[teacher_rows]
    teacher = F.softmax((teacher_logits.float() - center.float()) / teacher_temp, dim=-1)
    return -(teacher * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)


if triton is not None:

    @triton.jit
    def _softmax_ce_fwd(S, T, T_IDX, EXTRA, C, LOSS, STATS, TSUM, R, E, K, stride_s, stride_t, inv_ts, inv_tt,
                        HAS_IDX: tl.constexpr, HAS_SUM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """BLOCK_R work rows per program, one online pass over K. Work rows w < R pair student row w
        with teacher row T_IDX[w] (or w); rows R <= w < R + E are teacher rows EXTRA[w - R] that
        only add to the column sums TSUM, so every teacher row is read exactly once."""
        w = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        is_loss = w < R
        is_row = w < R + E
        t_row = w
        if HAS_IDX:
            t_row = tl.load(T_IDX + w, mask=is_loss, other=0)
        if HAS_SUM:
            t_row = tl.where(is_loss, t_row, tl.load(EXTRA + (w - R), mask=is_row & (w >= R), other=0))
        s_ptr = S + w.to(tl.int64)[:, None] * stride_s
        t_ptr = T + t_row.to(tl.int64)[:, None] * stride_t
        m_t = tl.full([BLOCK_R], float("-inf"), tl.float32)  # teacher running max, sum of exp, and
        l_t = tl.zeros([BLOCK_R], tl.float32)                # sum of exp(t' - m_t) * s' (rescaled alike)
        acc = tl.zeros([BLOCK_R], tl.float32)
        m_s = tl.full([BLOCK_R], float("-inf"), tl.float32)  # student running max and sum of exp
        l_s = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, K, BLOCK_K):
            offs = start + tl.arange(0, BLOCK_K)
            valid = offs < K
            t_raw = tl.load(t_ptr + offs[None, :], mask=is_row[:, None] & valid[None, :], other=0.0).to(tl.float32)
            if HAS_SUM:
                tl.atomic_add(TSUM + offs, tl.sum(t_raw, axis=0), mask=valid)
            c = tl.load(C + offs, mask=valid, other=0.0).to(tl.float32)
            t = tl.where(valid[None, :], (t_raw - c[None, :]) * inv_tt, float("-inf"))
            s = tl.load(s_ptr + offs[None, :], mask=is_loss[:, None] & valid[None, :], other=0.0).to(tl.float32)
            s = s * inv_ts
            m_new = tl.maximum(m_t, tl.max(t, axis=1))
            p = tl.exp(t - m_new[:, None])  # 0 where invalid
            scale = tl.exp(m_t - m_new)
            l_t = l_t * scale + tl.sum(p, axis=1)
            acc = acc * scale + tl.sum(p * s, axis=1)
            m_t = m_new
            s_masked = tl.where(valid[None, :], s, float("-inf"))
            ms_new = tl.maximum(m_s, tl.max(s_masked, axis=1))
            l_s = l_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(s_masked - ms_new[:, None]), axis=1)
            m_s = ms_new
        lse_s = m_s + tl.log(l_s)
        tl.store(LOSS + w, lse_s - acc / l_t, mask=is_loss)  # -sum p log q = lse_s - sum p s'
        tl.store(STATS + w * 2, lse_s, mask=is_loss)
        tl.store(STATS + w * 2 + 1, m_t + tl.log(l_t), mask=is_loss)

    @triton.jit
    def _softmax_ce_bwd(S, T, T_IDX, C, STATS, GRAD, GRAD_S, K, stride_s, stride_t, stride_g, inv_ts, inv_tt,
                        HAS_IDX: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        t_row = row
        if HAS_IDX:
            t_row = tl.load(T_IDX + row).to(tl.int64)
        s_row, t_ptr, g_row = S + row * stride_s, T + t_row * stride_t, GRAD_S + row * stride_g
        lse_s = tl.load(STATS + row * 2)
        lse_t = tl.load(STATS + row * 2 + 1)
        g = tl.load(GRAD + row).to(tl.float32) * inv_ts
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < K
            s = tl.load(s_row + offs, mask=valid, other=0.0).to(tl.float32) * inv_ts
            c = tl.load(C + offs, mask=valid, other=0.0).to(tl.float32)
            t = (tl.load(t_ptr + offs, mask=valid, other=0.0).to(tl.float32) - c) * inv_tt
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


_BLOCK = 1024  # K chunk of the one-row-per-program kernels
_TILE_ROWS, _TILE_K = 4, 512  # the forward's tile: rows share each chunk's column-sum atomics


def _pairing(teacher_rows: torch.Tensor | None, n_student: int, teacher: torch.Tensor,
             teacher_sum: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """-> (teacher row of each student row, or None for the identity; the teacher rows that only
    the column sums need, or None)."""
    if teacher_rows is None:
        if n_student != teacher.shape[0]:
            raise ValueError(f"{n_student} student rows but {teacher.shape[0]} teacher rows: pass teacher_rows")
        return None, None
    if teacher_rows.shape != (n_student,):
        raise ValueError(f"teacher_rows has shape {tuple(teacher_rows.shape)}, expected ({n_student},)")
    idx = teacher_rows.to(teacher.device, torch.int64).contiguous()
    if teacher_sum is None:
        return idx, None
    if n_student > teacher.shape[0]:
        raise ValueError("teacher_rows names a teacher row twice: its column sums would count it twice")
    seen = torch.zeros(teacher.shape[0], dtype=torch.int8, device=teacher.device)
    seen[idx] = 1
    # the unpaired rows: a stable sort puts them first, and there are n_teacher - n_student of them if no
    # row is named twice, so the size is known on the host (a nonzero would make it wait for the GPU);
    # the check runs on the device (asynchronously: a CUDA assert if a row is named twice)
    torch._assert_async(seen.sum() == n_student, "teacher_rows names a teacher row twice")
    extra = torch.argsort(seen, stable=True)[: teacher.shape[0] - n_student]
    return idx, extra


def _check_sum(teacher_sum: torch.Tensor | None, K: int, device: torch.device) -> None:
    if teacher_sum is not None and (teacher_sum.shape != (K,) or teacher_sum.dtype != torch.float32
                                    or teacher_sum.device != device or not teacher_sum.is_contiguous()):
        raise ValueError(f"teacher_sum must be a contiguous fp32 [{K}] tensor on {device}")


def _launch_fwd(student, teacher, idx, extra, center, loss, stats, teacher_sum, ts, tt) -> None:
    R, K = student.shape[0], teacher.shape[1]
    E = 0 if extra is None else extra.numel()
    if R + E == 0:
        return
    no_rows = torch.zeros(1, dtype=torch.int64, device=teacher.device)  # stands in where a flag is off
    _softmax_ce_fwd[(triton.cdiv(R + E, _TILE_ROWS),)](
        student, teacher, no_rows if idx is None else idx, no_rows if extra is None else extra, center, loss,
        stats, loss if teacher_sum is None else teacher_sum, R, E, K, student.stride(0), teacher.stride(0),
        1.0 / ts, 1.0 / tt, HAS_IDX=idx is not None, HAS_SUM=teacher_sum is not None, BLOCK_R=_TILE_ROWS,
        BLOCK_K=min(_TILE_K, triton.next_power_of_2(K)))


def _launch_bwd(student, teacher, idx, center, stats, grad_loss, grad, ts, tt) -> None:
    R, K = student.shape
    if R:
        _softmax_ce_bwd[(R,)](student, teacher, grad_loss if idx is None else idx, center, stats, grad_loss, grad, K,
                              student.stride(0), teacher.stride(0), grad.stride(0), 1.0 / ts, 1.0 / tt,
                              HAS_IDX=idx is not None, BLOCK=min(_BLOCK, triton.next_power_of_2(K)))


class _SoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, center, student_temp, teacher_temp, idx, extra, teacher_sum):
        student, teacher = student.contiguous(), teacher.contiguous()
        center = center.reshape(-1).clone()  # a copy: the caller may update its center before backward
        R = student.shape[0]
        loss = torch.empty(R, device=student.device, dtype=torch.float32)
        stats = torch.empty(R, 2, device=student.device, dtype=torch.float32)
        _launch_fwd(student, teacher, idx, extra, center, loss, stats, teacher_sum, student_temp, teacher_temp)
        ctx.save_for_backward(student, teacher, idx, center, stats)
        ctx.temps = (student_temp, teacher_temp)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        student, teacher, idx, center, stats = ctx.saved_tensors
        grad = torch.empty_like(student)
        _launch_bwd(student, teacher, idx, center, stats, grad_loss.contiguous(), grad, *ctx.temps)
        return grad, None, None, None, None, None, None, None


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
                      student_temp: float, teacher_temp: float, teacher_rows: torch.Tensor | None = None,
                      teacher_sum: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `softmax_ce_reference` (gradients for the student logits only). The column
    sums come out of the loss pass; with them, `teacher_rows` must not repeat a row."""
    if triton is None:
        raise RuntimeError("softmax_ce_triton needs the triton package")
    _check_sum(teacher_sum, teacher_logits.shape[1], teacher_logits.device)
    idx, extra = _pairing(teacher_rows, student_logits.shape[0], teacher_logits, teacher_sum)
    return _SoftmaxCE.apply(student_logits, teacher_logits.detach(), center.detach(), student_temp, teacher_temp,
                            idx, extra, teacher_sum)


class _FusedLinearSoftmaxCE(torch.autograd.Function):
    """loss = softmax_ce(hidden @ weight^T, ...) with the logits alive one row chunk at a time:
    forward computes each chunk's logits, runs the kernel and drops them; backward recomputes
    them (one extra matmul) and turns the kernel's chunk of dL/dlogits into dL/dhidden and
    dL/dweight at once."""

    @staticmethod
    def _chunks(R, chunk_rows, teacher, idx):
        """(a, b, teacher, teacher-row index) per chunk of student rows; at least one chunk."""
        for a in range(0, max(R, 1), chunk_rows):
            b = min(a + chunk_rows, R)
            yield a, b, (teacher[a:b], None) if idx is None else (teacher, idx[a:b])

    @staticmethod
    def forward(ctx, hidden, weight, teacher, center, student_temp, teacher_temp, idx, extra, teacher_sum,
                chunk_rows):
        hidden, teacher = hidden.contiguous(), teacher.contiguous()
        center = center.reshape(-1).clone()
        R = hidden.shape[0]
        loss = torch.empty(R, device=hidden.device, dtype=torch.float32)
        stats = torch.empty(R, 2, device=hidden.device, dtype=torch.float32)
        for a, b, (t, i) in _FusedLinearSoftmaxCE._chunks(R, chunk_rows, teacher, idx):
            last = b == R  # the rows only the column sums need go with the last chunk
            _launch_fwd(hidden[a:b] @ weight.t(), t, i, extra if last else None, center, loss[a:b], stats[a:b],
                        teacher_sum, student_temp, teacher_temp)
        ctx.save_for_backward(hidden, weight, teacher, idx, center, stats)
        ctx.args = (student_temp, teacher_temp, chunk_rows)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, teacher, idx, center, stats = ctx.saved_tensors
        ts, tt, chunk_rows = ctx.args
        R = hidden.shape[0]
        grad_loss = grad_loss.contiguous()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        for a, b, (t, i) in _FusedLinearSoftmaxCE._chunks(R, chunk_rows, teacher, idx):
            logits = hidden[a:b] @ weight.t()
            grad_logits = torch.empty_like(logits)
            _launch_bwd(logits, t, i, center, stats[a:b], grad_loss[a:b], grad_logits, ts, tt)
            grad_hidden[a:b] = grad_logits @ weight
            # bf16 operands on the tensor cores, fp32 accumulation inside the GEMM, as the forward's
            # logits; only the chunk's [K, C] product is rounded before it is summed in fp32 (casting
            # the operands first cost an fp32 [chunk_rows, K] copy, 512 MB at K = 131072, and fp32 math).
            grad_weight.add_(grad_logits.t() @ hidden[a:b])
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None, None, None, None


def fused_linear_softmax_ce(hidden: torch.Tensor, weight: torch.Tensor, teacher_logits: torch.Tensor,
                            center: torch.Tensor, student_temp: float, teacher_temp: float,
                            teacher_rows: torch.Tensor | None = None, teacher_sum: torch.Tensor | None = None,
                            chunk_rows: int = 1024) -> torch.Tensor:
    """softmax_ce(hidden @ weight^T, teacher_logits, ...) without the [R, K] student logits.

    hidden: [R, C] (the head's normalised bottleneck), weight: [K, C] (the prototypes, already
    weight-normalised by the caller, so that normalisation keeps its own autograd). Gradients for
    hidden and weight; none for the teacher side. `teacher_rows` and `teacher_sum` as in
    `softmax_ce_reference`. Peak extra memory: one [chunk_rows, K] block.
    """
    if triton is None:
        raise RuntimeError("fused_linear_softmax_ce needs the triton package")
    _check_sum(teacher_sum, teacher_logits.shape[1], teacher_logits.device)
    idx, extra = _pairing(teacher_rows, hidden.shape[0], teacher_logits, teacher_sum)
    return _FusedLinearSoftmaxCE.apply(hidden, weight, teacher_logits.detach(), center.detach(), student_temp,
                                       teacher_temp, idx, extra, teacher_sum, chunk_rows)


def fused_linear_softmax_ce_reference(hidden: torch.Tensor, weight: torch.Tensor, *args, **kw) -> torch.Tensor:
    """The definition the fused kernel is tested against: the logits, then the loss."""
    return softmax_ce_reference(F.linear(hidden, weight), *args, **kw)


IMPLEMENTATIONS: dict[str, SoftmaxCEFn] = {"torch": softmax_ce_reference}
FUSED_LINEAR_IMPLEMENTATIONS: dict[str, SoftmaxCEFn] = {"torch": fused_linear_softmax_ce_reference}
HARD_CE_IMPLEMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"torch": hard_ce_reference}
if triton is not None:
    IMPLEMENTATIONS["triton"] = softmax_ce_triton
    FUSED_LINEAR_IMPLEMENTATIONS["triton"] = fused_linear_softmax_ce
    HARD_CE_IMPLEMENTATIONS["triton"] = hard_ce_triton


