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

import logging
import sys
from pathlib import Path

from trainer import stop_signals

if __name__ == "__main__":  # (not when imported, e.g. by a test: its process keeps its own handlers)
    stop_signals.catch()  # before the 2 s of importing torch: a pre-emption signal then must not kill a rank

from trainer.cli import TRACEBACKS, dry_run, parse_args, prepare, say, say_ranks, setup_logging  # noqa: E402
from trainer.config import ConfigError, describe, dump_yaml  # noqa: E402


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
        say_ranks(env, args)
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
    from trainer.distributed import leave_distributed
    from trainer.faults import NumericalFault
    from trainer.loop import train
    from trainer.methods import method_class
    from trainer.tracking import Trackers

    errors = {FrozenWeightsError: ("{kind} error", 2), UntrustedFileError: ("untrusted file", 2),
              CheckpointError: ("checkpoint error", 3), NumericalFault: ("numerical fault", 3),
              DataFailureError: ("data error", 3), KernelFault: ("kernel error", 3)}
    trackers = Trackers.open(cfg, env.rank)  # W&B / MLflow as configured, rank 0 only
    try:
        summary = train(cfg, ds, env, resume=args.resume, stop_at=args.stop_at, stop_after=args.stop_after,
                        trackers=trackers)
        stop_signals.ignore()  # saved: a late signal must not turn this into a killed process
        leave_distributed()
    except tuple(errors) as e:
        what, code = next(v for k, v in errors.items() if isinstance(e, k))
        what = what.format(kind=getattr(e, "kind", ""))
        TRACEBACKS.error("%s", what, exc_info=True)
        say(f"mimscale: {what} (rank {env.rank}): {e}  [log: {log_dir / f'rank{env.rank}.log'}]")
        trackers.close(exit_code=code)
        return code
    except BaseException:  # a bug or an interrupt: keep the traceback on the terminal too
        TRACEBACKS.error("unexpected error", exc_info=True)
        trackers.close(exit_code=1)
        raise
    if summary.get("stopped_by"):
        if env.rank == 0:
            say(f"mimscale: {summary['stopped_by']}: saved step {summary['step']} and stopped; run the same "
                "command to resume")
        trackers.close()
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
    if trackers:  # the run's pictures, its methods' own included (reconstructions.png)
        trackers.pictures(summary["step"], sorted(run_dir.glob("*.png")))
    trackers.close()
    return 0


if __name__ == "__main__":
    code = main()
    from trainer.distributed import release_before_exit

    release_before_exit()
    sys.exit(code)
