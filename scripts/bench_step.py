"""Where a training step's time goes, for a few steps of one configuration.

    python scripts/bench_step.py --config configs/ibot_vit_tiny.yaml --steps 12
    python scripts/bench_step.py --config configs/ibot_l16_in22k.yaml --steps 20 \
        --launcher "deepspeed --num_gpus 8" data.train_shards=/data/shards/in22k/shard-{000000..000063}.tar

Runs the real training loop (launch.py, a throw-away run directory, no evaluation, no checkpoint
but the last) with one metrics record per step, drops the first `--warmup` steps, and reports the
medians: data wait, forward, backward, optimizer step and EMA update (GPU-synchronised at each
boundary, log.sync_timing), images/s, peak memory, model FLOPs per step (trainer/plan/flops.py),
achieved TFLOP/s and, on a known GPU, model FLOP utilisation. Beside them, the baselines of the
same run: each phase as a share of the step, the FLOP/s as a share of the device's bf16 peak, and
the measured peak memory against the planner's estimate (trainer/plan/memory.py).

`--syncs` counts instead what makes the host wait for the GPU in each optimizer step (reads of
device values, data-dependent shapes, blocking copies; trainer/syncs.py), by the line that does it;
it works on the CPU too, counting what the same code does on a GPU.

The JSON (device, versions, command, every per-step record) goes to --out (default
bench/results/step_<config>_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("data", "forward", "backward", "optimizer", "ema")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def per_step(run_args: list[str], steps: tuple[int, int] = (2, 4)) -> dict:
    """Host syncs per optimizer step of `launch.main(run_args)`, outside logging, evaluation and
    checkpoint steps: two runs of `steps` optimizer steps with one log line and one save at the end,
    differenced, so set-up and the last step's logging cancel. -> {"ours", "deepspeed", "sites"}:
    per-step counts in mimscale's code and in DeepSpeed's (its step: the read that decides whether to
    skip it; its grad-norm sentinels are made on the host, trainer.engine.sentinel_on_host), and per
    site. The optimizer is DeepSpeed's torch AdamW as on a GPU (fused: its step counters stay on the
    device)."""
    import launch
    from trainer.syncs import ROOT, SyncCounter

    counts = []
    with tempfile.TemporaryDirectory(prefix="syncs_") as tmp:
        ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
        ds["optimizer"] = {"type": "AdamW", "params": {"torch_adam": True, "fused": True}}
        (Path(tmp) / "ds.json").write_text(json.dumps(ds))
        for n in steps:
            counter = SyncCounter()
            with counter:
                settings = [f"run.output_dir={tmp}/run{n}", f"schedule.steps={n}", "eval.knn_at_end=false",
                            "eval.knn_every_steps=0", "log.pictures=false", "log.tensorboard=false",
                            f"log.every_steps={n}", f"checkpoint.every_steps={n + 1}"]
                code = launch.main([*run_args, "--ds_config", str(Path(tmp) / "ds.json"), *settings])
            if code != 0:
                raise RuntimeError(f"the counted run failed (exit {code}): {run_args}")
            counts.append(counter.by_site)
    diff = counts[1].copy()
    diff.subtract(counts[0])
    span = steps[1] - steps[0]
    sites = {f"{what} at {site}": n / span for (what, site), n in diff.most_common() if n}
    deepspeed = sum(n for (what, site), n in diff.items() if "(deepspeed/" in site or site.startswith("deepspeed/"))
    return {"ours": (sum(diff.values()) - deepspeed) / span, "deepspeed": deepspeed / span, "sites": sites}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps to run (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians (default 2)")
    p.add_argument("--ds_config", default="zero3.json")
    p.add_argument("--launcher", default="", help='e.g. "deepspeed --num_gpus 8" or "torchrun --nproc_per_node 2" '
                                                  "(default: one process)")
    p.add_argument("--out", help="JSON path (default: bench/results/step_<config>_<device>.json)")
    p.add_argument("--syncs", action="store_true",
                   help="count the host-device synchronisations per optimizer step instead (trainer/syncs.py)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_intermixed_args(argv)
    if args.syncs:  # host-device synchronisations per optimizer step, counted on any device
        result = per_step(["--config", args.config, *args.overrides])
        print(f"{args.config}: host syncs per optimizer step (outside logging steps): {result['ours']:g} in "
              f"mimscale, {result['deepspeed']:g} in DeepSpeed's step")
        for site, n in result["sites"].items():
            print(f"  {n:5g}  {site}")
        if args.out:
            command = shlex.join(["python", "scripts/bench_step.py", *(argv if argv is not None else sys.argv[1:])])
            import torch

            out = {"config": args.config, "overrides": args.overrides, **result, "device": device_name(),
                   "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                "deepspeed": _version("deepspeed"), "triton": _version("triton")},
                   "command": command}
            Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        return 0
    if args.steps <= args.warmup:
        print("bench_step: --steps must exceed --warmup", file=sys.stderr)
        return 2
    import torch

    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        run = Path(tmp) / "run"
        launcher = shlex.split(args.launcher) or [sys.executable]
        cmd = [*launcher, str(ROOT / "launch.py"), "--config", args.config, "--ds_config", args.ds_config,
               f"run.output_dir={run}", f"schedule.steps={args.steps}", "log.every_steps=1", "log.pictures=false",
               "log.tensorboard=false", "eval.knn_at_end=false", "eval.knn_every_steps=0",
               f"checkpoint.every_steps={args.steps + 1}", *args.overrides]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
            print(f"bench_step: the run failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time_s" in r and r["step"] > args.warmup]
    if not steps:
        print("bench_step: no step records after the warm-up", file=sys.stderr)
        return 1

    def median(key: str) -> float | None:
        values = [r[key] for r in steps if r.get(key) is not None]
        return statistics.median(values) if values else None

    summary = {k: median(k) for k in ("step_time_s", "images_per_s", "model_tflops_per_s", "mfu", "max_memory_gib",
                                      "max_rss_gib", *(f"time_{ph}_s" for ph in PHASES))}
    summary["model_flops_per_step"] = steps[-1].get("model_flops_per_step")
    step_time = summary["step_time_s"]
    summary["phase_share"] = {ph: summary[f"time_{ph}_s"] / step_time for ph in PHASES
                              if summary.get(f"time_{ph}_s") is not None}

    from trainer.config import files_unchecked, load_config
    from trainer.ds_config import build_ds_config
    from trainer.plan.memory import GiB, plan_this_run

    with files_unchecked():
        cfg = load_config(args.config, args.overrides)
    world = int(os.environ.get("WORLD_SIZE", 1)) if not args.launcher else _ranks(args.launcher)
    planned = plan_this_run(cfg, build_ds_config(args.ds_config, cfg, world), world).total / GiB
    measured = summary["max_memory_gib"] or summary["max_rss_gib"]
    summary["planned_memory_gib"] = planned
    out = {"config": args.config, "steps": args.steps, "warmup": args.warmup, "ranks": world,
           "device": device_name(), "summary": summary, "records": steps,
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "deepspeed": _version("deepspeed"), "triton": _version("triton")},
           "command": shlex.join(["python", "scripts/bench_step.py", *(argv if argv is not None else sys.argv[1:])]),
           "run_command": shlex.join(cmd)}
    print(f"{args.config}: {args.steps - args.warmup} steps after {args.warmup} warm-up, {out['device']}")
    print(f"  step {step_time:.3f} s, {summary['images_per_s']:.1f} images/s")
    for ph, share in summary["phase_share"].items():
        print(f"  {ph:10} {summary[f'time_{ph}_s']:.4f} s  {100 * share:5.1f}% of the step")
    flops = summary["model_flops_per_step"]
    if flops:
        line = f"  model FLOPs per step {flops / 1e12:.3f} TFLOP, achieved {summary['model_tflops_per_s']:.3f} TFLOP/s"
        if summary.get("mfu") is not None:
            line += f" = {100 * summary['mfu']:.1f}% of the device's bf16 peak (MFU)"
        print(line)
    which = "GPU max allocated" if summary["max_memory_gib"] else "process max RSS (CPU: includes torch itself)"
    print(f"  peak memory {measured:.2f} GiB ({which}); the planner's estimate {planned:.2f} GiB "
          f"(measured / planned {measured / planned:.2f})")
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        f"step_{Path(args.config).stem}_{'gpu' if torch.cuda.is_available() else 'cpu'}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def _ranks(launcher: str) -> int:
    parts = shlex.split(launcher)
    for flag in ("--num_gpus", "--nproc_per_node", "--nproc-per-node", "-n", "--ntasks"):
        if flag in parts:
            return int(parts[parts.index(flag) + 1])
    return 1


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
