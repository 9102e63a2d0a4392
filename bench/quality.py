"""Every tiny recipe at full length on the embedded digits, with what each number is compared to;
scripts/bench_quality.py is the command line.

Each recipe is `python launch.py --config configs/<its>.yaml` as the docs run it (the frozen CLIP is
the tiny one of models/teachers.py; BEiT's tokenizer is the dVAE recipe's own, exported). For every
backbone: the run's kNN of its evaluation feature against random init and raw pixels, and a linear
probe (scripts/evaluate.py linear); for the tokenizer its PSNR against the untrained network and
each image's mean colour; for iTPN its held-out pixel loss against the untrained network and zeros;
for fine-tuning its held-out top-1 from the pretrained run against the same recipe from scratch.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import ROOT


@dataclass(frozen=True)
class Recipe:
    config: str  # configs/<config>.yaml
    overrides: tuple[str, ...] = ()  # with {clip} and {tokenizer} filled in
    backbone: bool = True  # a backbone (kNN and a linear probe), not a tokenizer
    needs: str | None = None  # the recipe whose exported product it uses (BEiT: the dVAE's tokenizer)
    exports: tuple[str, ...] = ()  # after training: a script that writes what `needs` names, and its file
    ci: tuple[str, ...] = ()  # how CI's learning test runs it differently (a shorter schedule)


RECIPES = {
    "ibot": Recipe("defaults"),
    "ibot_clip": Recipe("ibot_clip_vit_tiny", ("teacher.clip.weights={clip}",),
                        ci=("schedule.steps=150",)),  # tests/runs/test_frozen_teacher_runs.py
    "maskalign": Recipe("maskalign_vit_tiny", ("teacher.clip.weights={clip}",)),
    "dvae": Recipe("dvae_tiny", backbone=False, exports=("scripts/export_tokenizer.py", "{tokenizer}")),
    "beit": Recipe("beit_vit_tiny", ("beit.tokenizer={tokenizer}",), needs="dvae"),
    "itpn": Recipe("itpn_hivit_tiny", ci=("schedule.steps=400",)),  # tests/runs/test_itpn_runs.py
    "dinov2": Recipe("dinov2_vit_tiny", ci=("schedule.steps=120",)),  # tests/runs/test_dinov2_runs.py
    # fine-tuning the default's network (configs/finetune_vit_tiny.yaml): from the ibot run's checkpoint
    # and from scratch, with a class-balanced tenth of the labels and with all of them
    "finetune_ibot_10pct": Recipe("finetune_vit_tiny", ("finetune.init={run_ibot}", "finetune.label_fraction=0.1"),
                                  backbone=False, needs="ibot"),
    "finetune_scratch_10pct": Recipe("finetune_vit_tiny", ("finetune.label_fraction=0.1",), backbone=False),
    "finetune_ibot": Recipe("finetune_vit_tiny", ("finetune.init={run_ibot}",), backbone=False, needs="ibot"),
    "finetune_scratch": Recipe("finetune_vit_tiny", (), backbone=False),
    # the same for the other methods, with the head their references use (the mean token through fc_norm);
    # their from-scratch baselines: a plain ViT (MaskAlign, BEiT) and HiViT (iTPN) with that head
    **{f"finetune_{method}{labels}": Recipe("finetune_vit_tiny", (
        f"finetune.init={{run_{method}}}", "finetune.pool=avg", *arch, *fraction), backbone=False, needs=method)
       for method, arch in (("maskalign", ()), ("beit", ()), ("itpn", ("model.arch=hivit_tiny",)))
       for labels, fraction in (("_10pct", ("finetune.label_fraction=0.1",)), ("", ()))},
    **{f"finetune_scratch_{arch}{labels}": Recipe("finetune_vit_tiny", (
        "finetune.pool=avg", f"model.arch={arch}_tiny", *fraction), backbone=False)
       for arch in ("vit", "hivit") for labels, fraction in (("_10pct", ("finetune.label_fraction=0.1",)), ("", ()))},
}
KEYS = ("knn", "knn_student", "knn_random_init", "knn_raw_pixels", "psnr", "psnr_random_init", "psnr_mean_colour",
        "perplexity", "usage", "heldout_pixel", "heldout_pixel_random_init", "heldout_pixel_zero", "top1", "top5",
        "top1_random_init", "best_top1")


class RecipeFailed(RuntimeError):
    """A recipe's run (or its export or probe) failed; the message has its command and its stderr."""


def _run(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise RecipeFailed(f"{shlex.join(args)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return p


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def order(names: list[str]) -> list[str]:
    """`names` in RECIPES' order, each after the recipe it needs (added where missing)."""
    wanted = set(names)
    for name in names:
        while RECIPES[name].needs:
            name = RECIPES[name].needs
            wanted.add(name)
    return [n for n in RECIPES if n in wanted]


def curve(rows: list[dict]) -> list[dict]:
    """Each training record's step, loss terms, in-training kNN and the method's own measures beside
    its loss (BEiT's token accuracy and its blind baselines): what CI's learning tests compare."""
    return [{k: v for k, v in r.items() if k == "step" or k.startswith(("loss", "knn")) or "blind" in k
             or "accuracy" in k} for r in rows if "loss" in r or "knn" in r]


def run_recipes(names: list[str], seed: int = 0, steps: int | None = None, lengths: str = "full",
                progress: Callable[[str, dict], None] = lambda name, result: None) -> dict:
    """Train each recipe of `names` (and what they need) at `seed`, at its own length (`lengths` "ci":
    as CI's learning tests run it) or `steps` (a smoke test) -> {name: {"command", "seconds", "steps",
    "first_loss", "last_loss", "curve", the held-out figures (KEYS), and for backbones "linear_top1"}}."""
    from models.teachers import save_clip, tiny_clip

    results = {}
    with tempfile.TemporaryDirectory(prefix="quality_") as tmp:
        files = {"clip": str(save_clip(tiny_clip(), Path(tmp) / "clip.safetensors")),
                 "tokenizer": str(Path(tmp) / "dvae" / "encoder.safetensors"),
                 **{f"run_{name}": str(Path(tmp) / name) for name in RECIPES}}  # a recipe's run, for another's init
        for name in order(names):
            recipe, run_dir = RECIPES[name], Path(tmp) / name
            cmd = ["launch.py", "--config", f"configs/{recipe.config}.yaml", f"run.output_dir={run_dir}",
                   f"run.seed={seed}", "log.pictures=false", *(o.format(**files) for o in recipe.overrides),
                   *(recipe.ci if lengths == "ci" else ())]
            if steps:
                cmd += [f"schedule.steps={steps}", "eval.knn_every_steps=0", "optim.warmup_steps=0"]
            t0 = time.perf_counter()
            _run(*cmd)
            seconds = time.perf_counter() - t0
            rows = _records(run_dir)
            losses = [r for r in rows if "loss" in r]
            result = {"command": shlex.join(["python", *cmd]).replace(tmp, "<tmp>"), "seconds": round(seconds, 1),
                      "steps": losses[-1]["step"], "first_loss": losses[0]["loss"], "last_loss": losses[-1]["loss"],
                      **{k: v for r in rows for k, v in r.items() if k in KEYS}, "curve": curve(rows)}
            if recipe.exports:
                script, product = recipe.exports
                _run(script, str(run_dir), product.format(**files))
            if recipe.backbone:
                _run("scripts/evaluate.py", "linear", str(run_dir))
                probe = [r for r in _records(run_dir) if r.get("eval") == "linear"][-1]
                result.update(linear_top1=probe["linear_top1"], linear_features=probe["features"])
            results[name] = result
            progress(name, result)
    return results
