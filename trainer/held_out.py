"""What the run measures on the held-out split: kNN of the method's evaluation features (beside the
same kNN on raw pixels), and the method's own held-out measures (`held_out_metrics`)."""

from __future__ import annotations

from pathlib import Path

import torch

from data.pipeline import labelled_batches
from data.shards import expand_shards
from data.transforms import normalize
from evaluation.features import extract_features
from evaluation.knn import knn_classify

from .config import Config
from .distributed import DistEnv


def knn_eval(cfg: Config, engine, device: torch.device, dtype: torch.dtype, env: DistEnv,
             student: bool = True) -> dict[str, float]:
    """Weighted kNN of the method's evaluation features, train split -> val split: {"knn"}, and
    {"knn_student"} where the method measures its student beside its EMA teacher (and `student`).
    One pass over the images: the networks' features side by side, split for the kNN."""
    if not cfg.data.val_shards:
        return {"knn": None}
    val_urls = expand_shards(cfg.data.val_shards)
    train_urls = expand_shards(cfg.data.train_shards)
    size, a = cfg.data.global_crops.size, cfg.data.augment
    method = engine.module
    networks = {"knn": method.eval_features}
    if student and method.student_eval_features is not None:
        networks["knn_student"] = method.student_eval_features
    widths = []

    def features(images):
        out = [f(images) for f in networks.values()]
        widths[:] = [o.shape[-1] for o in out]
        return torch.cat(out, dim=-1)

    def prepare(images):
        return normalize(images.to(device), a.mean, a.std, dtype)

    dummy = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    feats = {}
    method.eval()
    for name, urls in (("train", train_urls), ("val", val_urls)):
        batches = labelled_batches(urls, size, cfg.eval.batch_size, env.rank, env.world_size)
        feats[name] = extract_features(features, batches, prepare, dummy, device=device)
    method.train()
    k = cfg.eval.knn_k
    (train, train_labels), (val, val_labels) = feats["train"], feats["val"]
    out = {}
    for name, a_train, a_val in zip(networks, train.split(widths, dim=-1), val.split(widths, dim=-1)):
        out[name] = knn_classify(a_train, train_labels, a_val, val_labels, ks=(k,),
                                 temperature=cfg.eval.knn_temp)[k]["top1"]
    return out


def evaluate(cfg: Config, engine, device: torch.device, dtype: torch.dtype, env: DistEnv, run_dir: Path,
             step: int) -> dict[str, float]:
    """What tells a user the network is good: kNN on the held-out split (methods with
    `eval_features`), and a method's own measures on the held-out images (`held_out_metrics`: the
    tokenizer's PSNR, iTPN's pixel loss and reconstructions)."""
    method = engine.module
    # (at step 0 the EMA teacher is the student: measured once)
    out = knn_eval(cfg, engine, device, dtype, env, student=step > 0) if method.eval_features is not None else {}
    if method.held_out_metrics is None or not cfg.data.val_shards:
        return out
    size, resize = cfg.data.global_crops.size, type(method).held_out_resize(cfg)
    batches = labelled_batches(expand_shards(cfg.data.val_shards), size, cfg.eval.batch_size, env.rank,
                               env.world_size, transform=None if resize is None else centre_crop(resize, size))
    method.eval()
    with torch.no_grad():
        pairs = ((images.to(device), labels.to(device)) for images, labels in batches)
        out.update(method.held_out_metrics(pairs if method.held_out_labels else (images for images, _ in pairs),
                                           run_dir, step, cfg.data.global_crops.size))
    method.train()
    return out


def centre_crop(resize: int, size: int):
    """PIL image -> shorter side to `resize` (bicubic), then the centre `size` x `size`: timm's eval
    transform with crop_pct = size / resize."""
    from torchvision.transforms import functional as F

    return lambda img: F.center_crop(F.resize(img, resize, interpolation=F.InterpolationMode.BICUBIC), size)


def raw_pixel_knn(cfg: Config, env: DistEnv, device: torch.device) -> float | None:
    """The same kNN on the images themselves (at the global crop size, mean-centred, cosine): what a
    learned feature has to beat to be worth anything on this data."""
    if not cfg.data.val_shards:
        return None
    feats = {}
    for name, shards in (("train", cfg.data.train_shards), ("val", cfg.data.val_shards)):
        batches = labelled_batches(expand_shards(shards), cfg.data.global_crops.size, cfg.eval.batch_size, env.rank,
                                   env.world_size)
        feats[name] = extract_features(lambda x: x.flatten(1), batches, lambda x: x.to(device).float() / 255,
                                       torch.zeros(1, 3, 1, 1, dtype=torch.uint8), device=device)
    mean = feats["train"][0].mean(dim=0)
    k = cfg.eval.knn_k
    return knn_classify(feats["train"][0] - mean, feats["train"][1], feats["val"][0] - mean, feats["val"][1],
                        ks=(k,), temperature=cfg.eval.knn_temp)[k]["top1"]
