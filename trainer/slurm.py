"""Submitting mimscale pretraining to Slurm: one job, a chain of array tasks, or a sweep
(scripts/slurm/submit.py is the command line; its `--help` lists the options).

It fills the #SBATCH lines and settings of scripts/slurm/pretrain.sbatch, checks the config (and every
sweep point) as launch.py would, keeps the exact script in <run>/slurm/submit-<time>.sbatch and
submits that file. Arguments it does not know (overrides, --ds_config, --stop-after) go to launch.py.

A chain of K is one array, --array=0-(K-1)%1: the tasks run one after another in the same run
directory, each resuming from the newest complete checkpoint, each handing over when its time is up
(USR1 ahead of the limit, or checkpoint.before_time_limit_s); the last one requeues itself until the
schedule is complete. A task whose predecessor failed does not start (and cancels the rest).

A sweep file is a grid or a list of overrides; each point is one array task, in its own run directory
named after its overrides, listed in <sweep>/sweep.json:

    grid:                                  # every combination (here 4 points)
      optim.lr: [1.0e-4, 3.0e-4]
      model.arch: [vit_small, vit_base]
    points:                                # or: one mapping per point
      - {optim.lr: 1.0e-4, model.arch: vit_small}

Why sbatch files and not submitit (DINOv2's launcher): submitit pickles a Python callable and runs it
in its own job script, so the user cannot read, rerun or edit the command that trains; and its
pre-emption handling checkpoints from rank 0 only, where ours needs every rank to agree and save
together. Ours is a bash file anyone can `sbatch` by hand.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import cli
from .config import ConfigError, load_config
from .ds_config import build_ds_config

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "scripts" / "slurm" / "pretrain.sbatch"
SBATCH_START = "# submit.py replaces the lines from here to"
SBATCH_END = "# end of #SBATCH"
SETTINGS_START = "# ---- settings"
SETTINGS_END = "# ---- end of settings ----"


class SubmitError(ValueError):
    """Bad submission arguments or sweep file; nothing was submitted."""


@dataclass
class Submitted:
    """What `submit` did: the script (written and submitted, or only shown under --dry-run) and what
    the command line reports."""

    script: str
    path: Path
    command: list[str]
    job: str | None = None  # None: a dry run
    report: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """submit.py's options, and the rest: launch.py's arguments."""
    p = argparse.ArgumentParser(prog="submit.py", description="Submit mimscale pretraining to Slurm: one job, a "
                                "chain of array tasks, or a sweep (trainer/slurm.py).",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Unknown arguments (key.sub=value overrides, --ds_config ...) go to launch.py.")
    p.add_argument("--config", help="experiment YAML (default: configs/defaults.yaml)")
    p.add_argument("--name", help="experiment name: the job name and runs/<name> (default: the config's file name)")
    p.add_argument("--runs-dir", default="runs", help="where run directories go (default: runs)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; one rank each (0: a CPU cluster)")
    p.add_argument("--tasks-per-node", type=int, help="ranks per node (default: --gpus-per-node)")
    p.add_argument("--cpus-per-task", type=int, default=10, help="CPUs per rank: data.num_workers + 1 or more")
    p.add_argument("--time", default="4:00:00", help="each job's time limit, in Slurm's format")
    p.add_argument("--chain", type=int, default=1, metavar="K", help="K array tasks that continue one run")
    p.add_argument("--sweep", help="YAML file: a grid or a list of overrides, one array task per point")
    p.add_argument("--parallel", type=int, help="sweep points running at once (--array=...%%P)")
    p.add_argument("--signal-margin", type=int, default=600, metavar="S",
                   help="USR1 this many seconds before the limit (#SBATCH --signal=B:USR1@S; 0: none)")
    p.add_argument("--launcher", choices=["srun", "deepspeed"], default="srun",
                   help="srun: one task per rank on any number of nodes; deepspeed: its launcher, one node")
    p.add_argument("--max-crash-requeues", type=int, default=3, help="requeues after a crash, per task")
    for flag in ("partition", "account", "qos", "constraint", "exclude"):
        p.add_argument(f"--{flag}", help=f"#SBATCH --{flag}")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="another #SBATCH line, e.g. --sbatch=--mail-type=END (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command; submit nothing")
    return p.parse_known_args(argv)


def sweep_points(path: str) -> list[dict]:
    """A sweep file -> one {key: value} mapping per point."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SubmitError(f"--sweep {path}: cannot read it: {e}") from None
    if not isinstance(spec, dict) or not spec:
        raise SubmitError(f"--sweep {path}: expected `grid:` (key: [values]) or `points:` (a list of mappings)")
    if set(spec) - {"grid", "points"}:  # a bare mapping of lists is a grid
        spec = {"grid": spec}
    points = []
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise SubmitError(f"--sweep {path}: grid: each key needs a non-empty list of values")
    if grid:
        points += [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    listed = spec.get("points") or []
    if not isinstance(listed, list) or any(not isinstance(p, dict) for p in listed):
        raise SubmitError(f"--sweep {path}: points: expected a list of key: value mappings")
    points += listed
    if not points:
        raise SubmitError(f"--sweep {path}: no points")
    return points


def minutes(limit: str) -> float:
    """Slurm's --time (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in minutes."""
    if "-" in limit:
        days, rest = limit.split("-", 1)
        h, m, sec = ([int(p) for p in rest.split(":")] + [0, 0])[:3]
        return int(days) * 1440 + h * 60 + m + sec / 60
    parts = [int(p) for p in limit.split(":")]
    h, m, sec = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return h * 60 + m + sec / 60


def override(key: str, value) -> str:
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    return f"{key}={text.removesuffix(chr(10) + '...').strip()}"


def point_name(overrides: list[str]) -> str:
    return ",".join(re.sub(r"[^A-Za-z0-9._=+-]+", "_", o) for o in overrides)[:200]


def check_config(launch_args: list[str], world_size: int, what: str) -> argparse.Namespace:
    """What launch.py checks before starting, so a bad config fails here and not in the queue.
    -> launch.py's parsed arguments."""
    parsed = cli.parse_args(launch_args)
    try:
        build_ds_config(parsed.ds_config, load_config(parsed.config, parsed.overrides), world_size)
    except ConfigError as e:
        raise SubmitError(f"{what}: config error: {e}") from None
    return parsed


def sbatch_lines(args, name: str, output: str, array: str | None) -> list[str]:
    tasks = args.tasks_per_node
    lines = [f"--job-name={name}", f"--nodes={args.nodes}"]
    if args.launcher == "deepspeed":  # one task that starts a process per GPU
        lines += ["--ntasks-per-node=1", f"--cpus-per-task={args.cpus_per_task * tasks}"]
        lines += [f"--gpus-per-node={args.gpus_per_node}"] if args.gpus_per_node else []
    else:
        lines += [f"--ntasks-per-node={tasks}", f"--cpus-per-task={args.cpus_per_task}"]
        lines += ["--gpus-per-task=1"] if args.gpus_per_node else []
    lines += [f"--time={args.time}"]
    lines += [f"--signal=B:USR1@{args.signal_margin}"] if args.signal_margin else []
    lines += ["--requeue", "--open-mode=append", f"--output={output}"]
    lines += [f"--array={array}"] if array else []
    lines += [f"--{flag}={getattr(args, flag)}" for flag in ("partition", "account", "qos", "constraint", "exclude")
              if getattr(args, flag)]
    return lines + args.sbatch


def render(args, name: str, run_dir: str, launch_args: list[str], output: str, array: str | None,
           sweep: list[tuple[list[str], str]] | None = None) -> str:
    """pretrain.sbatch with its #SBATCH block and settings written in."""
    text = TEMPLATE.read_text()
    head, rest = text.split(SBATCH_START, 1)
    _, body = rest.split(SBATCH_END, 1)
    sbatch = "\n".join(f"#SBATCH {line}" for line in sbatch_lines(args, name, output, array))
    before, rest = body.split(SETTINGS_START, 1)
    _, after = rest.split(SETTINGS_END, 1)
    q = shlex.quote
    settings = [f"{SETTINGS_START} (written by scripts/slurm/submit.py on {time.strftime('%Y-%m-%d %H:%M:%S')}) ----"]
    if sweep is None:
        settings += [f"RUN_DIR={q(run_dir)}", f"ARGS=({' '.join(map(q, launch_args))})"]
    else:
        settings += ["case ${SLURM_ARRAY_TASK_ID:?a sweep runs as an array} in   # sweep point -> run, overrides"]
        settings += [f"    {i}) RUN_DIR={q(d)}; ARGS=({' '.join(map(q, launch_args + o))}) ;;"
                     for i, (o, d) in enumerate(sweep)]
        settings += ["esac"]
    settings += [f"CHAIN_LENGTH={args.chain}", f"MAX_CRASH_REQUEUES={args.max_crash_requeues}",
                 f"LAUNCHER={args.launcher}", f"RANKS_PER_NODE={args.tasks_per_node}", f"PYTHON={q(sys.executable)}",
                 f"LAUNCH={q(str(ROOT / 'launch.py'))}", SETTINGS_END]
    return (f"{head}# #SBATCH lines written by scripts/slurm/submit.py:\n{sbatch}\n{SBATCH_END}"
            f"{before}{chr(10).join(settings)}{after}")


def submit(args: argparse.Namespace, launch_args: list[str]) -> Submitted:
    """Check `args` (parse_args's) and every config they name as launch.py would, render the script,
    and, unless `args.dry_run`, write it into <run>/slurm/ and submit it; raises SubmitError."""
    if args.config:
        launch_args = ["--config", args.config, *launch_args]
    if args.tasks_per_node is None:
        args.tasks_per_node = args.gpus_per_node
    tasks = args.tasks_per_node
    for flag, low in (("nodes", 1), ("chain", 1), ("cpus_per_task", 1), ("gpus_per_node", 0),
                      ("max_crash_requeues", 0), ("signal_margin", 0)):
        if getattr(args, flag) < low:
            raise SubmitError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least {low}")
    if tasks < 1:
        raise SubmitError("--tasks-per-node: needed (at least 1) when --gpus-per-node is 0")
    if args.launcher == "deepspeed" and args.nodes != 1:
        raise SubmitError("--launcher deepspeed runs on one node; use srun (the default) for --nodes > 1")
    if args.sweep and args.chain > 1:
        raise SubmitError("--sweep with --chain: each sweep point already requeues itself at its time limit "
                          "until its schedule is done; submit a chain per point if you need a fixed number of jobs")
    if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}|\d+-\d+", args.time):
        raise SubmitError(f"--time {args.time}: Slurm's formats are M, M:S, H:M:S, D-H, D-H:M or D-H:M:S")
    if args.signal_margin and args.signal_margin >= minutes(args.time) * 60:
        raise SubmitError(f"--signal-margin {args.signal_margin}: the USR1 would come before the job's "
                          f"--time {args.time} has even started; make it shorter than the limit (0: no signal)")
    name = args.name or Path(args.sweep or args.config or "default").stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise SubmitError(f"--name {name!r}: letters, digits, '.', '_' and '-' only (it names a directory)")
    world = args.nodes * tasks
    top = Path(args.runs_dir) / name
    parsed = cli.parse_args(launch_args)
    for flag in ("resume", "stop_at"):  # every requeue and chained task would repeat them
        if getattr(parsed, flag) is not None:
            raise SubmitError(f"--{flag.replace('_', '-')}: not for a Slurm job, whose requeues and chained tasks "
                              "rerun the same command (they resume from the newest checkpoint by themselves; "
                              "--stop-after N bounds each job)")

    sweep = None
    if args.sweep:
        sweep = []
        for i, point in enumerate(sweep_points(args.sweep)):
            overrides = [override(k, v) for k, v in point.items()]
            check_config(launch_args + overrides, world, f"sweep point {i} ({' '.join(overrides)})")
            sweep.append((overrides, str(top / point_name(overrides))))
        if len({d for _, d in sweep}) < len(sweep):
            raise SubmitError(f"--sweep {args.sweep}: two points have the same overrides")
        array = f"0-{len(sweep) - 1}" + (f"%{args.parallel}" if args.parallel else "")
    else:
        check_config(launch_args, world, "launch.py arguments")
        array = f"0-{args.chain - 1}%1" if args.chain > 1 else None
    output = str(top / "logs" / ("slurm-%A_%a.out" if array else "slurm-%j.out"))
    script = render(args, name, str(top), launch_args, output, array, sweep)
    path = top / "slurm" / f"submit-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    command = ["sbatch", "--parsable", str(path)]
    if args.dry_run:
        return Submitted(script, path, command, report=[f"# would write {path} and run: {shlex.join(command)}"])

    (top / "logs").mkdir(parents=True, exist_ok=True)  # Slurm does not create the log's directory
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    if sweep is not None:
        index = [{"index": i, "overrides": o, "run_dir": d} for i, (o, d) in enumerate(sweep)]
        (top / "sweep.json").write_text(json.dumps(index, indent=1) + "\n")
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as e:
        raise SubmitError(f"cannot run sbatch ({e}); the script is {path}") from None
    if done.returncode != 0:
        raise SubmitError(f"sbatch refused {path}: {done.stderr.strip()}")
    job = done.stdout.strip().split(";")[0]
    what = (f"sweep of {len(sweep)} points" if sweep else f"chain of {args.chain} tasks" if args.chain > 1
            else "job")
    report = [f"submitted {what}: job {job}, {world} rank(s) each ({args.nodes} node(s) x {tasks})",
              f"  script: {path}", f"  runs:   {top}" + (f"  (index: {top / 'sweep.json'})" if sweep else ""),
              f"  logs:   {output.replace('%A', job).replace('%j', job)} and <run>/logs/rank<N>.log"]
    report += [f"  [{i}] {' '.join(o)} -> {d}" for i, (o, d) in enumerate(sweep or [])]
    return Submitted(script, path, command, job, report)
