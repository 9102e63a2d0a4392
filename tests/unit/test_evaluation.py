"""kNN and linear probe on features of known structure; the pictures' files."""

import json
import time

import pytest
import torch
from PIL import Image

from evaluation.knn import knn_classify
from evaluation.linear import linear_probe


def clusters(n_per_class: int, num_classes: int, dim: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:num_classes] * 4
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[y] + noise * torch.randn(len(y), dim, generator=g), y


def test_knn_is_perfect_on_separated_classes_and_exactly_half_right_when_half_are_mislabelled():
    train_x, train_y = clusters(50, 4, 16, 0.1, 0)
    test_x, test_y = clusters(10, 4, 16, 0.1, 1)
    result = knn_classify(train_x, train_y, test_x, test_y)
    assert set(result) == {10, 20, 100, 200}
    assert result[10]["top1"] == result[20]["top1"] == 100.0
    # k=200 covers every training sample (all 4 classes vote equally often): the weights decide,
    # and the nearest class's votes exp(sim / 0.07) dominate.
    assert result[200]["top1"] == 100.0
    wrong = test_y.clone()
    wrong[::2] = (wrong[::2] + 1) % 4  # every other label of the test set is someone else's
    assert knn_classify(train_x, train_y, test_x, wrong, ks=(20,))[20]["top1"] == 50.0


def test_knn_votes_are_weighted_by_similarity():
    # One very close neighbour of class 0 against two farther ones of class 1: the weighted vote
    # (T = 0.07) picks class 0; a flat vote (T huge) picks class 1.
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.05]])
    assert knn_classify(train, labels, test, torch.tensor([0]), ks=(3,))[3]["top1"] == 100.0
    assert knn_classify(train, labels, test, torch.tensor([0]), ks=(3,), temperature=1e6)[3]["top1"] == 0.0


def test_linear_probe_separates_what_knn_cannot_and_is_fast():
    # Labels decided by the sign of one coordinate, the others large noise: neighbours in cosine
    # distance are mostly noise, a linear layer reads the one coordinate.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1800, 64, generator=g) * 3
    x[:, 0] = torch.randn(1800, generator=g)
    y = (x[:, 0] > 0).long()
    t0 = time.perf_counter()
    result = linear_probe(x[:1500], y[:1500], x[1500:], y[1500:])
    seconds = time.perf_counter() - t0
    knn = knn_classify(x[:1500], y[:1500], x[1500:], y[1500:], ks=(20,))[20]["top1"]
    assert result["top1"] >= 95.0 and knn < 70.0, (result, knn)
    assert result["lr"] in result["held_out_top1"] and len(result["held_out_top1"]) == 7
    assert seconds < 30, seconds  # seen: ~5 s on 2 cores (7 learning rates x 100 epochs)


def _png(path, size=None):
    img = Image.open(path)
    assert img.format == "PNG" and img.size[0] > 0
    if size:
        assert img.size == size, img.size
    return img


def test_pictures_have_their_stated_size_and_the_curves_one_panel_per_loss_term(tmp_path):
    from evaluation import pictures
    from models.vit import build_vit

    vit = build_vit("vit_test", img_size=32, patch_size=8).eval()
    x = torch.randn(3, 3, 32, 32)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    attn = pictures.cls_attention(vit, x)
    assert attn.shape == (3, 2, 4, 4)
    torch.testing.assert_close(attn.sum((-1, -2)), torch.ones(3, 2) - _cls_self_attention(vit, x), atol=1e-5,
                               rtol=0)
    dpi, inch = pictures.FIGURE_DPI, pictures.PANEL_INCHES
    _png(pictures.attention_figure(vit, x, mean, std, tmp_path / "a.png"), (int(3 * inch * dpi), int(3 * inch * dpi)))
    feats = vit.forward_features(x)["patch"].detach()
    _png(pictures.clusters_figure(feats, x, mean, std, 3, tmp_path / "c.png"), (int(2 * inch * dpi),
                                                                                 int(3 * inch * dpi)))
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[:, :2] = True
    _png(pictures.masks_figure(x, masks, mean, std, "test", tmp_path / "m.png"),
         (int(3 * inch * dpi), int((inch + 0.4) * dpi)))

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 3.0 / s, "loss_cls": 2.0 / s, "loss_mim": 1.0 / s, "lr": 1e-3} for s in (1, 2, 3)]
    rows += [{"step": 3, "knn": 50.0, "knn_random_init": 20.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path, panels = pictures.curves_figure(metrics, tmp_path / "curves.png")
    assert panels == ["loss", "loss_cls", "loss_mim", "lr", "knn"]
    img = _png(path, (int(3 * 2 * inch * dpi), int(2 * 1.5 * inch * dpi)))
    assert img.info["Description"] == "panels: loss, loss_cls, loss_mim, lr, knn"


def _cls_self_attention(vit, x):
    """The attention [CLS] pays to itself (what the patch map leaves out), computed independently."""
    with torch.no_grad():
        captured = {}
        last = vit.blocks[-1]

        def hook(module, args):
            captured["x"] = args[0]

        handle = last.attn.register_forward_pre_hook(hook)
        vit.forward_features(x)
        handle.remove()
        B, N, C = captured["x"].shape
        h = last.attn.num_heads
        q, k, _ = last.attn.qkv(captured["x"]).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
        full = torch.nn.functional.softmax(q @ k.transpose(-2, -1) / (C // h) ** 0.5, dim=-1)
        return full[:, :, 0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ibot", "maskalign"])
def test_masks_picture_of_a_config(tmp_path, method):
    import subprocess
    import sys

    from conftest import ROOT

    args = ["--config", "configs/ibot_vit_tiny.yaml"]
    title = "ibot: block masks of the loader"
    if method == "maskalign":  # the masks come from the frozen teacher's attention, inside the method
        clip = tmp_path / "clip.pt"
        made = subprocess.run([sys.executable, "scripts/make_tiny_clip.py", str(clip)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert made.returncode == 0, made.stderr[-2000:]
        args = ["--config", "configs/maskalign_vit_tiny.yaml", f"teacher.clip.weights={clip}",
                "maskalign.masking=attentive"]
        title = "maskalign: attentive masking, visible patches kept"
    out = tmp_path / "masks.png"
    result = subprocess.run([sys.executable, "scripts/visualize.py", "masks", "--out", str(out), "--views", "4", *args,
                             f"data.cache_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith(str(out))
    img = _png(out)
    assert img.info["Description"] == f"4 views with masks: {title}"


def test_dinov2_grid_inputs_are_its_create_linear_input():
    """evaluation/linear_grid.py: each configuration's input is dinov2/eval/linear.py create_linear_input's
    (the last n [CLS] tokens, oldest first, then the last block's mean patch token)."""
    from evaluation.linear_grid import grid_features, grid_inputs

    tokens = [(torch.full((2, 3), float(i)), torch.randn(2, 5, 3)) for i in range(4)]
    inputs = grid_inputs(grid_features(tokens), 4)
    assert sorted(inputs) == [(1, False), (1, True), (4, False), (4, True)]
    assert torch.equal(inputs[(1, False)], tokens[3][0])
    assert torch.equal(inputs[(4, True)], torch.cat([*(c for c, _ in tokens), tokens[3][1].mean(1)], dim=1))
    assert torch.equal(inputs[(1, True)], torch.cat([tokens[3][0], tokens[3][1].mean(1)], dim=1))
    assert sorted(grid_inputs(grid_features(tokens[-2:]), 2)) == [(1, False), (1, True), (2, False), (2, True)]


def test_dinov2_grid_trains_every_layer_on_its_own_columns_and_picks_on_held_out_train():
    from evaluation.linear_grid import DINOV2_LRS, score_grid, train_grid

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 15, generator=g)  # 4 blocks' [CLS] (3 wide) + the mean patch token
    y = x[:, 9:12].argmax(1)  # only the last block's [CLS] knows the class
    layers = train_grid(x, y, 3, 4, epochs=1, epoch_length=300)
    assert len(layers) == 4 * len(DINOV2_LRS)
    w, _ = layers[(1, False, 0.1)]
    assert (w[:9] == 0).all() and (w[12:] == 0).all() and (w[9:12] != 0).any()  # reads the last [CLS] alone
    r = score_grid(layers, x[:100], y[:100], x[100:], y[100:])
    assert r["chosen"][4] > 95.0 and r["chosen"][2] >= 1e-2, r["chosen"]  # a small lr barely moves in 300 steps
    assert r["best_on_val"][4] >= r["chosen"][4]


def test_logistic_regression_picks_c_on_held_out_train():
    from evaluation.linear_grid import log_regression

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 3
    y = torch.arange(400) % 4
    x = centres[y] + torch.randn(400, 8, generator=g)
    r = log_regression(x[:300], y[:300], x[300:], y[300:], c_values=(1e-6, 1.0), max_iter=200)
    assert r["C"] == 1.0 and r["held_out_top1"][1e-6] < r["held_out_top1"][1.0] and r["top1"] > 90.0, r
