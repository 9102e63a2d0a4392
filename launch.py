"""mimscale: the one entry point.

    python launch.py                                   # the embedded default (CPU, digits)
    python launch.py --config configs/x.yaml key.sub=value ...
    deepspeed --num_gpus 8 launch.py --config configs/x.yaml --ds_config zero3.json
    torchrun / srun / accelerate launch launch.py ...   # rank and master come from the environment

Everything is checked (YAML, overrides, the DeepSpeed JSON against the YAML, the output
directory, the shard list against ranks x workers) before any process group starts; a problem
is reported as one line naming the file, the key and what is allowed, and the exit code is 2.

Exit codes: 0 done, or stopped after saving (--stop-at, --stop-after, SIGTERM, SIGUSR1, the Slurm
job's time limit; <run>/status.json says which, and the same command resumes); 2 bad input
(config, paths, teacher weights, an untrusted file), nothing trained; 3 the run stopped on a
fault (a failed save, too many skipped steps, too many unreadable samples) with its newest
complete checkpoint intact. Every rank logs to <run>/logs/rank<N>.log, tracebacks
included; the terminal gets one line per error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from trainer import stop_signals

if __name__ == "__main__":  # (not when imported, e.g. by a test: its process keeps its own handlers)
    stop_signals.catch()  # before the 2 s of importing torch: a pre-emption signal then must not kill a rank

from trainer.config import Config, ConfigError, describe, dump_yaml, load_config  # noqa: E402
from trainer.distributed import DistEnv, dist_env  # noqa: E402
from trainer.ds_config import build_ds_config  # noqa: E402

log = logging.getLogger("mimscale")
TRACEBACKS = logging.getLogger("mimscale.tracebacks")  # the log file only: the terminal gets one line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: dotted keys, values in YAML syntax, e.g. data.batch_size=128 "
               "optim.lr=1.5e-4 data.global_crops.scale=[0.25,1.0]")
    p.add_argument("--config", help="experiment YAML (default: configs/defaults.yaml)")
    p.add_argument("--ds_config", default="zero3.json",
                   help="DeepSpeed JSON; a bare name is looked up in ds_configs/ (default: zero3.json)")
    p.add_argument("--resume", help="resume from this checkpoint directory instead of the newest one")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="save and exit at this optimizer step (time-limited job slots; schedules still span "
                        "schedule.steps, and the next launch resumes)")
    p.add_argument("--stop-after", type=int, metavar="STEPS",
                   help="save and exit after this many optimizer steps of this launch (one job of a chain)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("--dry-run", type=int, nargs="?", const=20, metavar="BATCHES", default=None,
                   help="check everything, stream this many batches (default 20), report, and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with its help")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p.parse_intermixed_args(argv)  # overrides may sit on either side of the options


def setup_logging(rank: int, log_dir: Path | None = None) -> None:
    # torch.distributed warns on every ZeRO-3 reduce-scatter that DeepSpeed still calls the old name.
    # Same for all_gather_into_tensor (ZeRO-3 gathers) and the autograd all_reduce (iBOT's SyncBatchNorm-style
    # head norm): one line each per step on every rank, about a rename we cannot act on.
    for name in ("reduce_scatter_tensor", "all_gather_into_tensor", "torch.distributed.nn.functional.all_reduce"):
        warnings.filterwarnings("ignore", message=f".*{name}.* is deprecated", category=FutureWarning)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    terminal = logging.StreamHandler()
    terminal.setFormatter(fmt)
    terminal.setLevel(logging.INFO if rank == 0 else logging.WARNING)  # humans read rank 0; others warn only
    handlers: list[logging.Handler] = [terminal]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_dir / f"rank{rank}.log")
        file.setFormatter(fmt)
        handlers.append(file)
        TRACEBACKS.handlers = [file]
    TRACEBACKS.propagate = False
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)


def check_output_dir(path: str) -> None:
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError("run.output_dir", str(out), f"not writable: {e.strerror or e}") from None


def check_shards(cfg: Config, env: DistEnv) -> None:
    """Local shard lists that name nothing that exists, or too few shards for ranks x loader streams.
    (A few missing shards are not fatal: each is skipped and counted when its turn comes.)"""
    from data.shards import expand_shards

    for key in ("train_shards", "val_shards"):
        spec = getattr(cfg.data, key)
        if not spec or spec.startswith("builtin:"):  # written on first use
            continue
        urls = expand_shards(spec)
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
        if not urls or len(missing) == len(urls):
            raise ConfigError(f"data.{key}", spec, f"names no shard that exists ({len(urls)} named"
                                                   + (f", first {missing[0]})" if missing else ")"))
        if key == "train_shards":
            need = env.world_size * max(1, cfg.data.num_workers)
            if len(urls) < need:
                raise ConfigError(f"data.{key}", spec, f"{len(urls)} shards cannot feed {env.world_size} ranks x "
                                                       f"{max(1, cfg.data.num_workers)} loader streams ({need} needed)")


def prepare(args: argparse.Namespace) -> tuple[Config, DistEnv, dict]:
    """Everything that can fail on user input, before any process group exists."""
    cfg = load_config(args.config, args.overrides)
    env = dist_env()
    ds = build_ds_config(args.ds_config, cfg, env.world_size)
    check_output_dir(cfg.run.output_dir)
    check_shards(cfg, env)
    return cfg, env, ds


def build_loader(cfg: Config, env: DistEnv):
    from data.digits import resolve_builtin
    from data.pipeline import build_train_loader

    cfg.data.train_shards, cfg.data.val_shards = resolve_builtin(
        cfg.data.train_shards, cfg.data.val_shards, cfg.data.cache_dir)
    return build_train_loader(cfg.data, patch_size=cfg.model.patch_size, seed=cfg.run.seed,
                              rank=env.rank, world_size=env.world_size)


def dry_run(cfg: Config, ds: dict, env: DistEnv, batches: int) -> None:
    from trainer.plan.memory import plan_this_run

    result = plan_this_run(cfg, ds, env.world_size, search=True)
    if env.rank == 0:
        print(result.table())
        log.info("memory plan: %s", result.verdict())
    loader = build_loader(cfg, env)
    log.info("data: %d shards, %d per rank x %d workers, batch %d", len(loader.plan.urls),
             len(loader.plan.urls) // env.world_size, cfg.data.num_workers, cfg.data.batch_size)
    start, images = time.perf_counter(), 0
    for i, batch in enumerate(loader, 1):
        if i == 1:
            log.info("batch: global %s local %s masks %s (%.1f%% of patches masked)",
                     tuple(batch["global_crops"].shape), tuple(batch["local_crops"].shape),
                     tuple(batch["masks"].shape), 100 * batch["masks"].float().mean().item())
            start = time.perf_counter()
        else:
            images += batch["labels"].numel()
        if i >= batches:
            break
    rate = images / max(time.perf_counter() - start, 1e-9)
    log.info("streamed %d batches: %.0f images/s after the first; failures: %s; position: epoch %d",
             batches, rate, dict(loader.counters) or "none", loader.epoch)


def say(line: str) -> None:
    """One line to stderr in one write: print() writes the text and its newline separately, so the
    lines of ranks that fail together came out spliced into each other."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def say_ranks(env: DistEnv) -> None:
    """Rank 0 says how many ranks train, and from which launcher: `accelerate launch --cpu
    --num_processes 2` starts ONE process without RANK, which would otherwise train alone, silently."""
    accelerate = any(k.startswith("ACCELERATE_") for k in os.environ)
    launcher = env.launcher
    if launcher == "torch":
        launcher = ("accelerate" if accelerate else "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else
                    "deepspeed" if "CROSS_RANK" in os.environ else "RANK/WORLD_SIZE")
    log.info("training on %d rank%s (%s; rendezvous %s:%d)", env.world_size, "s" * (env.world_size > 1),
             "a single process" if launcher == "none" else f"from {launcher}", env.master_addr, env.master_port)
    if env.world_size == 1 and accelerate:
        log.warning("accelerate launch started a single process (it does with --cpu, whatever --num_processes "
                    "says): for N ranks on CPUs use `accelerate launch --multi_gpu --num_processes N launch.py ...`")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        for key, help_text, default in describe():
            print(f"{key:34} {default!r:>24}  {help_text}")
        return 0
    for flag in ("stop_at", "stop_after"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            say(f"mimscale: config error: command line: --{flag.replace('_', '-')}: must be at least 1")
            return 2
    try:
        cfg, env, ds = prepare(args)
    except ConfigError as e:
        say(f"mimscale: config error: {e}")
        return 2
    log_dir = Path(cfg.run.output_dir).expanduser() / "logs"
    setup_logging(env.rank, None if args.print_config or args.dry_run is not None else log_dir)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    if args.dry_run is None and env.rank == 0:
        say_ranks(env)
    if args.dry_run is not None:
        try:
            dry_run(cfg, ds, env, args.dry_run)
        except ValueError as e:
            say(f"mimscale: {e}")
            return 2
        return 0
    from data.pipeline import DataFailureError
    from models.kernels import KernelFault
    from models.teachers import FrozenWeightsError
    from trainer.checkpoint import CheckpointError, UntrustedFileError
    from trainer.engine import leave_distributed
    from trainer.faults import NumericalFault
    from trainer.loop import train
    from trainer.methods import method_class

    errors = {FrozenWeightsError: ("{kind} error", 2), UntrustedFileError: ("untrusted file", 2),
              CheckpointError: ("checkpoint error", 3), NumericalFault: ("numerical fault", 3),
              DataFailureError: ("data error", 3), KernelFault: ("kernel error", 3)}
    try:
        summary = train(cfg, ds, env, resume=args.resume, stop_at=args.stop_at, stop_after=args.stop_after)
        stop_signals.ignore()  # saved: a late signal must not turn this into a killed process
        leave_distributed()
    except tuple(errors) as e:
        what, code = next(v for k, v in errors.items() if isinstance(e, k))
        what = what.format(kind=getattr(e, "kind", ""))
        TRACEBACKS.error("%s", what, exc_info=True)
        say(f"mimscale: {what} (rank {env.rank}): {e}  [log: {log_dir / f'rank{env.rank}.log'}]")
        return code
    except BaseException:  # a bug or an interrupt: keep the traceback on the terminal too
        TRACEBACKS.error("unexpected error", exc_info=True)
        raise
    if summary.get("stopped_by"):
        if env.rank == 0:
            say(f"mimscale: {summary['stopped_by']}: saved step {summary['step']} and stopped; run the same "
                "command to resume")
        return 0
    run_dir = Path(cfg.run.output_dir).expanduser()
    if env.rank == 0:
        for line in method_class(cfg.method).summary_lines(cfg, summary, run_dir):
            print(line)
    if env.rank == 0 and cfg.log.pictures and method_class(cfg.method).draws_run_pictures:
        from evaluation.pictures import write_run_pictures
        from export.backbones import load_backbone

        try:  # the run itself is saved and complete: a picture that fails is a warning, not a failed run
            paths = write_run_pictures(run_dir, load_backbone(run_dir))
            print("pictures: " + "  ".join(str(p) for p in paths))
        except Exception as e:  # noqa: BLE001
            logging.getLogger("mimscale").warning("could not draw the run's pictures: %s", e, exc_info=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
