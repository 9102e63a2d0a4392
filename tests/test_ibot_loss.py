"""Our iBOT loss against a loop-by-loop transcription of the paper's formulas (seeds 000, 003)."""

import math

import torch

from models.kernels.softmax_ce import softmax_ce_reference
from trainer.methods.ibot import ibot_losses


def paper_losses(s_cls, s_patch_full, masks, t_cls, t_patch_full, c, c2, ts, tt):
    """L_[CLS] = -P_t(u)^T log P_s(v_hat) over cross-view pairs; L_MIM = -sum_i m_i P_t(u_i)^T log P_s(u_hat_i),
    averaged per image over its masked patches, then over images, then over views."""
    def P(x, center, temp):
        e = [math.exp((x[k] - center[k]) / temp) for k in range(len(x))]
        return [v / sum(e) for v in e]

    def logP(x, temp):
        m = max(x)
        lse = m / temp + math.log(sum(math.exp((v - m) / temp) for v in x))
        return [v / temp - lse for v in x]

    def H(t, s, center):
        p, lq = P(t.tolist(), center.tolist(), tt), logP(s.tolist(), ts)
        return -sum(a * b for a, b in zip(p, lq))

    G, B = len(t_cls), t_cls[0].shape[0]
    pairs = []
    for q in range(G):
        for v in range(len(s_cls)):
            if v != q:
                pairs.append(sum(H(t_cls[q][b], s_cls[v][b], c) for b in range(B)) / B)
    l_cls = sum(pairs) / len(pairs)
    views = []
    for v in range(G):
        per_image = []
        for b in range(B):
            idx = [i for i in range(masks.shape[2]) if masks[v, b, i]]
            total = sum(H(t_patch_full[v][b, i], s_patch_full[v][b, i], c2) for i in idx)
            per_image.append(total / max(len(idx), 1))
        views.append(sum(per_image) / B)
    return l_cls, sum(views) / G


def test_ibot_loss_matches_paper_transcription():
    g = torch.Generator().manual_seed(0)
    G, L, B, N, K, K2 = 2, 3, 4, 6, 7, 5
    s_cls = [torch.randn(B, K, generator=g) for _ in range(G + L)]
    t_cls = [torch.randn(B, K, generator=g) for _ in range(G)]
    s_patch = [torch.randn(B, N, K2, generator=g) for _ in range(G)]
    t_patch = [torch.randn(B, N, K2, generator=g) for _ in range(G)]
    masks = torch.rand(G, B, N, generator=g) < 0.5
    masks[0, 1] = False  # an unmasked image counts as 0 in its view's mean
    c, c2 = torch.randn(K, generator=g) * 0.1, torch.randn(K2, generator=g) * 0.1
    ts, tt = 0.1, 0.04
    ours = ibot_losses(s_cls, [s_patch[v][masks[v]] for v in range(G)], masks, t_cls,
                       [t_patch[v][masks[v]] for v in range(G)], c, c2, ts, tt)
    ref_cls, ref_mim = paper_losses(s_cls, s_patch, masks, t_cls, t_patch, c, c2, ts, tt)
    assert math.isclose(ours["cls"].item(), ref_cls, rel_tol=1e-5)
    assert math.isclose(ours["mim"].item(), ref_mim, rel_tol=1e-5)


def test_softmax_ce_reference_is_fp32_and_finite_for_bf16_inputs():
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(16, 65536, generator=g) * 30).bfloat16()
    t = (torch.randn(16, 65536, generator=g) * 30).bfloat16()
    out = softmax_ce_reference(s, t, torch.zeros(65536), 0.1, 0.04)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
