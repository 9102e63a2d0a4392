"""A pretrained backbone out of a training checkpoint, on one CPU process, without a process group.

The student comes from DeepSpeed's fp32 master weights, read through `zero_to_fp32` in its lazy
mode: the optimizer files are memory-mapped and Adam's moments are never read. Under ZeRO-3 each
parameter is assembled from its per-rank slices only when it is asked for, so only the backbone's
tensors are materialised (one fp32 copy); under ZeRO-2 DeepSpeed concatenates all trainable fp32
parameters (the heads too) into one buffer, so the student costs one fp32 copy of backbone and
heads (and DeepSpeed reads the bf16 model-states file whole). The EMA teacher comes from our fp32
shadow slices in the per-rank files (`rankNNNNN.pt`, also memory-mapped), put back together in ZeRO-3's partition order
(whole tensors under ZeRO-0/1/2). Shapes come from DeepSpeed's model-states file, so exporting the
teacher never reads the student.

Everything that exists only for pretraining (projection heads, MaskAlign's adapters and W, the
distillation adapter, iBOT's centers, the EMA teacher's head, a frozen CLIP teacher) is left out
and named in `Backbone.left_out`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from trainer.checkpoint import Checkpointer, UntrustedFileError, check_weights_only, deepspeed_safe_globals
from trainer.methods import method_class
from trainer.methods.base import ExportSpec, Method

BACKBONE = "backbone."


class ExportError(ValueError):
    """The input cannot be exported; the message names it and says why, in one line."""


@dataclass
class Backbone:
    state: dict[str, torch.Tensor]  # our VisionTransformer's (= timm's) keys, fp32 (iTPN: backbone.*, pyramid.*)
    config: dict  # the run's resolved config
    which: str  # "teacher" | "student"
    checkpoint: Path
    step: int
    world_size: int  # ranks that wrote the checkpoint
    summary: dict = field(default_factory=dict)  # kNN accuracies etc. recorded by the run
    command: str | None = None
    left_out: list[str] = field(default_factory=list)

    @property
    def method(self) -> type[Method]:
        """The run's method (trainer/methods/base.py): what it trained and how to export it."""
        return method_class(self.config["method"])

    @property
    def spec(self) -> ExportSpec:
        """What the method says export needs from the run's config beyond the tensors."""
        return self.method.export_spec(as_attributes(self.config))

    @property
    def uses_mask_token(self) -> bool:
        return self.method.uses_mask_token

    @property
    def layer_scale(self) -> bool:
        return "blocks.0.ls1.gamma" in self.state


def as_attributes(config: dict) -> SimpleNamespace:
    """A checkpoint's config (nested dicts) read as a `Config` is, by attribute: what the method's
    own questions (`frozen_files(cfg)`) read."""
    return SimpleNamespace(**{k: as_attributes(v) if isinstance(v, dict) else v for k, v in config.items()})


def checkpoint_method(ckpt: Path, config: dict) -> type[Method]:
    try:
        return method_class(config.get("method", ""))
    except ValueError as e:
        raise ExportError(f"{ckpt}: {e}") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its newest complete checkpoint), a `checkpoints/latest` or `checkpoints/best`
    file, or a checkpoint tag directory -> the tag directory, after vetting every pickle in it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ExportError(f"{path} does not exist")
    if path.is_file() and path.name == "latest":
        path = path.parent / path.read_text().strip()
    elif path.is_file() and path.name == "best":  # "<tag> <measure> <value>" (Checkpointer.mark_best)
        path = path.parent / path.read_text().split()[0]
    elif path.is_dir() and (path / "checkpoints").is_dir():  # a run directory
        newest = Checkpointer(path / "checkpoints", keep=1).latest()
        if newest is None:
            raise ExportError(f"{path} is a run directory without a complete checkpoint")
        path = newest
    elif path.is_dir() and (path / "latest").is_file():  # a run's checkpoints/ directory
        newest = Checkpointer(path, keep=1).latest()
        if newest is None:
            raise ExportError(f"{path} holds no complete checkpoint")
        path = newest
    if not path.is_dir() or not any(path.glob("*model_states.pt")):
        raise ExportError(f"{path} is not a mimscale checkpoint (no DeepSpeed model states in it); give a run "
                          "directory, a checkpoint directory (stepNNNNNNNN) or checkpoints/latest")
    if not (path / "COMPLETE").is_file():
        raise ExportError(f"{path} is an incomplete checkpoint (no COMPLETE marker: its save did not finish); "
                          "export an older one, or the run directory for its newest complete one")
    try:  # DeepSpeed's zero_to_fp32 unpickles with weights_only=False: vet every file first
        for f in sorted(path.glob("*.pt")):
            check_weights_only(f)
    except UntrustedFileError as e:
        raise ExportError(str(e)) from None
    return path


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _param_shapes(ckpt: Path) -> tuple[dict[str, torch.Size], list[str]]:
    """Every trainable parameter's full shape, and the buffer names, from DeepSpeed's model states."""
    files = sorted(ckpt.glob("*model_states.pt"))
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        states = _load(files[0])
    shapes = {k: v for group in states["param_shapes"] for k, v in group.items()}
    return shapes, list(states.get("buffer_names", []))


def _summarise_left_out(names: dict[str, int], frozen: list[tuple[str, str]]) -> list[str]:
    """{full name: numel} -> one entry per module ('student.head: 22 tensors, 0.03M')."""
    groups: dict[str, list[int]] = defaultdict(list)
    for name, n in names.items():
        parts = name.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
        groups[key].append(n)
    out = [f"{k} ({len(v)} tensors, {sum(v) / 1e6:.2f}M)" for k, v in sorted(groups.items())]
    out += [f"{name} (frozen, not in the checkpoint: {path})" for name, path in frozen if path]
    return out


def student_state(ckpt: Path, parts: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The student's backbone in its own layout (no prefix); with `parts` (iTPN: backbone and
    pyramid), those submodules' tensors with their part's name in front ("backbone.", "pyramid.")."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints; the files were vetted before
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True,
                                                        exclude_frozen_parameters=True)
    if parts:
        return {k[len("student."):]: v.contiguous() for k, v in lazy.items()
                if k.startswith(tuple(f"student.{p}." for p in parts))}
    prefix = "student." + BACKBONE
    # ZeRO-3: .contiguous() assembles one parameter from its memory-mapped per-rank slices into new
    # memory. ZeRO-2: DeepSpeed has already concatenated every trainable fp32 parameter (heads too)
    # into one buffer (its lazy mode does not cover stage 2); the backbone's tensors are views of it,
    # so the heads' share of it stays allocated with them, but nothing is copied twice.
    return {k[len(prefix):]: v.contiguous() for k, v in lazy.items() if k.startswith(prefix)}


def teacher_state(ckpt: Path, shapes: dict[str, torch.Size], parts: list[dict],
                  export_parts: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The EMA teacher's fp32 shadow: per-rank flat slices (ZeRO-3) or whole tensors (ZeRO-0/1/2); its
    backbone (unprefixed), or with `export_parts` those parts with their names in front."""
    names = parts[0]["ema"]["names"]
    out = {}
    for i, name in enumerate(names):
        if export_parts and name.startswith(tuple(f"{p}." for p in export_parts)):
            key = name
        elif not export_parts and name.startswith(BACKBONE):
            key = name[len(BACKBONE):]
        else:
            continue
        shape = shapes["student." + name]
        n = math.prod(shape)
        slices = [p["ema"]["shadow"][i].reshape(-1) for p in parts]
        whole = slices[0] if slices[0].numel() == n else torch.cat(slices)[:n]  # ZeRO-3 pads the last slice
        out[key] = whole.reshape(shape).clone()
    return out


def read_backbone(path: str | Path, which: str = "auto") -> Backbone:
    """which: 'teacher', 'student', or 'auto' (the EMA teacher where the method has one, as the
    iBOT/DINO papers release, else the student)."""
    ckpt = resolve_checkpoint(path)
    parts = [_load(p) for p in sorted(ckpt.glob("rank*.pt"))]
    if not parts:
        raise ExportError(f"{ckpt} has no rankNNNNN.pt files: it was not written by mimscale")
    config = json.loads(parts[0]["config"])
    method = checkpoint_method(ckpt, config)
    if method.product != "backbone":
        raise ExportError(f"{ckpt} is a {method.name} run: it trains a {method.product}, not a backbone; export it "
                          f"with {method.exported_by}")
    has_teacher = "ema" in parts[0]
    if which == "auto":
        which = "teacher" if has_teacher and method.teacher_not_exported is None else "student"
    if which == "teacher" and not has_teacher:
        raise ExportError(f"{ckpt}: method {method.name} has no EMA teacher; export --weights student")
    if which == "teacher" and method.teacher_not_exported:
        raise ExportError(f"{ckpt}: {method.teacher_not_exported}; export --weights student")
    shapes, buffers = _param_shapes(ckpt)
    if which == "teacher":
        state = teacher_state(ckpt, shapes, parts, method.export_parts)
    else:
        state = student_state(ckpt, method.export_parts)
    if not state:
        raise ExportError(f"{ckpt} holds no backbone parameters (student.backbone.*)")
    exported = (tuple(f"student.{part}." for part in method.export_parts) or ("student." + BACKBONE,)) \
        if which == "student" else None
    left = {k: math.prod(v) for k, v in shapes.items() if not (exported and k.startswith(exported))}
    left.update({b: 0 for b in buffers})
    if has_teacher:  # the EMA shadow: the teacher's head, and its backbone unless that is exported
        kept = tuple(f"{p}." for p in method.export_parts) or (BACKBONE,)
        for name, t in zip(parts[0]["ema"]["names"], parts[0]["ema"]["shadow"]):
            if which != "teacher" or not name.startswith(kept):
                left["teacher." + name] = math.prod(shapes.get("student." + name, t.shape))
    frozen = list(method.frozen_files(as_attributes(config)).items())
    summary = parts[0].get("summary", {})
    return Backbone(state=state, config=config, which=which, checkpoint=ckpt, step=int(parts[0]["step"]),
                    world_size=len(parts), summary=summary, command=parts[0].get("command"),
                    left_out=_summarise_left_out(left, frozen))
