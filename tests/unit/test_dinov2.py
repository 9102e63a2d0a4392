"""DINOv2's pieces (trainer/methods/dinov2.py, models/vit.py, data/masking.py) against transcriptions
of facebookresearch/dinov2's code on small inputs."""

import math
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_masking import PythonRandom

from data.masking import MaskSampler
from models.vit import build_vit
from trainer.methods.dinov2 import koleo, sinkhorn_knopp
from trainer.methods.ibot import ibot_losses

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- transcriptions (dinov2/loss, dinov2/data)

def ref_sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3, B=None):
    """dino_clstoken_loss.py DINOLoss.sinkhorn_knopp_teacher on one process (B: the row count of every
    rank together; ibot_patch_loss.py passes the all-reduced masked-patch count)."""
    teacher_output = teacher_output.float()
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = Q.shape[1] if B is None else B
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def ref_koleo(student_output, eps=1e-8):
    """koleo_loss.py KoLeoLoss.forward."""
    student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
    dots = torch.mm(student_output, student_output.t())
    n = student_output.shape[0]
    dots.view(-1)[:: (n + 1)].fill_(-1)
    _, I = torch.max(dots, dim=1)  # noqa: E741
    distances = torch.nn.PairwiseDistance(2, eps=eps)(student_output, student_output[I])
    return -torch.log(distances + eps).mean()


def ref_patch_loss(student_masked, teacher_masked, masks, student_temp=0.1):
    """ibot_patch_loss.py iBOTPatchLoss.forward_masked (xformers absent), times ssl_meta_arch.py's
    loss_scales 2 * ibot_loss_scale 1/2."""
    loss = torch.sum(teacher_masked * F.log_softmax(student_masked / student_temp, dim=-1), dim=-1)
    weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return -(loss * weight).sum() / masks.shape[0]


def ref_dino_cls_loss(student_local, student_global, teacher_global, n_local, student_temp=0.1):
    """ssl_meta_arch.py forward_backward's two DINO terms from the teachers' targets (already reversed
    so that student crop A meets teacher crop B)."""
    def dino_loss(students, teachers):
        total = 0
        for s in students:
            lsm = F.log_softmax(s / student_temp, dim=-1)
            for t in teachers:
                total -= torch.sum(t * lsm, dim=-1).mean()
        return total

    terms = 2 * n_local + 2
    local = dino_loss(student_local.chunk(n_local), teacher_global.chunk(2)) / terms
    glob = dino_loss([student_global], [teacher_global]) * 2 / terms
    return local + glob


def ref_dinov2_masks(N_side, n, ratio, prob, r: random.Random):
    """dinov2/data/collate.py's masks with dinov2/data/masking.py MaskingGenerator (min_num_patches 4,
    max_num_patches 0.5 * N as dinov2/train/train.py builds it), Python's random replaced by `r`."""
    H = W = N_side
    N = H * W
    max_num_patches = 0.5 * N
    log_aspect = (math.log(0.3), math.log(1 / 0.3))

    def _mask(mask, max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = r.uniform(4, max_mask_patches)
            aspect_ratio = math.exp(r.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < W and h < H:
                top = r.randint(0, H - h)
                left = r.randint(0, W - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def generator(num_masking_patches=0):
        mask = np.zeros((H, W), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, max_num_patches)
            delta = _mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask

    n_samples_masked = int(n * prob)
    probs = torch.linspace(*ratio, n_samples_masked + 1)
    masks_list = []
    for i in range(0, n_samples_masked):
        masks_list.append(generator(int(N * r.uniform(probs[i], probs[i + 1]))))
    for _ in range(n_samples_masked, n):
        masks_list.append(generator(0))
    r.shuffle(masks_list)
    return np.stack(masks_list)


class PythonRandomShuffle(PythonRandom):
    def permutation(self, n):
        idx = list(range(n))
        self.r.shuffle(idx)  # random.shuffle(list) moves list[idx[j]] to j
        return np.array(idx)


# ---------------------------------------------------------------- Sinkhorn-Knopp

def test_sinkhorn_knopp_equals_dinov2s_on_one_rank():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 50, generator=g)  # cosine-like scores of 24 rows on 50 prototypes
    ours, ref = sinkhorn_knopp(logits, 0.07, 3), ref_sinkhorn_knopp(logits, 0.07, 3)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-9), (ours - ref).abs().max()
    assert torch.allclose(ours.sum(1), torch.ones(24), atol=1e-5)  # each row an assignment
    # beyond DINOv2's range: its exp overflows (prototype norms far from 1), ours is unchanged by a shift
    assert not torch.isfinite(ref_sinkhorn_knopp(logits + 10.0, 0.01)).all()
    assert torch.allclose(sinkhorn_knopp(logits + 10.0, 0.07), ours, rtol=1e-4, atol=1e-8)


def _sk_rank(rank, port, rows, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(sum(rows), 50, generator=g)
    mine = logits[sum(rows[:rank]):sum(rows[:rank + 1])]
    calls = {"n": 0}
    real = dist.all_reduce

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    dist.all_reduce = counting
    q = sinkhorn_knopp(mine, 0.07, 3)
    dist.all_reduce = real
    torch.save({"q": q, "calls": calls["n"]}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("rows", [(12, 12), (7, 3)])  # [CLS] rows; masked patches differ by rank
def test_sinkhorn_knopp_over_two_ranks_equals_one_rank_on_all_rows(tmp_path, rows):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sk_rank, args=(port, rows, str(tmp_path / "q")), nprocs=2)
    parts = [torch.load(f"{tmp_path / 'q'}.{r}") for r in range(2)]
    logits = torch.randn(sum(rows), 50, generator=torch.Generator().manual_seed(1))
    ref = ref_sinkhorn_knopp(logits, 0.07, 3)  # every rank's rows on one process: the same assignment
    assert torch.allclose(torch.cat([p["q"] for p in parts]), ref, rtol=1e-5, atol=1e-9)
    # DINOv2's: the total, one per iteration (and the patch count); ours adds the max: 1 + 1 + 1 + 3
    assert [p["calls"] for p in parts] == [6, 6]


# ---------------------------------------------------------------- KoLeo

def test_koleo_values_and_gradients_equal_dinov2s():
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = koleo(a), ref_koleo(b)
    assert torch.allclose(ours, ref, rtol=1e-6), (ours, ref)
    ours.backward()
    ref.backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_koleo_is_finite_where_dinov2s_is_not():
    """DINOv2's turns autocast off but computes in the fp16 it is given (FSDP's param_dtype), where its
    eps of 1e-8 is 0: one image per crop (facebookresearch/dinov2 issue 314), or two identical ones,
    give inf. Ours computes in fp32, and one image has no neighbour: 0."""
    one = torch.randn(1, 32).half()
    assert torch.isinf(ref_koleo(one))
    leaf = one.clone().requires_grad_()
    loss = koleo(leaf)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(leaf.grad).all()
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    x[1] = x[0]  # two identical images
    assert torch.isinf(ref_koleo(x.half()))
    ours = x.half().requires_grad_()
    value = koleo(ours)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(ours.grad).all()
    assert torch.isclose(koleo(x), ref_koleo(x))  # in fp32 both agree


# ---------------------------------------------------------------- the loss terms

def test_patch_and_cls_terms_equal_dinov2s():
    g = torch.Generator().manual_seed(4)
    G, B, N, K, L = 2, 3, 16, 20, 2
    masks = torch.rand(G, B, N, generator=g) < 0.4
    masks[0, 1] = False  # an unmasked image counts in the average, as DINOv2's division by 2B
    index = masks.flatten().nonzero().squeeze(1)
    M = index.numel()
    student_patch, student_cls = torch.randn(M, K, generator=g), torch.randn((G + L) * B, K, generator=g)
    teacher_patch = torch.softmax(torch.randn(M, K, generator=g), -1)  # targets (after SK or centering)
    teacher_cls = torch.softmax(torch.randn(G * B, K, generator=g), -1)
    ours = ibot_losses(student_cls, student_patch, masks, teacher_cls.log(), teacher_patch.log(), torch.zeros(K),
                       torch.zeros(K), 0.1, 1.0, 1.0, mask_index=index, patch_teacher_rows=torch.arange(M))
    ref_mim = ref_patch_loss(student_patch, teacher_patch, masks.flatten(0, 1))
    assert torch.isclose(ours["mim"], ref_mim, rtol=1e-5), (ours["mim"], ref_mim)
    # DINOv2 pairs student crop A with teacher crop B: its teacher list is chunked and reversed
    reversed_teacher = torch.cat(teacher_cls.chunk(2)[::-1])
    ref_cls = ref_dino_cls_loss(student_cls[G * B:], student_cls[:G * B], reversed_teacher, L)
    assert torch.isclose(ours["cls"], ref_cls, rtol=1e-5), (ours["cls"], ref_cls)


# ---------------------------------------------------------------- masks

@pytest.mark.parametrize("side,n", [(16, 24), (4, 8), (14, 5)])
def test_batch_masks_equal_dinov2s_collate_draw_for_draw(side, n):
    sampler = MaskSampler((side, side), "block", (0.1, 0.5), prob=0.5, min_block_patches=4, spread=True,
                          max_block_fraction=0.5)
    for seed in range(40):
        ref = ref_dinov2_masks(side, n, (0.1, 0.5), 0.5, random.Random(seed))
        ours = sampler.batch(n, PythonRandomShuffle(seed))
        assert np.array_equal(ours, ref), seed
        assert (ours.reshape(n, -1).any(1)).sum() <= int(n * 0.5)  # exactly half drawn (a tiny one may fit none)


def test_loader_draws_a_batchs_masks_together():
    from data.pipeline import StreamPlan

    sampler = MaskSampler((16, 16), "block", (0.1, 0.5), prob=0.5, min_block_patches=4, spread=True,
                          max_block_fraction=0.5)
    plan = StreamPlan(("x",), augment=None, mask_sampler=sampler, batch_size=4)
    views = type("V", (), {"global_crops": [torch.zeros(3, 8, 8)] * 2, "local_crops": [], "second_crops": None,
                           "global_params": None, "local_params": None})
    plan = plan.__class__(**{**plan.__dict__, "augment": type("A", (), {"n_local": 0, "local_size": 4})()})
    items = [(views, seed, 0, f"k{seed}") for seed in (11, 12, 13, 14)]
    batch = plan.collate(items)
    assert batch["masks"].shape == (2, 4, 16, 16)
    assert batch["masks"].flatten(2).any(-1).sum() == 4  # half of the 8 global crops
    assert torch.equal(plan.collate(items)["masks"], batch["masks"])  # a function of the samples' seeds


# ---------------------------------------------------------------- the backbone

def test_vit_giant2_with_swiglu_has_dinov2s_parameter_count():
    """DINOv2's vit_giant2 (vision_transformer.py: embed 1536, depth 40, 24 heads, ffn swiglufused,
    LayerScale), its modules' shapes counted by hand at 224 pixels, patch 14."""
    C, depth, H = 1536, 40, (int(4 * 1536 * 2 / 3) + 7) // 8 * 8  # SwiGLUFFNFused's 4096
    N = (224 // 14) ** 2
    block = (2 * C) + (3 * C * C + 3 * C) + (C * C + C) + C + (2 * C) + (C * 2 * H + 2 * H) + (H * C + C) + C
    dinov2 = 3 * 14 * 14 * C + C + C + (1 + N) * C + C + depth * block + 2 * C  # patch, cls, pos, mask, norm
    with torch.device("meta"):
        ours = build_vit("vit_giant2", img_size=224, ffn="swiglu", layer_scale=1e-5)
    assert H == 4096
    assert sum(p.numel() for p in ours.parameters()) == dinov2 == 1_134_771_200
    # at its hub resolution (518 pixels, 37 x 37 positions) the published count of dinov2_vitg14
    assert dinov2 + (37 * 37 - N) * C == 1_136_480_768


def test_registers_sit_between_cls_and_patches_without_positions():
    """DINOv2's prepare_tokens_with_masks: [CLS] + patches get positions, then the registers go after [CLS]."""
    torch.manual_seed(0)
    m = build_vit("vit_test", img_size=32, registers=4, ffn="swiglu", layer_scale=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.rand(2, 8, 8) < 0.3
    with torch.no_grad():
        tokens = m.patch_embed(x).flatten(1, 2)
        tokens = torch.where(masks.flatten(1).unsqueeze(-1), m.mask_token.view(1, 1, -1), tokens)
        tokens = torch.cat([m.cls_token.expand(2, -1, -1), tokens], dim=1) + m.pos_embed
        tokens = torch.cat([tokens[:, :1], m.reg_token.expand(2, -1, -1), tokens[:, 1:]], dim=1)
        for block in m.blocks:
            tokens = block(tokens)
        tokens = m.norm(tokens)
        out = m.forward_features(x, masks)
    assert m.num_prefix_tokens == 5 and m.pos_embed.shape[1] == 65
    assert torch.allclose(out["cls"], tokens[:, 0], atol=1e-6)
    assert torch.allclose(out["patch"], tokens[:, 5:], atol=1e-6)
    # and a local crop: positions resampled for [CLS] + patches only
    assert m.forward_features(torch.randn(2, 3, 16, 16))["patch"].shape == (2, 16, 32)


def test_uniform_drop_path():
    m = build_vit("vit_test", img_size=32, drop_path_rate=0.3, drop_path_uniform=True)
    linear = build_vit("vit_test", img_size=32, drop_path_rate=0.3)
    assert [b.drop_path1.drop_prob for b in m.blocks] == [0.3, 0.3]
    assert [getattr(b.drop_path1, "drop_prob", 0.0) for b in linear.blocks] == pytest.approx([0.0, 0.3])


@pytest.mark.parametrize("registers", [0, 4])
def test_swiglu_and_registers_export_to_transformers_dinov2_and_timm(tmp_path, monkeypatch, registers):
    """Dinov2Model / Dinov2WithRegistersModel with SwiGLU, and timm's ViT with SwiGLUPacked and reg_tokens
    (no_embed_class): the converter's own check compares both with our network (a swapped gate and up
    half, or a register placed wrongly, gives errors of order 1)."""
    import json

    import export.convert as hf_convert
    from trainer.config import load_config, to_dict
    from trainer.config.fields import files_unchecked
    from trainer.weights import Backbone

    torch.manual_seed(0)
    vit = build_vit("vit_test", img_size=32, patch_size=8, ffn="swiglu", registers=registers, layer_scale=0.5)
    with torch.no_grad():  # nothing at its init value: a unit gamma or a zero register would hide a swap
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    with files_unchecked():  # (the digits' shards are not read)
        config = to_dict(load_config(ROOT / "configs" / "dinov2_vit_tiny.yaml", [
            "model.arch=vit_test", "model.patch_size=8", f"model.registers={registers}", "model.layer_scale=0.5"]))
    b = Backbone(state=dict(vit.state_dict()), config=config, which="teacher", checkpoint=tmp_path, step=1,
                 world_size=1)
    monkeypatch.setattr(hf_convert, "read_backbone", lambda *a: b)
    done = hf_convert.convert("unused", tmp_path / "out", command="a test")
    want = "Dinov2WithRegistersModel" if registers else "Dinov2Model"
    assert done.hf_class == want and max(done.errors.values()) < 1e-5, done.errors
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["use_swiglu_ffn"] and config.get("num_register_tokens", 0) == registers


def test_a_transformers_dinov2_with_registers_directory_reads_into_our_vit(tmp_path):
    """finetune.init from a Dinov2WithRegistersModel (SwiGLU, 4 registers): the same tokens as transformers'."""
    import transformers

    from models.vit import vit_options
    from trainer.methods.finetune import read_init

    config = transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    mlp_ratio=2, use_swiglu_ffn=True, num_register_tokens=4,
                                                    image_size=32, patch_size=8)
    torch.manual_seed(0)
    theirs = transformers.Dinov2WithRegistersModel(config).eval()
    with torch.no_grad():  # nothing at its init value (unit gammas, zero registers)
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    theirs.save_pretrained(tmp_path / "hf")
    state = read_init(str(tmp_path / "hf"), "auto")
    options = vit_options(state)
    assert options["ffn"] == "swiglu" and options["registers"] == 4
    ours = build_vit("vit_test", img_size=32, patch_size=8, layer_scale=1.0, **options).eval()
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert missing == ["mask_token"] and not unexpected
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, mine = theirs(pixel_values=x).last_hidden_state, ours.forward_features(x)
    assert torch.allclose(mine["cls"], tokens[:, 0], atol=1e-5)
    assert torch.allclose(mine["patch"], tokens[:, 5:], atol=1e-5)
