"""FlashAttention-style Triton kernels: softmax(q k^T * scale + bias) v without the [L x L] matrix.

Forward: one program per (query block, sequence, head); keys and values stream through in
blocks with an online softmax (running max and sum, fp32 accumulator); the log-sum-exp of each
row is saved for backward. Backward (FlashAttention-2's split): `delta = rowsum(dO * O)`, then one
kernel per key block accumulating dK and dV over all query blocks, and one per query block
accumulating dQ over all key blocks, so dQ, dK and dV need no atomics.

The optional additive bias [H, N, N] (BEiT's relative position bias; shared by the batch) is a
constexpr switch (HAS_BIAS): without it the compiled kernels are those without the feature. Its
gradient, dS summed over the batch, is added atomically by the dK/dV kernel (see `backward`).

Head dims that are not powers of two (80, 88, 104) are handled by masking the feature axis
inside the kernel; sequence lengths need not be multiples of the block sizes. Two layouts share
the kernels: fixed-length [B, H, N, D], and packed variable-length [T, H, D] with `cu_seqlens`
(block-diagonal attention over the segments).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # inside the kernels
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# Autotune candidates per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages, where it is offered):
# "64" / "128" is the feature-tile width BLOCK_D (head dims up to 64; 80 to 128), "b" with BEiT's
# relative position bias (and its gradient). Chosen by compiling, ahead of time for sm_80 and sm_90,
# a grid of tiles (BLOCK_M 32/64/128 x BLOCK_N 32/64/128), 4 or 8 warps and 1 to 3 stages at head
# dims 64, 80 and 88, fixed-length, packed and biased (scripts/compile_kernels.py; the shipped lists
# over every head dim, layout and dtype: bench/results/kernels_compiled.json). Left out where they
# spill registers to local memory on either GPU (128-row tiles with 4 warps, 128 x 128 tiles, most
# configs once the bias tile is added at width 128; of the earlier lists (128, 128, 8, 2),
# (64, 128, 4, 2), (128, 32, 4, 3), (64, 128, 8, 2) and (128, 64, 8, 2)), and where their dots compile
# to HMMA (mma.sync) instead of HGMMA (wgmma) on sm_90: wgmma takes 64-row tiles per warpgroup, so
# BLOCK_M = 32 in dQ, and (32, 32, 4, 3) in dK/dV, lose Hopper's tensor-core instruction.
_FWD = ((128, 64, 8, 3, ("64", "128", "64b")), (64, 128, 8, 3, ("64",)), (64, 64, 4, 3, ("64", "64b")),
        (128, 32, 8, 3, ("64", "128", "64b")), (128, 128, 8, 3, ("64",)), (128, 64, 4, 3, ("64",)),
        (64, 32, 8, 3, ("128", "64b", "128b")))
# dK/dV needs BLOCK_M and BLOCK_N >= 64 for all three of its dots to be wgmma; at width 128, and with the
# bias at 64, every such tile spills, so those lists keep spill-free tiles with a 32 side, whose
# P^T dO and dS^T Q (or Q K^T) dots are mma.sync: the compiled code's trade, recorded in the JSON.
_DKDV = ((64, 64, 4, 2, ("64",)), (64, 64, 8, 2, ("64",)), (128, 32, 8, 2, ("128",)), (64, 32, 8, 2, ("128", "64b")),
         (32, 64, 8, 2, ("128",)), (128, 32, 8, 1, ("64b",)), (64, 32, 8, 1, ("64b",)), (32, 64, 8, 1, ("64b", "128b")))
_DQ = ((64, 64, 4, 2, ("64",)), (128, 64, 8, 2, ("64",)), (64, 64, 8, 2, ("64",)), (128, 32, 8, 2, ("64", "64b")),
       (64, 32, 8, 2, ("64", "128", "64b", "128b")), (64, 32, 8, 1, ("64", "128", "128b")), (64, 64, 8, 1, ("64b",)),
       (64, 64, 4, 1, ("64b",)))


def _configs(table):
    if _INTERPRET:  # the interpreter runs every config it is given: one
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s, _ in table]


def _offered(table):
    """early_config_prune: the configs offered at this launch's tile width (the 64 list below 64, the
    128 list above 128) and bias."""
    where = {(bm, bn, w, s): tags for bm, bn, w, s, tags in table}

    def prune(configs, named_args, **kwargs):
        if _INTERPRET:
            return configs
        tag = f"{min(max(kwargs['BLOCK_D'], 64), 128)}{'b' if kwargs.get('HAS_BIAS') else ''}"
        return [c for c in configs if tag in where[c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages]]
    return {"early_config_prune": prune}


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # Triton's CPU interpreter multiplies bf16 blocks wrongly; bf16 x bf16 products are exact in
    # fp32, so upcasting first gives what the GPU's bf16 dot with fp32 accumulation gives.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    # fp32 operands (run.precision fp32): true fp32 products, as torch's matmuls default to
    # (allow_tf32 off), not tl.dot's default TF32 (10-bit mantissa inputs); bf16/fp16 use the tensor cores.
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _segment(CU, b, N, VARLEN: tl.constexpr):
    """(first token, length) of sequence b: packed segments from cu_seqlens, or fixed length N."""
    if VARLEN:
        start = tl.load(CU + b)
        return start, tl.load(CU + b + 1) - start
    return 0, N


@triton.jit
def _head(CU, H, N, VARLEN: tl.constexpr):
    """(sequence, head, first token, length) of this program's (sequence, head) slice."""
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    start, length = _segment(CU, b, N, VARLEN)
    return b, pid_bh % H, start, length


@triton.jit
def _tile(base, rows, stride, offs_d, mask):
    """Rows `rows` (all head dims) of one (sequence, head) slice; 0 outside `mask`."""
    return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _bias_tile(BIAS, h, rows, cols, N, mask):
    """bias[h, rows, cols] of the contiguous [H, N, N] bias, in the scores' log2 units; 0 outside `mask`."""
    b = tl.load(BIAS + h * N * N + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
    return b.to(tl.float32) * _LOG2E


@triton.jit
def _recompute(q, k, v, do, lse, delta, valid, scale_log2, bias, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr):
    """The backward's P (from the saved log-sum-exp, no second softmax) and dS = P * (dO V^T - delta)
    for a [M, N] tile; both backward kernels need them. `bias`: the tile's bias (log2 units) or None.
    dS is the gradient of the scaled scores q k^T * scale + bias, so also of the bias."""
    s = _dot(q, tl.trans(k), UPCAST) * scale_log2
    if HAS_BIAS:
        s += bias
    p = tl.exp2(s - lse[:, None])
    p = tl.where(valid, p, 0.0)
    return p, p * (_dot(do, tl.trans(v), UPCAST) - delta[:, None])


@triton.autotune(configs=_configs(_FWD), key=["D", "MAX_LEN", "VARLEN", "HAS_BIAS"], prune_configs_by=_offered(_FWD))
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, CU, BIAS, scale_log2,
              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh,
              H, N, D, MAX_LEN, VARLEN: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr = False,
              HAS_BIAS: tl.constexpr = False):
    pid_m = tl.program_id(0)
    b, h, start, length = _head(CU, H, N, VARLEN)
    if pid_m * BLOCK_M >= length:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < length
    mask_d = offs_d < D
    q = _tile(Q + b * sqb + h * sqh + start * sqn, offs_m, sqn, offs_d, mask_m[:, None] & mask_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * skb + h * skh + start * skn
    v_base = V + b * svb + h * svh + start * svn
    for start_n in range(0, length, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < length
        k = tl.load(k_base + cols[None, :] * skn + offs_d[:, None], mask=mask_n[None, :] & mask_d[:, None], other=0.0)
        qk = _dot(q, k, UPCAST) * scale_log2
        if HAS_BIAS:
            qk += _bias_tile(BIAS, h, offs_m, cols, N, mask_m[:, None] & mask_n[None, :])
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(v_base, cols, svn, offs_d, mask_n[:, None] & mask_d[None, :])
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + (start + offs_m)[:, None] * son + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + b * slb + h * slh + start + offs_m, m_i + tl.log2(l_i), mask=mask_m)  # log2 units


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, son, slb, slh, CU, H, N, D, VARLEN: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr = False):
    """delta = rowsum(dO * O); O and dO share strides."""
    pid_m = tl.program_id(0)
    b, h, start, length = _head(CU, H, N, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < length)[:, None] & (offs_d < D)[None, :]
    base = b * sob + h * soh + start * son
    o = _tile(O + base, offs_m, son, offs_d, mask).to(tl.float32)
    do = _tile(DO + base, offs_m, son, offs_d, mask).to(tl.float32)
    tl.store(DELTA + b * slb + h * slh + start + offs_m, tl.sum(o * do, 1), mask=offs_m < length)


# DBIAS is added to atomically: benchmarking a config must start it from zero again.
@triton.autotune(configs=_configs(_DKDV), key=["D", "MAX_LEN", "VARLEN", "HAS_BIAS", "BIAS_GRAD"],
                 reset_to_zero=["DBIAS"], prune_configs_by=_offered(_DKDV))
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU, BIAS, DBIAS, sm_scale, scale_log2,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh,
                   H, N, D, MAX_LEN, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, UPCAST: tl.constexpr = False, HAS_BIAS: tl.constexpr = False,
                   BIAS_GRAD: tl.constexpr = False):
    """One key block; dK and dV summed over every query block. dK/dV share K/V's strides; dO O's.
    With BIAS_GRAD, dS is also added to DBIAS (fp32 [H, N, N], zeroed): the sum over the batch."""
    pid_n = tl.program_id(0)
    b, h, start, length = _head(CU, H, N, VARLEN)
    if pid_n * BLOCK_N >= length:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < length
    mask_d = offs_d < D
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k_off, v_off = b * skb + h * skh + start * skn, b * svb + h * svh + start * svn
    q_base, do_base = Q + b * sqb + h * sqh + start * sqn, DO + b * sob + h * soh + start * son
    k = _tile(K + k_off, offs_n, skn, offs_d, kv_mask)
    v = _tile(V + v_off, offs_n, svn, offs_d, kv_mask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, length, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < length
        q = _tile(q_base, rows, sqn, offs_d, mask_m[:, None] & mask_d[None, :])
        do = _tile(do_base, rows, son, offs_d, mask_m[:, None] & mask_d[None, :])
        lse = tl.load(LSE + b * slb + h * slh + start + rows, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + b * slb + h * slh + start + rows, mask=mask_m, other=0.0)
        valid = mask_m[:, None] & mask_n[None, :]
        bias = None
        if HAS_BIAS:
            bias = _bias_tile(BIAS, h, rows, offs_n, N, valid)
        p, ds = _recompute(q, k, v, do, lse, delta, valid, scale_log2, bias, HAS_BIAS, UPCAST)
        if BIAS_GRAD:
            tl.atomic_add(DBIAS + h * N * N + rows[:, None] * N + offs_n[None, :], ds, mask=valid, sem="relaxed")
        dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST)
    tl.store(DK + k_off + offs_n[:, None] * skn + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + v_off + offs_n[:, None] * svn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_configs(_DQ), key=["D", "MAX_LEN", "VARLEN", "HAS_BIAS"], prune_configs_by=_offered(_DQ))
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU, BIAS, sm_scale, scale_log2,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh,
                 H, N, D, MAX_LEN, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, UPCAST: tl.constexpr = False, HAS_BIAS: tl.constexpr = False):
    """One query block; dQ summed over every key block. dQ shares Q's strides."""
    pid_m = tl.program_id(0)
    b, h, start, length = _head(CU, H, N, VARLEN)
    if pid_m * BLOCK_M >= length:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < length
    mask_d = offs_d < D
    q_mask = mask_m[:, None] & mask_d[None, :]
    q_off = b * sqb + h * sqh + start * sqn
    k_base, v_base = K + b * skb + h * skh + start * skn, V + b * svb + h * svh + start * svn
    q = _tile(Q + q_off, offs_m, sqn, offs_d, q_mask)
    do = _tile(DO + b * sob + h * soh + start * son, offs_m, son, offs_d, q_mask)
    lse = tl.load(LSE + b * slb + h * slh + start + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + b * slb + h * slh + start + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, length, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < length
        k = _tile(k_base, cols, skn, offs_d, mask_n[:, None] & mask_d[None, :])
        v = _tile(v_base, cols, svn, offs_d, mask_n[:, None] & mask_d[None, :])
        bias = None
        if HAS_BIAS:  # rows past the end masked too: they would read past the bias
            bias = _bias_tile(BIAS, h, offs_m, cols, N, mask_m[:, None] & mask_n[None, :])
        _, ds = _recompute(q, k, v, do, lse, delta, mask_n[None, :], scale_log2, bias, HAS_BIAS, UPCAST)
        dq += _dot(ds.to(k.dtype), k, UPCAST)
    tl.store(DQ + q_off + offs_m[:, None] * sqn + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=q_mask)


def _strides4(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(sequence, head, token) strides: [B, H, N, D] or packed [T, H, D] (no sequence stride)."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _layout(q: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int):
    """(varlen, sequences, heads, N, D, lse shape, lse sequence and head strides) of q."""
    D = q.shape[-1]
    if cu_seqlens is not None:
        T, H = q.shape[0], q.shape[1]
        return True, cu_seqlens.numel() - 1, H, max_seqlen, D, (H, T), 0, T
    B, H, N = q.shape[:3]
    return False, B, H, N, D, (B, H, N), H * N, N


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                      cu_seqlens: torch.Tensor | None, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    varlen, n_seq, H, N, D, lse_shape, slb, slh = _layout(q, cu_seqlens, max_seqlen)
    lse = torch.empty(lse_shape, device=q.device, dtype=torch.float32)
    o = torch.empty_like(q)
    scale = D ** -0.5
    upcast = _INTERPRET and q.dtype == torch.bfloat16
    block_d = max(16, triton.next_power_of_2(D))
    cu = cu_seqlens if varlen else q  # unused pointer in the fixed layout

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), n_seq * H)

    _attn_fwd[grid](q, k, v, o, lse, cu, bias, scale * LOG2E, *_strides4(q, varlen), *_strides4(k, varlen),
                    *_strides4(v, varlen), *_strides4(o, varlen), slb, slh, H, N, D, N, VARLEN=varlen,
                    BLOCK_D=block_d, UPCAST=upcast, HAS_BIAS=bias is not None)
    return o, lse


# The forward and backward as custom ops (torch.library): torch.compile keeps each as one opaque call, so a
# compiled block keeps the kernel and stays one graph (tests/runs/test_compile.py, fullgraph=True). The
# inputs reach them contiguous (`flash_attention`), so the gradients, allocated contiguous, share their
# strides. The plain functions stay callable: models/kernels/compile.py launches them on meta tensors,
# where the ops would run their fake implementations.
_fwd_op = torch.library.custom_op("mimscale::flash_attention_fwd", attention_forward, mutates_args=())


@_fwd_op.register_fake
def _(q, k, v, bias, cu_seqlens, max_seqlen):
    lse_shape = _layout(q, cu_seqlens, max_seqlen)[5]
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor | None, max_seqlen: int,
                       bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv, and d(bias) in fp32 (an empty tensor without `bias_grad`: an op returns no None)."""
    varlen, n_seq, H, N, D, _, slb, slh = _layout(q, cu_seqlens, max_seqlen)
    scale = D ** -0.5
    do = do.contiguous()  # o is contiguous: dO gets its strides
    cu = cu_seqlens if varlen else q
    upcast = _INTERPRET and q.dtype == torch.bfloat16
    block_d = max(16, triton.next_power_of_2(D))
    delta = torch.empty_like(lse)
    so = _strides4(o, varlen)
    _attn_bwd_delta[(triton.cdiv(N, 64), n_seq * H)](o, do, delta, *so, slb, slh, cu, H, N, D, VARLEN=varlen,
                                                     BLOCK_M=64, BLOCK_D=block_d)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # d(bias) = dS summed over the batch: the dK/dV kernel adds each dS tile atomically into one
    # fp32 [H, N, N] buffer. It stays in L2 (2.5 MB at H=16, N=197), where a per-sequence
    # [B, H, N, N] buffer summed afterwards would write and read B times that through memory.
    # The price: the order of the batch sum, so the bias gradient's last bits, vary from run
    # to run (dQ, dK, dV do not).
    dbias = torch.zeros(H, N, N, device=q.device, dtype=torch.float32) if bias_grad else None
    has_bias = bias is not None
    args = (*_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *so, slb, slh, H, N, D, N)
    _attn_bwd_dkdv[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), n_seq * H)](
        q, k, v, do, lse, delta, dk, dv, cu, bias, dbias, scale, scale * LOG2E, *args, VARLEN=varlen,
        BLOCK_D=block_d, UPCAST=upcast, HAS_BIAS=has_bias, BIAS_GRAD=dbias is not None)
    _attn_bwd_dq[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), n_seq * H)](
        q, k, v, do, lse, delta, dq, cu, bias, scale, scale * LOG2E, *args, VARLEN=varlen, BLOCK_D=block_d,
        UPCAST=upcast, HAS_BIAS=has_bias)
    return dq, dk, dv, dbias if dbias is not None else q.new_empty(0, dtype=torch.float32)


_bwd_op = torch.library.custom_op("mimscale::flash_attention_bwd", attention_backward, mutates_args=())


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, bias, cu_seqlens, max_seqlen, bias_grad):
    H, N = _layout(q, cu_seqlens, max_seqlen)[2:4]
    dbias = q.new_empty((H, N, N) if bias_grad else (0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, cu_seqlens, max_seqlen = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, bias)
    ctx.max_seqlen = max_seqlen
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[3]


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, cu_seqlens, bias = ctx.saved_tensors
    dq, dk, dv, dbias = _bwd_op(do, q, k, v, o, lse, bias, cu_seqlens, ctx.max_seqlen, ctx.bias_grad)
    return dq, dk, dv, dbias.to(bias.dtype) if ctx.bias_grad else None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _attention(q, k, v, bias, cu_seqlens, max_seqlen):
    # Contiguous: the kernels take any strides, but a q/k/v split of one qkv projection is not dense,
    # and the gradients (allocated contiguous) must share the inputs' strides.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if bias is not None:
        varlen, _, H, N = _layout(q, cu_seqlens, max_seqlen)[:4]
        if varlen or tuple(bias.shape) != (H, N, N):
            raise ValueError(f"bias must be [H, N, N] = {[H, N, N]} for [B, H, N, D] inputs (not packed); "
                             f"got {list(bias.shape)}")
        # Contiguous: the kernels index it so. A gathered relative-position table is a permuted view;
        # copying its H N^2 values once is cheaper than strided loads.
        bias = bias.contiguous()
    return _fwd_op(q, k, v, bias, cu_seqlens, max_seqlen)[0]


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: [B, H, N, D] (bf16, fp16 or fp32) -> [B, H, N, D]. bias: None or a finite float
    [H, N, N] (any float dtype, fp32 kept in fp32) added to q k^T / sqrt(D), the same for every sequence."""
    return _attention(q, k, v, bias, None, 0)


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_seqlen: int) -> torch.Tensor:
    """Packed q, k, v: [T, H, D]; cu_seqlens: int32 [S + 1] segment offsets (0 ... T). Each token
    attends to the tokens of its own segment only."""
    return _attention(q, k, v, None, cu_seqlens.to(torch.int32), int(max_seqlen))
