"""Our iBOT loss against a loop-by-loop transcription of the paper's formulas (seeds 000, 003)."""

import math

import torch

from models.kernels.softmax_ce import softmax_ce_reference
from trainer.methods.ibot import ibot_losses


def paper_losses(s_cls, s_patch_full, masks, t_cls, t_patch_full, c, c2, ts, tt, tt2):
    """L_[CLS] = -P_t(u)^T log P_s(v_hat) over cross-view pairs; L_MIM = -sum_i m_i P_t(u_i)^T log P_s(u_hat_i),
    averaged per image over its masked patches, then over images, then over views."""
    def P(x, center, temp):
        e = [math.exp((x[k] - center[k]) / temp) for k in range(len(x))]
        return [v / sum(e) for v in e]

    def logP(x, temp):
        m = max(x)
        lse = m / temp + math.log(sum(math.exp((v - m) / temp) for v in x))
        return [v / temp - lse for v in x]

    def H(t, s, center, temp):
        p, lq = P(t.tolist(), center.tolist(), temp), logP(s.tolist(), ts)
        return -sum(a * b for a, b in zip(p, lq))

    G, B = len(t_cls), t_cls[0].shape[0]
    pairs = []
    for q in range(G):
        for v in range(len(s_cls)):
            if v != q:
                pairs.append(sum(H(t_cls[q][b], s_cls[v][b], c, tt) for b in range(B)) / B)
    l_cls = sum(pairs) / len(pairs)
    views = []
    for v in range(G):
        per_image = []
        for b in range(B):
            idx = [i for i in range(masks.shape[2]) if masks[v, b, i]]
            total = sum(H(t_patch_full[v][b, i], s_patch_full[v][b, i], c2, tt2) for i in idx)
            per_image.append(total / max(len(idx), 1))
        views.append(sum(per_image) / B)
    return l_cls, sum(views) / G


def _random_case(seed=0, G=2, L=3, B=4, N=6, K=7, K2=5):
    g = torch.Generator().manual_seed(seed)
    s_cls = [torch.randn(B, K, generator=g) for _ in range(G + L)]
    t_cls = [torch.randn(B, K, generator=g) for _ in range(G)]
    s_patch = [torch.randn(B, N, K2, generator=g) for _ in range(G)]
    t_patch = [torch.randn(B, N, K2, generator=g) for _ in range(G)]
    masks = torch.rand(G, B, N, generator=g) < 0.5
    masks[0, 1] = False  # an unmasked image counts as 0 in its view's mean
    c, c2 = torch.randn(K, generator=g) * 0.1, torch.randn(K2, generator=g) * 0.1
    return s_cls, t_cls, s_patch, t_patch, masks, c, c2


def _our_layout(s_cls, t_cls, s_patch, t_patch, masks):
    """The tensors ibot_losses takes: crops stacked, student patches at the masked positions only,
    teacher patches all of them."""
    return (torch.cat(s_cls), torch.cat([s_patch[v][masks[v]] for v in range(len(t_cls))]), masks, torch.cat(t_cls),
            torch.stack(t_patch).flatten(0, 2))


def test_ibot_loss_matches_paper_transcription():
    s_cls, t_cls, s_patch, t_patch, masks, c, c2 = _random_case()
    ts, tt, tt2 = 0.1, 0.04, 0.065  # iBOT's two teacher temperatures: [CLS] and patches
    sums = (torch.zeros(c.shape), torch.zeros(c2.shape))
    ours = ibot_losses(*_our_layout(s_cls, t_cls, s_patch, t_patch, masks), c, c2, ts, tt, tt2, teacher_sums=sums)
    ref_cls, ref_mim = paper_losses(s_cls, s_patch, masks, t_cls, t_patch, c, c2, ts, tt, tt2)
    assert math.isclose(ours["cls"].item(), ref_cls, rel_tol=1e-5)
    assert math.isclose(ours["mim"].item(), ref_mim, rel_tol=1e-5)
    # each term reads its own temperature
    assert not math.isclose(paper_losses(s_cls, s_patch, masks, t_cls, t_patch, c, c2, ts, tt, tt)[1], ref_mim,
                            rel_tol=1e-3)
    # The center statistics: column sums over every teacher row, each counted once.
    torch.testing.assert_close(sums[0], torch.cat(t_cls).sum(0))
    torch.testing.assert_close(sums[1], torch.stack(t_patch).sum((0, 1, 2)))


def test_ibot_loss_with_the_heads_last_layers_in_the_loss():
    """The head's last layer run inside the loss (how IBOT calls it): the same terms and the same
    gradients as logits first, with the PyTorch loss and with the fused Triton kernel."""
    from models.heads import NormedLinear
    from models.kernels import triton_available
    from models.kernels.softmax_ce import fused_linear_softmax_ce, fused_linear_softmax_ce_reference

    g = torch.Generator().manual_seed(3)
    G, L, B, N, C, K = 2, 2, 3, 5, 8, 40
    layer = NormedLinear(C, K, fixed_norm=False)
    h_cls = torch.nn.functional.normalize(torch.randn((G + L) * B, C, generator=g), dim=-1)
    masks = torch.rand(G, B, N, generator=g) < 0.4
    h_patch = torch.nn.functional.normalize(torch.randn(int(masks.sum()), C, generator=g), dim=-1)
    t_cls, t_patch = torch.randn(G * B, K, generator=g), torch.randn(G * B * N, K, generator=g)
    center = torch.randn(K, generator=g) * 0.1
    fns = [None, fused_linear_softmax_ce_reference] + ([fused_linear_softmax_ce] if triton_available()[0] else [])
    results = []
    for fn in fns:
        layer.zero_grad()
        sums = (torch.zeros(K), torch.zeros(K))
        if fn is None:  # logits first
            out = ibot_losses(layer(h_cls), layer(h_patch), masks, t_cls, t_patch, center, center, 0.1, 0.04, 0.07,
                              teacher_sums=sums)
        else:
            out = ibot_losses(h_cls, h_patch, masks, t_cls, t_patch, center, center, 0.1, 0.04, 0.07, fn,
                              (layer, layer), sums)
        (out["cls"] + 2 * out["mim"]).backward()
        results.append([out["cls"], out["mim"], *sums, layer.weight.grad.clone(), layer.scale.grad.clone()])
    assert len(results) == 3, "the Triton kernels should run here (GPU or TRITON_INTERPRET=1)"
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_softmax_ce_reference_is_fp32_and_finite_for_bf16_inputs():
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(16, 65536, generator=g) * 30).bfloat16()
    t = (torch.randn(16, 65536, generator=g) * 30).bfloat16()
    out = softmax_ce_reference(s, t, torch.zeros(65536), 0.1, 0.04)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
