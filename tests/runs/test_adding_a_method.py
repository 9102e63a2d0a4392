"""docs/adding-a-method.md, proven: a method written in this file alone (a config section, a
validation error and a logged value of its own) trains 3 steps on the digits through launch.main,
and no file of the package names it.

The toy objective: from the masked view, predict each masked patch's mean colour (as normalised
pixels), scored by the squared error on the masked patches."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import main_in_process

from trainer.config import ConfigError, describe, load_config
from trainer.config.fields import opt, require
from trainer.methods import METHODS, build_student, register
from trainer.methods.base import Method


@dataclass
class MeanColourConfig:
    weight: float = opt(1.0, "Weight of the colour loss.")
    head_hidden: int = opt(0, "Hidden width of the colour head; 0: a linear head.")

    def validate(self) -> None:  # keys relative to the section, as every section's
        require(self.weight > 0, "weight", f"{self.weight} must be > 0")


class MeanColour(Method):
    config_section = ("mean_colour", MeanColourConfig)
    knn_pool, knn_features = "avg", "student mean patch token"

    def __init__(self, student: nn.Module, weight: float, hidden: int, patch: int):
        super().__init__()
        student.global_pool = "avg"
        width = student.embed_dim
        head = nn.Linear(width, 3) if not hidden else nn.Sequential(nn.Linear(width, hidden), nn.GELU(),
                                                                    nn.Linear(hidden, 3))
        self.student = nn.ModuleDict({"backbone": student, "head": head})
        self.loss_weights = {"colour": weight}
        self.patch = patch

    @classmethod
    def validate(cls, cfg) -> None:  # checks across sections: full dotted keys
        require(cfg.data.mask.prob > 0, "data.mask.prob", "mean_colour predicts masked patches: some views must be "
                                                         "masked")

    @classmethod
    def from_config(cls, cfg) -> MeanColour:
        c = cfg.mean_colour
        return cls(build_student(cfg), c.weight, c.head_hidden, cfg.model.patch_size)

    def eval_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.student.backbone(images)

    def forward(self, batch: dict[str, torch.Tensor], values: dict[str, float]) -> dict[str, torch.Tensor]:
        images, masks = batch["global_crops"][0], batch["masks"][0]  # [B, 3, H, W], [B, h, w]
        out = self.student.backbone.forward_features(images, masks)
        pred = self.student.head(out["patch"])  # [B, N, 3]
        target = F.avg_pool2d(images.float(), self.patch).flatten(2).transpose(1, 2)  # [B, N, 3]
        weight = masks.flatten(1).float()
        err = (pred.float() - target).pow(2).mean(-1)
        colour = (err * weight).sum() / weight.sum().clamp(min=1)
        # beside the loss terms (in loss_weights), anything else it returns is logged as a metric
        return {"colour": colour, "masked_fraction": weight.mean().detach()}


@pytest.fixture
def toy_method():
    register("mean_colour")(MeanColour)
    try:
        yield MeanColour
    finally:
        METHODS.pop("mean_colour")


def test_a_method_in_one_file_trains_validates_and_logs(toy_method, tmp_path):
    cfg = load_config(None, ["method=mean_colour", "mean_colour.head_hidden=16"])
    assert cfg.mean_colour.head_hidden == 16 and cfg.ibot.out_dim  # its section beside the others
    assert any(key == "mean_colour.weight" for key, _, _ in describe())  # --help-config lists it
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method=mean_colour", "mean_colour.weight=-1"])
    assert e.value.key == "mean_colour.weight" and "must be > 0" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method=mean_colour", "data.mask.prob=0"])
    assert e.value.key == "data.mask.prob" and "some views must be masked" in str(e.value)
    with pytest.raises(ConfigError, match="mean_colour.wieght: unknown key; did you mean mean_colour.weight"):
        load_config(None, ["method=mean_colour", "mean_colour.wieght=1"])

    run = tmp_path / "run"
    code = main_in_process("method=mean_colour", f"run.output_dir={run}", "schedule.steps=3", "log.every_steps=1",
                           "checkpoint.every_steps=3", "eval.knn_at_end=false", "eval.knn_every_steps=0",
                           "log.pictures=false", "log.tensorboard=false", "data.num_workers=0")
    assert code == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss_colour" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(0 < r["loss_colour"] < 100 and 0 < r["masked_fraction"] <= 1 for r in steps), steps
    assert (run / "checkpoints" / "latest").is_file()
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["mean_colour"] == {"weight": 1.0, "head_hidden": 0}


def test_the_package_never_names_a_method_outside_its_module():
    """What the project's method-branch count finds (it must find none), checked with the package's
    own files: a comparison of `method` against a registered name, or a table indexed by `method`."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    names = "|".join(sorted(METHODS, key=len, reverse=True))
    q = r"[\"']"
    compare = re.compile(rf"method{q}?\]?\)?\s*(==|!=|not in|in)\s*[\(\[{{]?\s*{q}({names}){q}"
                         rf"|{q}({names}){q}\s*(==|!=)\s*[\w.\[\]\"']*method")
    table = re.compile(r"\}\s*\[\s*[\w.]*method\s*\]|\[\s*[\w.]*\[\s*[\"']method[\"']\s*\]\s*\]")
    own = re.compile(rf"^trainer/methods/({names})\.py$")
    hits = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("tests/", ".venv/", "runs/")) or own.match(rel):
            continue
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if compare.search(line) or table.search(line):
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_shared_code_never_reads_a_methods_config_section():
    """What method_branches.py cannot see: shared code reading a method's own section (`cfg.itpn.x`,
    `config["beit"]`) knows that method as surely as a comparison of its name. Only the modules of
    the methods that own a section read it (ibot_clip shares iBOT's)."""
    import re
    from pathlib import Path

    from trainer.methods import config_sections

    root = Path(__file__).resolve().parents[2]
    sections = config_sections()
    owners = {key: {f"trainer/methods/{n}.py" for n, cls in METHODS.items()
                    if cls.config_section and cls.config_section[0] == key} for key in sections}
    names = "|".join(sorted(sections, key=len, reverse=True))
    packages = {"export", "models", "trainer", "data", "evaluation", "bench", "methods", "scripts"}
    attribute = re.compile(rf"(\w+)\.({names})\.\w")
    item = re.compile(rf"(?:\[|get\()\s*[\"']({names})[\"']")
    hits = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("tests/", ".venv/", "runs/")):
            continue
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            read = [m.group(2) for m in attribute.finditer(line) if m.group(1) not in packages]
            read += [m.group(1) for m in item.finditer(line)]
            hits += [f"{rel}:{i}: {line.strip()}" for key in read if rel not in owners[key]]
    assert not hits, "\n".join(hits)
