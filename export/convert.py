"""A training checkpoint converted to a Hugging Face `transformers` model directory and a timm file
(scripts/convert_to_hf.py is the command line).

Input: a run directory (its newest complete checkpoint), a checkpoint directory, or
`checkpoints/latest`, written by ZeRO-3 or ZeRO-2 on any number of ranks. One CPU process, no
process group; it holds about one fp32 copy of the backbone (see trainer/weights.py).

Output directory: config.json + model.safetensors (`ViTModel`, `Dinov2Model` for a backbone
with layer-scale, `BeitModel` for a BEiT backbone: relative position bias, q/v biases),
preprocessor_config.json (the run's resolution and normalisation), timm_model.safetensors (timm's
layout, its `beit_*` models for BEiT; the command that loads it is printed and in the card) and
README.md (the model card); an iTPN run (HiViT + pyramid, no transformers class) becomes
itpn.safetensors, which `export.itpn.load_itpn` rebuilds strictly, and a short card. Before it
returning, `convert` loads what it wrote with `AutoModel` and timm (or `load_itpn`) and compares
their [CLS] and patch features on two real photos with ours (`check=False` skips this). Errors
(not a checkpoint, incomplete, untrusted pickle, unknown architecture, an existing output) are one
`ExportError` line; nothing is left at the output path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evaluation.knn import percent
from export.backbones import LoadedBackbone, from_backbone, load_backbone, relative_error
from export.hf import TIMM_FILE, is_beit, save_hf, save_processor, shapes, timm_call, timm_snippet, timm_state
from export.itpn import CLASSIFIER_FILE as HIVIT_CLASSIFIER
from export.itpn import load_hivit_classifier, load_itpn, save_hivit_classifier, save_itpn
from models.archs import HIVIT_ARCHS
from trainer.weights import Backbone, ExportError, as_attributes, read_backbone

log = logging.getLogger("convert_to_hf")
SCRIPT = "scripts/convert_to_hf.py"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Relative error ||ours - theirs|| / ||ours|| of [CLS] and patch features allowed by the check.
# fp32: the same weights and the same arithmetic up to operation order (seen: 0, all on the CPU).
# bf16: the weights are rounded to 8 mantissa bits (relative 2^-9 each), features computed in fp32;
# seen 0.2-0.3% on a 2-step test model and on the trained default, so 2% passes rounding and still
# catches a wrong mapping (swapped q/k gives errors of order 1, tests/runs/test_export.py).
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}


def anonymous_gib() -> float:
    """This process's anonymous resident memory (Linux), which unlike RSS leaves out memory-mapped
    file pages: what reading a checkpoint really allocates. NaN where /proc is missing."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return float("nan")
    line = next((x for x in status.splitlines() if x.startswith("RssAnon:")), None)
    return int(line.split()[1]) / 2**20 if line else float("nan")


def sample_photos(size: int, processor_dir: Path) -> torch.Tensor:
    """scikit-learn's two sample photos through the written image processor -> [2, 3, size, size]."""
    from sklearn.datasets import load_sample_images
    from transformers import AutoImageProcessor

    images = [image.copy() for image in load_sample_images().images]  # writable: torch warns on read-only arrays
    pixels = AutoImageProcessor.from_pretrained(processor_dir)(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (size, size), pixels.shape
    return pixels.float()


def check(ours: LoadedBackbone, out: Path, dtype: str) -> dict[str, float]:
    """Features of what was written against ours; raises ExportError past the tolerance."""
    x = sample_photos(ours.image_size, out)
    reference = ours.features(x)
    errors = {}
    for label, path in (("transformers", out), ("timm", out / TIMM_FILE)):
        other = load_backbone(path)
        got = other.features(x)
        del other
        for part in ("cls", "patch"):
            if got[part].shape != reference[part].shape:
                raise ExportError(f"check: {label} {part} features have shape {tuple(got[part].shape)}, ours "
                                  f"{tuple(reference[part].shape)}")
            errors[f"{label}_{part}"] = relative_error(reference[part], got[part])
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE[dtype]}
    if bad:
        raise ExportError(f"check failed: the exported features differ from ours by {bad} (relative; "
                          f"tolerance {TOLERANCE[dtype]} for {dtype}); nothing was written")
    return errors


@dataclass
class Converted:
    """What `convert` wrote: the directory, and how to load it (`lines`, printed by the script)."""

    out: Path
    hf_class: str  # the transformers class, or "iTPN file"
    errors: dict[str, float] = field(default_factory=dict)  # the check's relative feature errors
    timm_name: str | None = None
    lines: list[str] = field(default_factory=list)


def model_card(b: Backbone, d: dict, hf_class: str, timm_line: str, out: Path, command: str, errors: dict) -> str:
    c = b.config
    global_batch = c["data"]["batch_size"] * c["optim"]["grad_accum"] * b.world_size
    ranks = f"{b.world_size} rank" + ("s" if b.world_size > 1 else "")
    layer_scale = ("" if not d["layer_scale"] else ", layer-scale" if hf_class in ("Dinov2Model", "BeitModel") else
                   ", layer-scale (folded into attn.proj and mlp.fc2 for ViTModel)")
    beit = beit_lines(d) if is_beit(d) else ""
    pooler = ("`AutoModel` adds ViT's pooler (a tanh layer pretraining never had) with random weights; use the\n"
              "[CLS] token of `last_hidden_state` as above." if hf_class == "ViTModel" else
              f"`{hf_class}`'s `pooler_output` is that same token (no pooler weights).")
    s = b.summary

    def pct(key):
        return percent(s.get(key))

    student = f"; its student {pct('knn_student')}" if s.get("knn_student") is not None else ""
    knn = (f"{pct('knn')} (weighted kNN, k={c['eval']['knn_k']}, T={c['eval']['knn_temp']}, on "
           f"{c['data'].get('val_shards') or 'no val split'}{student}); random init "
           f"{pct('knn_random_init')}, raw pixels {pct('knn_raw_pixels')}")
    check_line = ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) if errors else "skipped (--no-check)"
    return f"""---
library_name: transformers
tags: [vision, self-supervised, mimscale, {c['method']}]
pipeline_tag: image-feature-extraction
---

# {c['model']['arch']}/{d['patch']} pretrained with {c['method']} (mimscale)

- **Method**: {c['method']}; the exported weights are the **{b.which}** backbone
  ({'EMA teacher, as iBOT/DINO release' if b.which == 'teacher' else 'the trained student'}).
- **Architecture**: ViT, width {d['width']}, depth {d['depth']}, {d['heads']} heads, MLP {d['mlp']},
  patch {d['patch']}, image size {d['image_size']}{layer_scale}; `transformers`
  class `{hf_class}`{' with the [MASK] embedding' if b.uses_mask_token else ''}.{beit}
- **Training**: {b.step} steps x global batch {global_batch} ({ranks}) = {b.step * global_batch:,}
  images seen (of {c['schedule']['steps']} scheduled steps); checkpoint `{b.checkpoint}`.
- **Data**: `{c['data']['train_shards']}`, normalised with mean {c['data']['augment']['mean']},
  std {c['data']['augment']['std']}.
- **kNN top-1**: {knn}.
- **Produced by**: `{b.command or 'not recorded (checkpoint older than this field)'}`
- **Converted by**: `{command}`
- **Export check** (relative feature error against mimscale's model on two photos): {check_line}.
- **Left out** (pretraining only): {'; '.join(b.left_out)}.

## Use

```python
from transformers import AutoImageProcessor, AutoModel
processor = AutoImageProcessor.from_pretrained("{out}")
model = AutoModel.from_pretrained("{out}")
features = model(**processor(images=image, return_tensors="pt")).last_hidden_state[:, 0]  # [CLS]
```

{pooler} With timm:

```python
import timm
model = {timm_line}
```
"""


def beit_lines(d: dict) -> str:
    """The model card's BEiT options, with the `BeitConfig` keys that hold them."""
    rel = {"shared": "one table shared by all blocks (`use_shared_relative_position_bias`)",
           "per_block": "one table per block (`use_relative_position_bias`)", "none": "none"}[d["rel_pos_bias"]]
    bias = {"qv": "query and value, no key bias", "qkv": "query and value (the trained key bias is dropped: "
            "softmax ignores it)", "none": "none (BeitModel's query and value biases are zeros)"}[d["qkv_bias"]]
    grid = d["image_size"] // d["patch"]
    return (f"\n- **BEiT options**: relative position bias: {rel}; absolute position embeddings: "
            f"{'yes' if d['pos_embed'] != 'none' else 'no'}\n  (`use_absolute_position_embeddings`); attention "
            f"biases: {bias}. The relative position bias\n  was trained on the {grid} x {grid} patch grid: at other "
            "sizes BeitModel resamples its table (bilinear); mimscale's model refuses them.")


@contextlib.contextmanager
def staged(out: Path):
    """A hidden directory beside `out` to write into; it replaces `out` when the block succeeds and
    is removed when it fails, so nothing half-written is ever left at `out`."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(checkpoint: str | Path, out: str | Path, weights: str = "auto", dtype: str = "fp32",
            overwrite: bool = False, check_export: bool = True, command: str | None = None,
            labels: list[str] | None = None) -> Converted:
    """Write the backbone of `checkpoint` (a run, a checkpoint directory, checkpoints/latest or
    checkpoints/best; `weights`: auto, teacher or student) to the directory `out` in `dtype` (fp32 or
    bf16), and, unless `check_export` is off, compare what was written with our model; `command`: the
    command line for the model card (default: the script with these arguments). A fine-tuning run is
    written as a classifier, its classes named by `labels` (default: their numbers)."""
    command = command or shlex.join(["python", SCRIPT, str(checkpoint), str(out), "--weights", weights, "--dtype",
                                     dtype])
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    start_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the imports' share
    anon = anonymous_gib()
    try:
        b = read_backbone(checkpoint, weights)
    except (ValueError, KeyError, OSError, RuntimeError) as e:  # e.g. DeepSpeed on a missing optimizer shard
        if isinstance(e, ExportError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"cannot read {checkpoint}: {type(e).__name__}: {first}") from None
    read_gib = anonymous_gib() - anon
    if b.spec.format == "itpn":
        return convert_itpn(b, out, dtype, check_export, command)
    if b.spec.format == "classifier":
        return convert_classifier(b, out, dtype, check_export, command, labels)
    dims = shapes(b)  # an unknown architecture stops here, before anything is written
    backbone_gib = sum(v.numel() for v in b.state.values()) * 4 / 2**30
    log.info("read the %s backbone of %s (step %d, %d ranks): %d tensors, %.1fM parameters", b.which, b.checkpoint,
             b.step, b.world_size, len(b.state), sum(v.numel() for v in b.state.values()) / 1e6)
    log.info("left out (pretraining only): %s", "; ".join(b.left_out))
    with staged(out) as tmp:
        name, kwargs = timm_call(b)
        c = b.config
        meta = {"timm_name": name, "timm_kwargs": json.dumps(kwargs), "image_size": str(dims["image_size"]),
                "mean": json.dumps(list(c["data"]["augment"]["mean"])),
                "std": json.dumps(list(c["data"]["augment"]["std"])), "method": c["method"], "weights": b.which,
                "step": str(b.step), "format": "pt",
                "knn": json.dumps({k: v for k, v in b.summary.items() if k.startswith("knn")})}
        from safetensors.torch import save_file

        save_file(timm_state(b, DTYPES[dtype]), str(tmp / TIMM_FILE), metadata=meta)
        hf_class = save_hf(b, tmp, DTYPES[dtype]).__name__
        save_processor(b, tmp)
        ours = from_backbone(b)  # assigned from b.state: no copy
        b.state = {}
        errors = check(ours, tmp, dtype) if check_export else {}
        del ours  # the last reference to the backbone's tensors
        timm_line = timm_snippet(name, kwargs, str(out / TIMM_FILE))
        (tmp / "README.md").write_text(model_card(b, dims, hf_class, timm_line, out, command, errors))
    log.info("wrote %s (%s, %s)%s in %.0f s", out, hf_class, dtype,
             "; check: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) if errors else "",
             time.perf_counter() - t0)
    log.info("memory: %.2f GiB allocated by reading the backbone (fp32 backbone: %.2f GiB); peak resident %.2f GiB, "
             "%.2f GiB of it before reading (imports), the rest the backbone and memory-mapped checkpoint pages",
             read_gib, backbone_gib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, start_gib)
    return Converted(out, hf_class, errors, name, [
        f"transformers: AutoModel.from_pretrained({str(out)!r})  [{hf_class}]", f"timm ({name}): {timm_line}"])


def convert_classifier(b: Backbone, out: Path, dtype: str, check_export: bool, command: str,
                       labels: list[str] | None) -> Converted:
    """A fine-tuning run: an image classifier for transformers' pipeline and timm (export/classifier.py)."""
    from safetensors.torch import save_file

    import export.classifier as classifier

    if b.config["model"]["arch"] in HIVIT_ARCHS:
        return convert_hivit_classifier(b, out, dtype, command, labels)
    p = classifier.split(b, labels)
    size = shapes(p.backbone)["image_size"]  # an unknown architecture stops here, before anything is written
    aug = b.config["data"]["augment"]
    with staged(out) as tmp:
        name, kwargs, state = classifier.timm_classifier(p)
        meta = {"timm_name": name, "timm_kwargs": json.dumps(kwargs), "image_size": str(size),
                "mean": json.dumps(list(aug["mean"])), "std": json.dumps(list(aug["std"])),
                "method": b.config["method"], "step": str(b.step), "format": "pt", "labels": json.dumps(p.labels)}
        save_file({k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}, str(tmp / TIMM_FILE), metadata=meta)
        hf_class = classifier.save_hf_classifier(p, tmp, DTYPES[dtype]).__name__
        save_processor(p.backbone, tmp, b.method.held_out_resize(as_attributes(b.config)))
        errors = (classifier.check_classifier(p, tmp, tmp / TIMM_FILE, sample_photos(size, tmp), TOLERANCE[dtype])
                  if check_export else {})
        timm_line = classifier.timm_classifier_snippet(name, kwargs, str(out / TIMM_FILE))
        (tmp / "README.md").write_text(classifier.model_card(p, hf_class, timm_line, out, command, errors))
    log.info("wrote %s (%s, %d classes, %s)%s", out, hf_class, p.num_classes, dtype,
             "; check: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) if errors else "")
    return Converted(out, hf_class, errors, name, [
        f"transformers: pipeline('image-classification', model={str(out)!r})  [{hf_class}]",
        f"timm ({name}): {timm_line}"])


def convert_hivit_classifier(b: Backbone, out: Path, dtype: str, command: str, labels: list[str] | None) -> Converted:
    """A fine-tuned HiViT (iTPN): no transformers class, so one safetensors file that
    `export.itpn.load_hivit_classifier` rebuilds strictly, with the labels in its metadata."""
    c = b.config
    n = b.state["head.weight"].shape[0]
    labels = labels or [str(i) for i in range(n)]
    if len(labels) != n:
        raise ExportError(f"--labels names {len(labels)} classes, the head has {n}")
    arch = {"arch": c["model"]["arch"], "image_size": c["data"]["global_crops"]["size"],
            "patch_size": c["model"]["patch_size"], "layer_scale": 1.0 if "backbone.blocks.0.ls2.gamma" in b.state
            else None}
    extra = {"labels": labels, "mean": list(c["data"]["augment"]["mean"]), "std": list(c["data"]["augment"]["std"]),
             "step": b.step, "init": b.spec.arch["init"], "summary": b.summary,
             "eval_resize": b.method.held_out_resize(as_attributes(c))}  # shorter side, then the centre crop
    with staged(out) as tmp:
        save_hivit_classifier({k: v.to(DTYPES[dtype]) for k, v in b.state.items()}, arch, tmp / HIVIT_CLASSIFIER,
                              extra)
        load_hivit_classifier(tmp / HIVIT_CLASSIFIER)  # rebuilt strictly from what was written
        (tmp / "README.md").write_text(
            f"# HiViT ({arch['arch']}) fine-tuned with mimscale: {n} classes, step {b.step}\n\n"
            f"transformers has no HiViT class; load with\n\n    from export.itpn import load_hivit_classifier\n"
            f"    model, meta = load_hivit_classifier({str(out / HIVIT_CLASSIFIER)!r})\n"
            f"    logits = model(images)  # meta['labels'] names the classes\n\n"
            f"Input: {arch['image_size']} px, normalised with mean {extra['mean']} and std {extra['std']}. "
            f"Started from {extra['init']}. Command: {command}\n")
    log.info("wrote %s (HiViT classifier, %d classes, %s)", out / HIVIT_CLASSIFIER, n, dtype)
    return Converted(out, "HiViT classifier file",
                     lines=[f"HiViT classifier: export.itpn.load_hivit_classifier({str(out / HIVIT_CLASSIFIER)!r})"])


ITPN_FILE = "itpn.safetensors"


def photos(size: int, mean, std) -> torch.Tensor:
    """scikit-learn's two sample photos, shorter side resized (bicubic) and centre-cropped -> [2, 3, S, S]."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    from torchvision.transforms import functional as TF

    out = []
    for array in load_sample_images().images:
        img = TF.center_crop(TF.resize(Image.fromarray(array), size, TF.InterpolationMode.BICUBIC), size)
        out.append(TF.normalize(TF.to_tensor(img), mean, std))
    return torch.stack(out)


def convert_itpn(b: Backbone, out: Path, dtype: str, check_export: bool, command: str) -> Converted:
    """iTPN: transformers has no HiViT class, so backbone + pyramid go to one safetensors file that
    `export.itpn.load_itpn` rebuilds strictly from its metadata (checked here like the others)."""
    arch, c = b.spec.arch, b.config
    mean, std = list(c["data"]["augment"]["mean"]), list(c["data"]["augment"]["std"])
    with staged(out) as tmp:
        state = {k: v.to(DTYPES[dtype]) for k, v in b.state.items()}
        save_itpn(state, arch, tmp / ITPN_FILE, {"mean": mean, "std": std, "method": b.method.name, "weights": b.which,
                                                  "step": b.step, "knn": {k: v for k, v in b.summary.items()
                                                                          if k.startswith("knn")}})
        errors = {}
        if check_export:
            ours = from_backbone(b).model
            theirs = load_itpn(tmp / ITPN_FILE)[0].float()
            x = photos(arch["image_size"], mean, std)
            with torch.no_grad():
                a, t = ours.forward_features(x), theirs.forward_features(x)
            errors = {"patch": relative_error(a["patch"], t["patch"])}
            errors.update({f"pyramid{s}": relative_error(p, q) for s, p, q in zip((16, 8, 4), a["pyramid"],
                                                                                   t["pyramid"])})
            worst = max(errors.values())
            if worst > TOLERANCE[dtype]:
                raise ExportError(f"the written iTPN file differs from the checkpoint's model by {worst:.1e} "
                                  f"(tolerance {TOLERANCE[dtype]:.0e})")
        (tmp / "README.md").write_text(
            f"# iTPN ({arch['arch']}, feature pyramid {arch['fpn_dim']} wide), mimscale step {b.step}\n\n"
            f"Method {b.method.name}: {b.spec.about}. transformers "
            f"has no HiViT class; load with\n\n    from export.itpn import load_itpn\n"
            f"    model, meta = load_itpn({str(out / ITPN_FILE)!r})\n"
            f"    maps = model.forward_pyramid(images)  # strides 4, 8, 16: [B, {arch['fpn_dim']}, H/s, W/s]\n\n"
            f"Input: {arch['image_size']} px, normalised with mean {mean} and std {std}. Command: "
            f"{command}\n")
    log.info("wrote %s (iTPN backbone + pyramid, %s)%s", out / ITPN_FILE, dtype,
             "; check: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) if errors else "")
    return Converted(out, "iTPN file", errors, lines=[f"iTPN: export.itpn.load_itpn({str(out / ITPN_FILE)!r})"])
