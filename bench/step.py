"""Where a training step's time goes (`time_steps`), and what makes the host wait for the GPU in
each optimizer step (`count_syncs`); scripts/bench_step.py is the command line.

`time_steps` runs the real training loop (launch.py, a throw-away run directory, no evaluation, no
checkpoint but the last) with one metrics record per step, drops the first `warmup` steps, and
reports the medians: data wait, forward, backward, optimizer step and EMA update (GPU-synchronised at
each boundary, log.sync_timing), images/s, peak memory, model FLOPs per step (trainer/plan/flops.py),
achieved TFLOP/s and, on a known GPU, model FLOP utilisation. Beside them, the baselines of the
same run: each phase as a share of the step, the FLOP/s as a share of the device's bf16 peak, and
the measured peak memory against the planner's estimate (trainer/plan/memory.py).

`count_syncs` counts reads of device values, data-dependent shapes and blocking copies
(trainer/syncs.py) by the line that does them; it works on the CPU too, counting what the same
code does on a GPU.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from . import ROOT

PHASES = ("data", "forward", "backward", "optimizer", "ema")
QUIET = ["eval.knn_at_end=false", "eval.knn_every_steps=0", "log.pictures=false", "log.tensorboard=false"]


class BenchError(RuntimeError):
    """The measured run failed; the message says how."""


def count_syncs(run_args: list[str], steps: tuple[int, int] = (2, 4)) -> dict:
    """Host syncs per optimizer step of the run `run_args` (launch.py's arguments), outside logging,
    evaluation and checkpoint steps: two runs of `steps` optimizer steps with one log line and one save
    at the end, differenced, so set-up and the last step's logging cancel. -> {"ours", "deepspeed",
    "sites"}: per-step counts in mimscale's code and in DeepSpeed's (its step: the read that decides
    whether to skip it; its grad-norm sentinels are made on the host, trainer.engine.sentinel_on_host),
    and per site. The optimizer is DeepSpeed's torch AdamW as on a GPU (fused: its step counters stay on
    the device)."""
    from trainer.cli import parse_args, prepare
    from trainer.loop import train
    from trainer.syncs import SyncCounter

    counts = []
    with tempfile.TemporaryDirectory(prefix="syncs_") as tmp:
        ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
        ds["optimizer"] = {"type": "AdamW", "params": {"torch_adam": True, "fused": True}}
        (Path(tmp) / "ds.json").write_text(json.dumps(ds))
        for n in steps:
            settings = [f"run.output_dir={tmp}/run{n}", f"schedule.steps={n}", *QUIET, f"log.every_steps={n}",
                        f"checkpoint.every_steps={n + 1}"]
            saved = dict(os.environ)  # the run exports RANK, WORLD_SIZE, MASTER_PORT... for its process group
            try:
                cfg, env, ds_config = prepare(parse_args([*run_args, "--ds_config", str(Path(tmp) / "ds.json"),
                                                          *settings]))
                counter = SyncCounter()
                with counter:
                    train(cfg, ds_config, env)
            finally:
                os.environ.clear()
                os.environ.update(saved)
            counts.append(counter.by_site)
    diff = counts[1].copy()
    diff.subtract(counts[0])
    span = steps[1] - steps[0]
    sites = {f"{what} at {site}": n / span for (what, site), n in diff.most_common() if n}
    deepspeed = sum(n for (what, site), n in diff.items() if "(deepspeed/" in site or site.startswith("deepspeed/"))
    return {"ours": (sum(diff.values()) - deepspeed) / span, "deepspeed": deepspeed / span, "sites": sites}


def ranks_of(launcher: str) -> int:
    """The number of ranks a launcher command line starts (1 for none)."""
    parts = shlex.split(launcher)
    for flag in ("--num_gpus", "--nproc_per_node", "--nproc-per-node", "-n", "--ntasks"):
        if flag in parts:
            return int(parts[parts.index(flag) + 1])
    return 1


def time_steps(config: str, steps: int, warmup: int, ds_config: str = "zero3.json", launcher: str = "",
               overrides: list[str] = ()) -> dict:
    """`steps` optimizer steps of `config` under `launcher` ("" for one process) -> {"summary": medians
    after `warmup` steps with each phase's share and the planner's memory estimate beside the measured
    peak, "records": the per-step records, "ranks", "run_command"}."""
    if steps <= warmup:
        raise BenchError("--steps must exceed --warmup")
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        run = Path(tmp) / "run"
        cmd = [*(shlex.split(launcher) or [sys.executable]), str(ROOT / "launch.py"), "--config", config,
               "--ds_config", ds_config, f"run.output_dir={run}", f"schedule.steps={steps}", "log.every_steps=1",
               *QUIET, f"checkpoint.every_steps={steps + 1}", *overrides]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"the run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "step_time_s" in r and r["step"] > warmup]
    first = next((r["step_time_s"] for r in records if "step_time_s" in r), None)
    compiled = next(({k: v for k, v in r.items() if k.startswith("compile_")} for r in records
                     if "compile_graphs" in r), None)
    if not timed:
        raise BenchError("no step records after the warm-up")

    def median(key: str) -> float | None:
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None

    summary = {k: median(k) for k in ("step_time_s", "images_per_s", "model_tflops_per_s", "mfu", "max_memory_gib",
                                      "max_rss_gib", *(f"time_{ph}_s" for ph in PHASES))}
    summary["model_flops_per_step"] = timed[-1].get("model_flops_per_step")
    summary["phase_share"] = {ph: summary[f"time_{ph}_s"] / summary["step_time_s"] for ph in PHASES
                              if summary.get(f"time_{ph}_s") is not None}

    from trainer.config import files_unchecked, load_config
    from trainer.ds_config import build_ds_config
    from trainer.plan.memory import GiB, plan_this_run

    with files_unchecked():
        cfg = load_config(config, list(overrides))
    world = ranks_of(launcher) if launcher else int(os.environ.get("WORLD_SIZE", 1))
    summary["planned_memory_gib"] = plan_this_run(cfg, build_ds_config(ds_config, cfg, world), world).total / GiB
    summary["first_step_s"] = first  # what compiling adds (run.compile), and the first step's own costs
    if compiled:
        summary.update(compiled)
    return {"config": config, "steps": steps, "warmup": warmup, "ranks": world, "summary": summary,
            "records": timed, "run_command": shlex.join(cmd)}


def compare_compile(config: str, steps: int, warmup: int, mode: str, ds_config: str = "zero3.json", launcher: str = "",
                    overrides: list[str] = ()) -> dict:
    """The same steps eager (run.compile=off) and compiled (`mode`), one after the other in this call ->
    {"eager", "compiled": time_steps results, "speedup": eager / compiled median step time, "compile_s": the
    compiled first step's extra time over the eager first step (the compile, once)}."""
    eager = time_steps(config, steps, warmup, ds_config, launcher, [*overrides, "run.compile=off"])
    compiled = time_steps(config, steps, warmup, ds_config, launcher, [*overrides, f"run.compile={mode}"])
    e, c = eager["summary"], compiled["summary"]
    return {"config": config, "mode": mode, "eager": eager, "compiled": compiled,
            "speedup": e["step_time_s"] / c["step_time_s"], "compile_s": c["first_step_s"] - e["first_step_s"]}


def report_compile(result: dict) -> list[str]:
    """`compare_compile`'s result side by side."""
    e, c = result["eager"]["summary"], result["compiled"]["summary"]
    rows = [("step (median)", "step_time_s", "{:.4f} s"), ("images/s", "images_per_s", "{:.1f}"),
            *((f"{ph}", f"time_{ph}_s", "{:.4f} s") for ph in PHASES),
            ("peak memory", "max_memory_gib" if e.get("max_memory_gib") else "max_rss_gib", "{:.2f} GiB")]
    timed, warmup = result["eager"]["steps"] - result["eager"]["warmup"], result["eager"]["warmup"]
    lines = [f"{result['config']}: eager vs run.compile={result['mode']}, {timed} steps each after {warmup} "
             f"warm-up, {result.get('device', '')}",
             f"  {'':16}{'eager':>14}{'compiled':>14}"]
    for name, key, fmt in rows:
        if e.get(key) is not None and c.get(key) is not None:
            lines.append(f"  {name:16}{fmt.format(e[key]):>14}{fmt.format(c[key]):>14}")
    lines.append(f"  compiled / eager step time {1 / result['speedup']:.3f} (speed-up x{result['speedup']:.2f}); "
                 f"compiling took about {result['compile_s']:.1f} s once (first step {c['first_step_s']:.1f} s against "
                 f"{e['first_step_s']:.1f} s); {c.get('compile_graphs', '?')} graphs, "
                 f"{c.get('compile_graph_breaks', '?')} graph breaks")
    return lines


def report(result: dict) -> list[str]:
    """`time_steps`'s result as the lines scripts/bench_step.py prints."""
    s = result["summary"]
    lines = [f"{result['config']}: {result['steps'] - result['warmup']} steps after {result['warmup']} warm-up, "
             f"{result.get('device', '')}",
             f"  step {s['step_time_s']:.3f} s, {s['images_per_s']:.1f} images/s"]
    lines += [f"  {ph:10} {s[f'time_{ph}_s']:.4f} s  {100 * share:5.1f}% of the step"
              for ph, share in s["phase_share"].items()]
    if s["model_flops_per_step"]:
        line = (f"  model FLOPs per step {s['model_flops_per_step'] / 1e12:.3f} TFLOP, achieved "
                f"{s['model_tflops_per_s']:.3f} TFLOP/s")
        if s.get("mfu") is not None:
            line += f" = {100 * s['mfu']:.1f}% of the device's bf16 peak (MFU)"
        lines.append(line)
    measured, planned = s["max_memory_gib"] or s["max_rss_gib"], s["planned_memory_gib"]
    which = "GPU max allocated" if s["max_memory_gib"] else "process max RSS (CPU: includes torch itself)"
    lines.append(f"  peak memory {measured:.2f} GiB ({which}); the planner's estimate {planned:.2f} GiB "
                 f"(measured / planned {measured / planned:.2f})")
    return lines
