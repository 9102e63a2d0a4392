"""Writes tests/runs/golden/old_run/: what a user had before issue 29's redesign (main at 8fe8d9d), so
tests/runs/test_old_files.py can show they still load. Run once with the OLD code, from its checkout:

    git worktree add /tmp/old 8fe8d9d && cd /tmp/old
    M=/path/to/mimscale; $M/.venv/bin/python $M/tests/runs/golden/make_old_run.py $M/tests/runs/golden/old_run

It trains (one CPU process) an iBOT run of 4 steps and the same run stopped at step 2 (whose directory,
with its step-2 checkpoint, is kept), and a 2-step iTPN run exported to its own file (bf16), whose
features on a fixed input the old code's loader gives are recorded beside it.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

OUT = Path(sys.argv[1]).resolve()
IBOT = ["--config", "configs/ibot_vit_tiny.yaml", "model.arch=vit_test", "data.batch_size=8", "data.num_workers=0",
        "ibot.out_dim=64", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16", "schedule.steps=4",
        "checkpoint.every_steps=2", "log.every_steps=1", "eval.knn_at_end=false", "eval.knn_every_steps=0",
        "log.pictures=false", "log.tensorboard=false", "run.seed=0"]
ITPN = ["--config", "configs/itpn_hivit_tiny.yaml", "model.arch=hivit_test", "data.batch_size=8",
        "data.num_workers=0", "schedule.steps=2", "log.every_steps=1", "eval.knn_at_end=false",
        "eval.knn_every_steps=0", "log.pictures=false", "log.tensorboard=false", "run.seed=0"]


def run(*args: str) -> None:
    subprocess.run([sys.executable, *args], check=True)


def losses(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k == "step" or k.startswith("loss")} for r in rows if "loss" in r]


if OUT.exists():
    shutil.rmtree(OUT)
tmp = OUT.parent / (OUT.name + ".tmp")
shutil.rmtree(tmp, ignore_errors=True)
run("launch.py", *IBOT, f"run.output_dir={tmp}/straight")
run("launch.py", *IBOT, f"run.output_dir={OUT}/ibot", "--stop-at", "2")
shutil.rmtree(OUT / "ibot" / "logs")
run("launch.py", *ITPN, f"run.output_dir={tmp}/itpn")
run("scripts/convert_to_hf.py", f"{tmp}/itpn", f"{OUT}/itpn_export", "--dtype", "bf16")

from export.itpn import load_itpn  # noqa: E402  (the old code's loader)

model, _ = load_itpn(OUT / "itpn_export" / "itpn.safetensors")
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    f = model.float().forward_features(x)
record = {"written_by": "main at 8fe8d9d (before issue 29's redesign)", "ibot_args": IBOT, "itpn_args": ITPN,
          "ibot_losses": losses(tmp / "straight"),
          "itpn_features": {"patch": f["patch"].flatten()[:16].tolist(),
                            "pyramid_means": [p.mean().item() for p in f["pyramid"]]}}
(OUT / "record.json").write_text(json.dumps(record, indent=1) + "\n")
shutil.rmtree(tmp)
print(f"wrote {OUT}")
