"""Every tiny recipe at full length on the embedded digits, with what each number is compared to.

    python scripts/bench_quality.py                       # all six; ~30-45 min on 2 CPU cores
    python scripts/bench_quality.py --only ibot dvae beit --seed 1

Each recipe is `python launch.py --config configs/<its>.yaml` as the docs run it (the frozen CLIP is
the tiny one of models/teachers.py; BEiT's tokenizer is the dVAE recipe's own, exported). For every
backbone: the run's kNN of its evaluation feature against random init and raw pixels, and a linear
probe (scripts/evaluate.py linear); for the tokenizer its PSNR against the untrained network and
each image's mean colour; for iTPN its held-out pixel loss against the untrained network and zeros.
Writes bench/results/quality_cpu.json (device, versions, command, every figure); CI asserts
learning at shorter lengths, the docs quote this file.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPES = {  # name: (config, overrides, is a backbone)
    "ibot": ("defaults", [], True),
    "ibot_clip": ("ibot_clip_vit_tiny", ["teacher.clip.weights={clip}"], True),
    "maskalign": ("maskalign_vit_tiny", ["teacher.clip.weights={clip}"], True),
    "dvae": ("dvae_tiny", [], False),
    "beit": ("beit_vit_tiny", ["beit.tokenizer={tokenizer}"], True),
    "itpn": ("itpn_hivit_tiny", [], True),
}
KEYS = ("knn", "knn_random_init", "knn_raw_pixels", "psnr", "psnr_random_init", "psnr_mean_colour", "perplexity",
        "usage", "heldout_pixel", "heldout_pixel_random_init", "heldout_pixel_zero")


def run(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench_quality: {shlex.join(args)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return p


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="shorter than the recipes (a smoke test; the JSON says so)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality_cpu.json"))
    args = ap.parse_args(argv)
    import torch

    from models.teachers import save_clip, tiny_clip

    results = {}
    with tempfile.TemporaryDirectory(prefix="quality_") as tmp:
        files = {"clip": str(save_clip(tiny_clip(), Path(tmp) / "clip.safetensors")),
                 "tokenizer": str(Path(tmp) / "dvae" / "encoder.safetensors")}
        order = [n for n in RECIPES if n in args.only]
        if "beit" in order and "dvae" not in order:
            order.insert(order.index("beit"), "dvae")  # BEiT needs the tokenizer recipe's encoder
        for name in order:
            config, overrides, backbone = RECIPES[name]
            run_dir = Path(tmp) / name
            cmd = ["launch.py", "--config", f"configs/{config}.yaml", f"run.output_dir={run_dir}",
                   f"run.seed={args.seed}", "log.pictures=false", *(o.format(**files) for o in overrides)]
            if args.steps:
                cmd += [f"schedule.steps={args.steps}", "eval.knn_every_steps=0", "optim.warmup_steps=0"]
            t0 = time.perf_counter()
            run(*cmd)
            seconds = time.perf_counter() - t0
            rows = records(run_dir)
            final = {k: v for r in rows for k, v in r.items() if k in KEYS}
            losses = [r for r in rows if "loss" in r]
            result = {"command": shlex.join(["python", *cmd]).replace(tmp, "<tmp>"), "seconds": round(seconds, 1),
                      "steps": losses[-1]["step"], "first_loss": losses[0]["loss"], "last_loss": losses[-1]["loss"],
                      **final}
            if name == "dvae":
                run("scripts/export_tokenizer.py", str(run_dir), files["tokenizer"])
            if backbone:
                run("scripts/evaluate.py", "linear", str(run_dir))
                probe = [r for r in records(run_dir) if r.get("eval") == "linear"][-1]
                result.update(linear_top1=probe["linear_top1"], linear_features=probe["features"])
            results[name] = result
            print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in result.items() if k != "command"), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "every tiny recipe at full length on the embedded digits (held-out split)",
        "seed": args.seed, "steps": args.steps or "each recipe's own", "results": results,
        "device": f"CPU: {platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "command": shlex.join(["python", "scripts/bench_quality.py", *(argv if argv is not None else sys.argv[1:])])},
        indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
