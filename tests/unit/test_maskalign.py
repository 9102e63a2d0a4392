"""MaskAlign and iBOT+CLIP modules on one process: visible-only encoding, masks, Dynamic Alignment."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_clip_file

from data.masking import attentive_visible, random_visible, visible_count
from models.align import DynamicAlign, layerwise_matrix
from models.teachers import load_teacher_weights
from trainer.config import load_config
from trainer.engine import build_method, param_groups
from trainer.methods.ibot_clip import distill_loss
from trainer.methods.maskalign import align_loss, align_targets

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.arch=vit_test", "model.patch_size=4", "data.batch_size=3", "data.mask.min_block_patches=4"]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    return tiny_clip_file(tmp_path_factory.mktemp("clip") / "clip.safetensors", seed=1)


def build(config: str, clip_file, *overrides):
    cfg = load_config(ROOT / "configs" / config, [*TINY, f"teacher.clip.weights={clip_file}", *overrides])
    method = build_method(cfg)
    load_teacher_weights(method.clip_teacher, clip_file)
    return cfg, method


def batch(g=0, views=2, locals_=0):
    gen = torch.Generator().manual_seed(g)
    return {"global_crops": torch.randn(views, 3, 3, 32, 32, generator=gen),
            "local_crops": torch.randn(locals_, 3, 3, 16, 16, generator=gen),
            "masks": torch.rand(views, 3, 8, 8, generator=gen) < 0.4}


def test_student_encodes_only_the_visible_patches(clip_file):
    cfg, method = build("maskalign_vit_tiny.yaml", clip_file, "maskalign.masking=attentive")
    lengths = []
    method.student.backbone.blocks[0].register_forward_pre_hook(lambda m, i: lengths.append(i[0].shape[1]))
    losses = method(batch(), {"step": 0, "micro_step": 0})
    grid = (32 // cfg.model.patch_size) ** 2  # vit_test: patch 4 -> 64 patches
    keep = visible_count(grid, 0.7)
    assert keep == 19 and lengths == [keep + 1]  # visible patches + [CLS]; no [MASK] tokens
    assert set(losses) == {"align"} and torch.isfinite(losses["align"])


def test_attentive_topk_keeps_the_top_of_the_teacher_attention(clip_file):
    _, method = build("maskalign_vit_tiny.yaml", clip_file, "maskalign.masking=attentive",
                      "maskalign.attentive_sampling=topk")
    images = batch()["global_crops"].flatten(0, 1)
    t = method.clip_teacher(images, (8, 8), method.input_mean, method.input_std, [-1], attention=True)
    keep = visible_count(64, 0.7)
    visible = method.visible(t["cls_attn"], images.shape[0], 64, 0, images.device)
    assert visible.shape == (6, keep)
    for attn, vis in zip(t["cls_attn"], visible):
        assert set(vis.tolist()) == set(attn.argsort(descending=True)[:keep].tolist())
        assert attn[vis].min() >= attn[~torch.isin(torch.arange(64), vis)].max()
    assert torch.equal(attentive_visible(t["cls_attn"], keep, sampling="topk"), visible)


def reference_attention_masking(importance: torch.Tensor, len_keep: int, generator) -> torch.Tensor:
    """OpenDriveLab/MaskAlign models_pretrain.py attention_masking: the kept ids."""
    L = importance.shape[1]
    ids_shuffle = torch.multinomial(importance, L, replacement=False, generator=generator)
    return ids_shuffle[:, :len_keep]


def test_attentive_sampling_follows_the_attention_like_the_reference():
    """The default: patches drawn without replacement with probability proportional to the attention.
    One kept patch: its frequencies are the attention itself. Several: the inclusion frequencies are
    those of the reference's multinomial (successive sampling), not a top-k."""
    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(1, 16, generator=g) * 1.5, dim=1)
    draws = 20_000
    rows = attn.expand(draws, -1)
    one = attentive_visible(rows, 1, torch.Generator().manual_seed(1))
    freq = torch.bincount(one[:, 0], minlength=16).float() / draws
    sigma = (attn[0] * (1 - attn[0]) / draws).sqrt()
    assert ((freq - attn[0]).abs() <= 5 * sigma + 1e-4).all()
    keep = 5
    ours = attentive_visible(rows, keep, torch.Generator().manual_seed(2))
    ref = reference_attention_masking(rows, keep, torch.Generator().manual_seed(3))
    f_ours = torch.bincount(ours.flatten(), minlength=16).float() / draws
    f_ref = torch.bincount(ref.flatten(), minlength=16).float() / draws
    assert (f_ours - f_ref).abs().max() < 0.02
    assert f_ours.sum().round() == keep and bool((ours.diff(dim=1) > 0).all())  # distinct, ordered
    top = set(attn[0].topk(keep).indices.tolist())
    assert sum(set(row.tolist()) != top for row in ours) > draws // 2  # not the top-k
    order = attn[0].argsort()
    assert f_ours[order[-1]] > f_ours[order[-8]] > f_ours[order[0]]  # more attention, kept more often


def test_random_masks_are_exact_reproducible_and_vary():
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a, b, c = (random_visible(4, 64, 19, g(s), torch.device("cpu")) for s in (1, 1, 2))
    assert a.shape == (4, 19) and torch.equal(a, b) and not torch.equal(a, c)
    assert all(len(set(row.tolist())) == 19 for row in a) and bool((a.diff(dim=1) > 0).all())


def test_dynamic_alignment_learns_w_and_adapters_only(clip_file):
    _, method = build("maskalign_vit_tiny.yaml", clip_file)
    losses = method(batch(), {"step": 0, "micro_step": 0})
    losses["align"].backward()
    assert method.loss_weights == {"align": 2.0}  # the reference's 2 * smooth_l1
    assert method.align.weight.requires_grad and method.align.weight.grad.abs().sum() > 0
    # the teacher's last 5 levels (a tiny teacher has 4: all) x the student's 2 blocks, row j = teacher level j
    assert method.teacher_blocks == [0, 1, 2, 3] and method.align.weight.shape == (4, 2)
    assert len(method.align.adapters) == 4 and all(isinstance(a, torch.nn.Linear) for a in method.align.adapters)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.align.adapters.parameters())
    assert all(p.grad is None for p in method.clip_teacher.parameters())
    groups = param_groups(method)
    trained = {id(p) for g in groups for p in g["params"]}
    assert next(g for g in groups if "align.weight" in g["names"])["wd_scale"] == 0.0
    assert next(g for g in groups if "student.backbone.pos_embed" in g["names"])["lr_scale"] == 0.0  # sin-cos
    assert {id(p) for p in method.align.parameters()} <= trained
    assert not {id(p) for p in method.clip_teacher.parameters()} & trained


def test_dynamic_alignment_start_and_both_orders():
    # the reference: W = eye(depth) + 0.01 when student and teacher levels match one to one
    eye = layerwise_matrix([0, 1, 2, 3], [0, 1, 2, 3], 4, 4)
    assert torch.equal(eye, torch.eye(4))
    top5 = layerwise_matrix(list(range(12)), list(range(7, 12)), 12, 12)
    assert torch.equal(top5, torch.eye(12)[7:])  # MaskAlign's top5: rows 7..11 of eye(12)
    start = layerwise_matrix([0, 1, 2], [0, 3], 3, 4)
    assert torch.equal(start, torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    da = DynamicAlign(8, 6, start, "teacher_level", "linear")
    torch.testing.assert_close(da.weight.detach(), start + 0.01)
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    expected = [da.adapters[j](sum(da.weight[j, i] * xs[i] for i in range(3))) for j in range(2)]
    torch.testing.assert_close(da(xs), torch.stack(expected))  # mix, then one adapter per teacher level
    paper = DynamicAlign(8, 6, start, "student_level", "mlp", hidden_dim=7)
    assert len(paper.adapters) == 3 and paper.adapters[0][0].out_features == 7
    expected = [sum(paper.weight[j, i] * paper.adapters[i](xs[i]) for i in range(3)) for j in range(2)]
    torch.testing.assert_close(paper(xs), torch.stack(expected))  # one adapter per student level, then mix
    fixed = DynamicAlign(8, 6, start, dynamic=False)
    assert "weight" not in dict(fixed.named_parameters())


def reference_maskalign_loss(student_hidden, teacher_hidden, ids_keep, weights, heads, topk):
    """OpenDriveLab/MaskAlign models_pretrain.py get_student (fusion linear), get_teacher (whiten) and
    forward_loss (smoothl1, loss_weights top<k>); hidden states include [CLS] at index 0, and
    teacher_hidden[0] is the embedding output, which get_teacher skips."""
    import torch.nn.functional as F

    student = torch.cat([x.unsqueeze(0) for x in student_hidden], dim=0)
    student = torch.einsum('ab,bcde->acde', weights, student)
    student = [x.squeeze(0) for x in torch.chunk(student, student.shape[0], dim=0)]
    student = [heads[i](x) for i, x in enumerate(student)]
    teacher = []
    for i in range(1, len(teacher_hidden)):
        y = F.layer_norm(teacher_hidden[i], (teacher_hidden[i].shape[-1],))
        cls, y = y[:, :1, :], y[:, 1:, :]
        y = torch.gather(y, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, y.shape[-1]))
        teacher.append(torch.cat([cls, y], dim=1))
    weight_list = [0.] * (len(student) - topk) + [1 / topk] * topk
    loss = torch.tensor(0.)
    for i, x in enumerate(student):
        if weight_list[i] > 0:
            loss = loss + weight_list[i] * 2 * F.smooth_l1_loss(teacher[i], x)
    return loss


def test_alignment_loss_equals_the_reference():
    g = torch.Generator().manual_seed(0)
    depth, B, N, keep, Cs, Ct, topk = 6, 3, 16, 5, 8, 12, 3
    student_hidden = [torch.randn(B, 1 + keep, Cs, generator=g) for _ in range(depth)]
    teacher_hidden = [torch.randn(B, 1 + N, Ct, generator=g) * 3 for _ in range(depth + 1)]
    ids_keep = torch.stack([torch.randperm(N, generator=g)[:keep] for _ in range(B)])
    levels = list(range(depth - topk, depth))
    da = DynamicAlign(Cs, Ct, layerwise_matrix(list(range(depth)), levels, depth, depth))
    with torch.no_grad():
        da.weight.add_(torch.randn(da.weight.shape, generator=g) * 0.1)
    # the reference's full depth x depth W and heads, with our rows and adapters at the top levels
    full_w = torch.eye(depth) + 0.01
    full_w[depth - topk:] = da.weight.detach()
    heads = [torch.nn.Linear(Cs, Ct) for _ in range(depth - topk)] + list(da.adapters)
    expected = reference_maskalign_loss(student_hidden, teacher_hidden, ids_keep, full_w, heads, topk)
    # ours: the visible set sorted (the order of the visible tokens does not change the loss)
    order = ids_keep.argsort(dim=1)
    visible = ids_keep.gather(1, order)
    ours_hidden = [torch.cat([x[:, :1], x[:, 1:].gather(1, order.unsqueeze(-1).expand(-1, -1, Cs))], 1)
                   for x in student_hidden]
    targets = align_targets([teacher_hidden[1 + t][:, 0] for t in levels],
                            [teacher_hidden[1 + t][:, 1:] for t in levels], visible)
    ours = 2.0 * align_loss(da(ours_hidden), targets)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_ibot_clip_adds_a_distillation_term_on_masked_patches(clip_file):
    _, method = build("ibot_clip_vit_tiny.yaml", clip_file, "ibot.out_dim=32", "ibot.head_hidden_dim=16",
                      "ibot.head_bottleneck_dim=8")
    losses = method(batch(locals_=2), {"teacher_temp": 0.04, "teacher_patch_temp": 0.07, "step": 0, "micro_step": 0})
    assert set(losses) == {"cls", "mim", "clip"} and method.loss_weights["clip"] == 1.0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in method.clip_head.parameters())
    assert all(p.grad is None for p in method.clip_teacher.parameters())
    assert all(p.grad is None for p in method.teacher.parameters())
    names = {n for g in param_groups(method) for n in g["names"]}
    assert any(n.startswith("clip_head.") for n in names) and not any("teacher" in n for n in names)
    target = torch.randn(5, 6)
    normed = torch.nn.functional.layer_norm(target, (6,))
    assert distill_loss(normed * 3.0, target, "cosine").abs() < 1e-6  # scale-free
    assert distill_loss(normed, target, "smooth_l1").abs() < 1e-6
    assert distill_loss(torch.zeros(0, 6, requires_grad=True), torch.zeros(0, 6), "cosine") == 0
