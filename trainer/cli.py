"""launch.py's command line and the checks before a run: its arguments, everything that can fail on
user input (checked before any process group exists), logging, the dry run, and what rank 0 says
about the ranks. launch.py's `main` strings them together; scripts/slurm/submit.py checks a
submission with the same calls."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from .config import Config, ConfigError, load_config
from .distributed import DistEnv, dist_env
from .ds_config import build_ds_config, ds_config_name, resolve_ds_config

log = logging.getLogger("mimscale")
TRACEBACKS = logging.getLogger("mimscale.tracebacks")  # the log file only: the terminal gets one line
DESCRIPTION = "mimscale: the one entry point."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch.py", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: dotted keys, values in YAML syntax, e.g. data.batch_size=128 "
               "optim.lr=1.5e-4 data.global_crops.scale=[0.25,1.0]")
    p.add_argument("--config", help="experiment YAML (default: configs/defaults.yaml)")
    p.add_argument("--ds_config", default=None,
                   help="DeepSpeed JSON; a bare name is looked up in ds_configs/ (default: accelerate's "
                        "--deepspeed_config_file under `accelerate launch --use_deepspeed`, else zero3.json)")
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
    ds = build_ds_config(args.ds_config, cfg, env.world_size, os.environ)
    name, args.ds_from_accelerate = ds_config_name(args.ds_config, os.environ)
    args.ds_config = str(resolve_ds_config(name).resolve())
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
    from .plan.memory import plan_this_run

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


def say_ranks(env: DistEnv, args: argparse.Namespace | None = None) -> None:
    """Rank 0 says how many ranks train, and from which launcher: `accelerate launch --cpu
    --num_processes 2` starts ONE process without RANK, which would otherwise train alone, silently."""
    accelerate = any(k.startswith("ACCELERATE_") for k in os.environ)
    launcher = env.launcher
    if launcher == "torch":
        launcher = ("accelerate" if accelerate else "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else
                    "deepspeed" if "CROSS_RANK" in os.environ else "RANK/WORLD_SIZE")
    log.info("training on %d rank%s (%s; rendezvous %s:%d)", env.world_size, "s" * (env.world_size > 1),
             "a single process" if launcher == "none" else f"from {launcher}", env.master_addr, env.master_port)
    if args is not None:
        log.info("DeepSpeed config %s%s", args.ds_config,
                 " (from accelerate's deepspeed_config_file)" if args.ds_from_accelerate else "")
    if env.world_size == 1 and accelerate:
        log.warning("accelerate launch started a single process (it does with --cpu, whatever --num_processes "
                    "says): for N ranks on CPUs use `accelerate launch --multi_gpu --num_processes N launch.py ...`")


def training_views(config: str | None, overrides: list[str], n: int):
    """What the config's loader feeds the method, as `scripts/visualize.py masks` draws it: (views
    [n, 3, H, W] normalised, masks [n, h, w] or None, mean, std, title), the masks the method's own
    (`Method.masks_to_draw`: MaskAlign's attentive choice of visible patches, for one)."""
    from data.transforms import normalize_batch

    from .methods import method_class

    cfg = load_config(config, overrides)
    a = cfg.data.augment
    cfg.data.num_workers, cfg.data.batch_size = 0, n
    batch = normalize_batch(next(iter(build_loader(cfg, DistEnv()))), a.mean, a.std)
    views = batch["global_crops"][0]
    masks, title = method_class(cfg.method).masks_to_draw(cfg, views, batch["masks"][0])
    return views, masks, a.mean, a.std, title
