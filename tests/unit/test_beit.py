"""BEiT (seed 002): the backbone options against transcriptions of microsoft/unilm beit/, the
blockwise masks, the two-size views, the objective, and the checks that stop a bad stage 2."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_tokenizer_file
from PIL import Image

from data.masking import MaskSampler
from data.transforms import MultiCrop
from models.dvae import DVAEArch, FrozenTokenizer
from models.vit import RelativePositionBias, build_vit, relative_position_index
from trainer.methods.beit import BEiT, beit_loss

ROOT = Path(__file__).resolve().parents[2]
TINY_ARCH = DVAEArch(group_count=3, n_hid=8, n_blk_per_group=1, vocab_size=32)


def reference_index(h: int, w: int) -> torch.Tensor:
    """microsoft/unilm beit/modeling_finetune.py RelativePositionBias, transcribed."""
    coords = torch.stack(torch.meshgrid([torch.arange(h), torch.arange(w)], indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    n = (2 * h - 1) * (2 * w - 1) + 3
    index = torch.zeros(size=(h * w + 1,) * 2, dtype=rel.dtype)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = n - 3
    index[0:, 0] = n - 2
    index[0, 0] = n - 1
    return index


@pytest.mark.parametrize("grid", [(14, 14), (4, 4), (3, 5)])
def test_relative_position_index_is_beits(grid):
    assert torch.equal(relative_position_index(*grid, torch.device("cpu")), reference_index(*grid))


def test_attention_with_relative_bias_and_qv_biases_is_beits():
    """Our block's attention (q/v biases, per-block table, plus the shared bias passed in) against
    BEiT's Attention.forward written out: qkv = x W + (q_bias, 0, v_bias), q * scale @ k^T + bias."""
    torch.manual_seed(0)
    vit = build_vit("vit_test", img_size=32, patch_size=8, rel_pos_bias="per_block", qkv_bias="qv", pos_embed="none")
    attn = vit.blocks[0].attn
    assert attn.qkv.bias is None and attn.q_bias is not None and attn.v_bias is not None
    with torch.no_grad():
        for p in (attn.q_bias, attn.v_bias, attn.rel_pos.relative_position_bias_table):
            p.normal_()
    shared = RelativePositionBias((4, 4), 2)
    with torch.no_grad():
        shared.relative_position_bias_table.normal_()
    x = torch.randn(3, 17, 32)
    ours = attn(x, attn_mask=shared())

    B, N, C = x.shape
    bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, bias).reshape(B, N, 3, 2, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (C // 2) ** -0.5, qkv[1], qkv[2]
    table = attn.rel_pos.relative_position_bias_table
    own = table[reference_index(4, 4).view(-1)].view(N, N, -1).permute(2, 0, 1)
    a = (q @ k.transpose(-2, -1) + own.unsqueeze(0) + shared().unsqueeze(0)).softmax(dim=-1)
    expected = attn.proj((a @ v).transpose(1, 2).reshape(B, N, -1))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_beit_init_and_layer_scale():
    torch.manual_seed(0)
    vit = build_vit("vit_small", img_size=32, patch_size=8, layer_scale=0.1, rel_pos_bias="shared", qkv_bias="qv",
                    init="beit", pos_embed="none")
    assert vit.pos_embed is None and vit.rel_pos_bias is not None
    assert torch.count_nonzero(vit.rel_pos_bias.relative_position_bias_table) == 0  # the reference: zeros
    for i, block in enumerate(vit.blocks):
        bound = 0.02 / math.sqrt(2 * (i + 1))  # truncated at +-0.02, then divided by sqrt(2 * layer)
        for w in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert w.abs().max() <= bound + 1e-7 and w.abs().max() > 0.8 * bound
        assert block.attn.qkv.weight.abs().max() <= 0.02 + 1e-7
        assert torch.all(block.ls1.gamma == 0.1) and torch.all(block.ls2.gamma == 0.1)
    for t in (vit.cls_token, vit.mask_token):
        assert 0 < t.abs().max() <= 0.02 + 1e-7
    # timm's init (the default) keeps its own, larger spread
    assert build_vit("vit_small", img_size=32, patch_size=8).blocks[11].attn.proj.weight.abs().max() > 0.03
    with pytest.raises(ValueError, match="relative position bias"):
        vit.forward_features(torch.randn(1, 3, 48, 48))  # defined on the 4 x 4 grid only


def test_beit_masks_count_blocks_and_aspect(monkeypatch):
    import data.masking as masking

    shapes = []
    original = masking.block_shape

    def recording(area, rng, min_aspect=0.3):
        h, w = original(area, rng, min_aspect)
        shapes.append((area, h, w))
        return h, w

    monkeypatch.setattr(masking, "block_shape", recording)
    sampler = MaskSampler((14, 14), "block", prob=1.0, min_block_patches=16, min_aspect=0.3, patches=75)
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(200):
        shapes.clear()
        mask = sampler(rng)
        counts.append(int(mask.sum()))
        assert mask.shape == (14, 14) and mask.sum() <= 75
        first_area, h, w = shapes[0]
        assert first_area >= 16  # the first block of every mask: area ~ U(16, 75)
        for area, h, w in shapes:
            if area >= 16:  # (the last blocks of a mask fill the remainder and may be smaller)
                assert 0.2 <= h / max(w, 1) <= 5  # aspect log-uniform in [0.3, 1/0.3], rounded to whole patches
    assert np.mean(counts) > 72 and np.median(counts) == 75  # like BEiT's, it can stop a few short


def test_two_size_views_share_one_box():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mc = MultiCrop(global_size=32, global_scale=(0.3, 1.0), n_global=1, n_local=0, local_size=16, blur_p=[0.0],
                   solarize_p=[0.0], color_jitter_p=0.0, flip_p=0.5, second_size=16)
    torch.manual_seed(3)
    big, local, small = mc(img)[:3]
    assert big[0].shape == (3, 32, 32) and small[0].shape == (3, 16, 16) and local == []
    # the small view is the big one's box at half the size: their 2x2-pooled versions nearly agree
    pooled = F.avg_pool2d(big[0][None].float(), 2)
    assert (pooled - small[0][None].float()).abs().mean() < 12


def test_loss_uses_masked_positions_only_and_is_the_seeds_objective():
    torch.manual_seed(0)
    tok = FrozenTokenizer(TINY_ARCH)
    vit = build_vit("vit_test", img_size=32, patch_size=8, rel_pos_bias="shared", qkv_bias="qv", init="beit",
                    pos_embed="none", layer_scale=0.1)
    method = BEiT(vit, tok, vocab_size=32)
    masks = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    masks[0, 0, :2, :3] = masks[0, 1, 1:, 0] = masks[0, 2, 3, 3] = True
    batch = {"global_crops": torch.randn(1, 3, 3, 32, 32), "second_crops": torch.randint(0, 255, (1, 3, 3, 16, 16)),
             "masks": masks}
    tokens = torch.randint(0, 32, (3, 4, 4))
    method.tokenizer.forward = lambda images: tokens.clone()
    out = method(batch, {})

    # The seed: minimise - sum over masked i of log p(z_i | x^M), averaged over the masked patches.
    with torch.no_grad():
        h = vit.forward_features(batch["global_crops"][0], masks[0])["patch"]  # [B, N, C]
        logits = method.student.head(h)
    nll = [-logits[b, i].log_softmax(-1)[tokens.flatten(1)[b, i]] for b in range(3) for i in range(16)
           if masks[0, b].flatten()[i]]
    torch.testing.assert_close(out["mim"], torch.stack(nll).mean(), atol=1e-5, rtol=1e-5)

    # Tokens at unmasked positions do not matter; one at a masked position does.
    tokens[0, 3, 3] = (tokens[0, 3, 3] + 1) % 32
    assert torch.equal(method(batch, {})["mim"], out["mim"])
    tokens[0, 0, 0] = (tokens[0, 0, 0] + 1) % 32
    assert not torch.equal(method(batch, {})["mim"], out["mim"])
    # and the function alone: rows in masks.nonzero() order
    labels = tokens.flatten(1)
    r = beit_loss(torch.randn(int(masks.sum()), 32), labels, masks[0].flatten(1))
    assert set(r) == {"mim", "token_accuracy", "mim_blind", "accuracy_blind"} and 0 <= r["token_accuracy"] <= 1
    # the image-blind references: the entropy of the masked tokens' frequencies and the commonest one's share
    labels = torch.tensor([3, 3, 3, 5])
    r = beit_loss(torch.zeros(4, 8), labels.view(1, 4), torch.ones(1, 4, dtype=torch.bool))
    p = torch.tensor([0.75, 0.25])
    torch.testing.assert_close(r["mim_blind"], -(p * p.log()).sum())
    assert r["accuracy_blind"] == 0.75 and math.isclose(r["mim"].item(), math.log(8), rel_tol=1e-6)


def _stage2(tmp_path, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch.py", "--config", "configs/beit_vit_tiny.yaml", f"run.output_dir={tmp_path / 'run'}",
           "schedule.steps=1", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})


class Payload:  # a pickle that needs code to load (module level: pickle finds it by name)
    pass


def test_bad_tokenizer_files_stop_before_training(tmp_path):
    """Each bad file is refused by the config check, naming beit.tokenizer and the file; launch.py
    turns that into one line and exit 2 before anything starts (run once, for the pickle)."""
    from trainer.config import ConfigError, load_config

    pickled = tmp_path / "encoder.pkl"
    torch.save({"blocks.input.w": Payload()}, pickled)
    wrong_vocab = tiny_tokenizer_file(tmp_path / "v32.safetensors")  # 32 codes, checked against beit.vocab_size 64
    wrong_grid = tiny_tokenizer_file(tmp_path / "g2.safetensors", arch=DVAEArch(group_count=2, n_hid=8,
                                                                                 n_blk_per_group=1, vocab_size=32))
    cases = {tmp_path / "missing.safetensors": "not found", pickled: "encoder.pkl",
             wrong_vocab: "vocabulary of 32 codes, beit.vocab_size is 64", wrong_grid: "data.global_crops.second_size"}
    for path, expected in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(ROOT / "configs" / "beit_vit_tiny.yaml", [f"beit.tokenizer={path}", "beit.vocab_size=64"
                                                                  if path == wrong_vocab else "beit.vocab_size=32"])
        assert "beit" in str(e.value) and expected in str(e.value) and "\n" not in str(e.value), (path, e.value)
    r = _stage2(tmp_path, f"beit.tokenizer={pickled}")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "beit.tokenizer" in lines[0] and "needs code to load" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()
