"""Pictures: [CLS] self-attention per head, patch-feature clusters, training views with their
masks, and training curves. matplotlib, Agg backend; every figure has a fixed size in pixels
(FIGURE_DPI x its inches) so tests and users know what they get.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.vit import VisionTransformer  # noqa: E402

FIGURE_DPI = 100
PANEL_INCHES = 2.0


def _save(fig, path: Path, description: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")  # a reader never sees half a file
    fig.savefig(tmp, dpi=FIGURE_DPI, metadata={"Description": description})
    plt.close(fig)
    tmp.replace(path)
    return path


def _show(images: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised [B, 3, H, W] -> displayable [B, H, W, 3] in [0, 1]."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (images.float().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def cls_attention(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The last block's attention from [CLS] to every patch, per head: [B, heads, h, w] (DINO's Fig. 1)."""
    tokens = vit.patch_embed(x)
    h, w = tokens.shape[1:3]
    tokens = vit.norm_pre(vit._pos_embed(tokens))
    for block in vit.blocks[:-1]:
        tokens = block(tokens)
    last = vit.blocks[-1]
    B, N, C = tokens.shape
    heads = last.attn.num_heads
    q, k, _ = last.attn.qkv(last.norm1(tokens)).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k = last.attn.q_norm(q), last.attn.k_norm(k)
    attn = (q[:, :, :1] @ k.transpose(-2, -1) * (C // heads) ** -0.5).softmax(-1)  # [B, heads, 1, N]
    return attn[:, :, 0, vit.num_prefix_tokens:].reshape(B, heads, h, w)


def attention_figure(vit: VisionTransformer, x: torch.Tensor, mean, std, path: Path) -> Path:
    """One row per image: the image, then each head's [CLS] attention overlaid on it."""
    attn = cls_attention(vit, x)
    up = torch.nn.functional.interpolate(attn, size=x.shape[-2:], mode="nearest")
    up = up / up.flatten(2).amax(-1)[..., None, None].clamp_min(1e-12)
    images = _show(x, mean, std)
    rows, cols = x.shape[0], attn.shape[1] + 1
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES), squeeze=False)
    for i in range(rows):
        axes[i, 0].imshow(images[i])
        for j in range(attn.shape[1]):
            axes[i, j + 1].imshow(images[i])
            axes[i, j + 1].imshow(up[i, j].numpy(), cmap="inferno", alpha=0.6)
            if i == 0:
                axes[0, j + 1].set_title(f"head {j}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("last block: [CLS] attention to each patch", fontsize=9)
    return _save(fig, path, f"cls attention, {rows} images x {attn.shape[1]} heads")


def clusters_figure(patch_features: torch.Tensor, x: torch.Tensor, mean, std, k: int, path: Path) -> Path:
    """k-means of the patch features of all images together (so a colour means the same cluster in
    every image), each patch coloured by its cluster, beside the image."""
    from sklearn.cluster import KMeans

    B, N, C = patch_features.shape
    grid = math.isqrt(N)
    feats = torch.nn.functional.normalize(patch_features.float(), dim=-1).reshape(B * N, C).cpu().numpy()
    labels = KMeans(n_clusters=k, n_init=4, random_state=0).fit_predict(feats).reshape(B, grid, grid)
    images = _show(x, mean, std)
    fig, axes = plt.subplots(B, 2, figsize=(2 * PANEL_INCHES, B * PANEL_INCHES), squeeze=False)
    for i in range(B):
        axes[i, 0].imshow(images[i])
        axes[i, 1].imshow(images[i])
        axes[i, 1].imshow(labels[i], cmap="tab10", vmin=0, vmax=9, alpha=0.55, interpolation="nearest",
                          extent=(0, x.shape[-1], x.shape[-2], 0))
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"patch features, k-means k={k}", fontsize=9)
    return _save(fig, path, f"patch clusters, {B} images, k={k}")


def masks_figure(views: torch.Tensor, masks: torch.Tensor | None, mean, std, title: str, path: Path) -> Path:
    """views: [n, 3, H, W] normalised; masks: [n, h, w] bool (True = masked) or None. Masked patches greyed."""
    images = _show(views, mean, std)
    n = images.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(n * PANEL_INCHES, PANEL_INCHES + 0.4), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(images[i])
        if masks is not None:
            m = masks[i].float().numpy()
            axes[0, i].imshow(np.ma.masked_where(m == 0, m), cmap="gray", vmin=0, vmax=1, alpha=0.75,
                              interpolation="nearest", extent=(0, images.shape[2], images.shape[1], 0))
            axes[0, i].set_title(f"{int(m.sum())}/{m.size} masked", fontsize=8)
        axes[0, i].axis("off")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path, f"{n} views with masks: {title}")


def curve_panels(records: list[dict]) -> list[str]:
    """The panels the curves figure draws: the optimised total, each loss term, lr, kNN (if logged)."""
    keys = {k for r in records for k in r}
    terms = sorted(k for k in keys if k.startswith("loss_"))
    return [k for k in ("loss", *terms, "lr", "knn") if k in keys]


def curves_figure(metrics: Path, path: Path) -> tuple[Path, list[str]]:
    """Training curves from metrics.jsonl as one PNG, one panel per quantity."""
    records = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    panels = curve_panels(records)
    if not panels:
        raise ValueError(f"{metrics} has no logged losses")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2 * PANEL_INCHES, rows * 1.5 * PANEL_INCHES), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
        steps, values = zip(*pts) if pts else ((), ())
        ax.plot(steps, values, marker="o" if key == "knn" else None, markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if key == "knn":
            student = [(r["step"], r["knn_student"]) for r in records if r.get("knn_student") is not None]
            if student:  # beside the EMA teacher's (trainer/held_out.py)
                ax.plot(*zip(*student), marker="o", markersize=3, label="student")
            for ref, style in (("knn_random_init", ":"), ("knn_raw_pixels", "--")):
                ref_value = next((r[ref] for r in records if r.get(ref) is not None), None)
                if ref_value is not None:
                    ax.axhline(ref_value, linestyle=style, color="gray", label=ref[4:].replace("_", " "))
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path, "panels: " + ", ".join(panels)), panels


def image_rows_figure(rows: list[torch.Tensor], title: str, path: Path) -> Path:
    """Rows of images in [0, 1] ([n, 3, H, W] each), one column per image, the title above."""
    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n, 1.2 * len(rows) + 0.2), squeeze=False)
    for r, row in enumerate(rows):
        for i in range(n):
            axes[r][i].imshow(row[i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            axes[r][i].set_axis_off()
    fig.suptitle(title, fontsize=7)
    return _save(fig, path, title)


def first_images(shards: str, size: int, n: int) -> torch.Tensor:
    """The first `n` images of labelled shards, resized and centre-cropped as kNN sees them (uint8)."""
    from data.pipeline import labelled_batches
    from data.shards import expand_shards

    images, _ = next(labelled_batches(expand_shards(shards), size, n))
    return images


def write_run_pictures(run_dir: Path, backbone, num_images: int = 6) -> list[Path]:
    """What a finished run leaves for a user without TensorBoard: curves.png (from metrics.jsonl) and
    attention.png (the run's backbone, an export.backbones.LoadedBackbone: its [CLS] attention on
    held-out images; clusters.png, k-means of the patch features, for a backbone without [CLS])."""
    from data.transforms import normalize

    run_dir = Path(run_dir)
    out = [curves_figure(run_dir / "metrics.jsonl", run_dir / "curves.png")[0]]
    val = backbone.run_config["data"].get("val_shards")
    if val:
        x = normalize(first_images(val, backbone.image_size, num_images), backbone.mean, backbone.std)
        if backbone.num_prefix_tokens:
            out.append(attention_figure(backbone.model, x, backbone.mean, backbone.std, run_dir / "attention.png"))
        else:  # no [CLS] to attend from (HiViT): what the stride-16 features group together
            patch = backbone.features(x)["patch"]
            out.append(clusters_figure(patch, x, backbone.mean, backbone.std, 4, run_dir / "clusters.png"))
    return out


def sample_images(paths: list[str] | None, backbone) -> torch.Tensor:
    """Normalised [B, 3, S, S] for `backbone` (its image_size, mean, std, run_config): the given files,
    a digits run's held-out images, or scikit-learn's two sample photos, resized (bicubic) and
    centre-cropped to its resolution."""
    from PIL import Image
    from torchvision.transforms import functional as F

    from data.transforms import normalize

    size = backbone.image_size
    if paths:
        pil = [Image.open(p).convert("RGB") for p in paths]
    elif backbone.run_config and backbone.run_config["data"].get("val_shards") and size < 64:
        return normalize(first_images(backbone.run_config["data"]["val_shards"], size, 6), backbone.mean,
                         backbone.std)
    else:
        from sklearn.datasets import load_sample_images

        pil = [Image.fromarray(a) for a in load_sample_images().images]
    x = torch.stack([F.pil_to_tensor(F.center_crop(F.resize(p, size, F.InterpolationMode.BICUBIC), size))
                     for p in pil])
    return normalize(x, backbone.mean, backbone.std)
