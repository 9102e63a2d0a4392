"""Submit mimscale pretraining to Slurm: one job, a chain of array tasks, or a sweep (trainer/slurm.py).

    python scripts/slurm/submit.py --config configs/x.yaml --nodes 4 --gpus-per-node 8 --time 4:00:00
    python scripts/slurm/submit.py --config configs/x.yaml --nodes 4 --gpus-per-node 8 --chain 6 optim.lr=1e-3
    python scripts/slurm/submit.py --config configs/x.yaml --sweep sweep.yaml --nodes 1 --gpus-per-node 8
    ... --dry-run     # print the exact script and the sbatch command; submit nothing

It fills the #SBATCH lines and settings of scripts/slurm/pretrain.sbatch, checks the config (and every
sweep point) as launch.py would, keeps the exact script in <run>/slurm/submit-<time>.sbatch and
submits that file. Arguments it does not know (overrides, --ds_config, --stop-after) go to launch.py.
A bad submission is one line on stderr, exit 2, nothing submitted.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer.slurm import SubmitError, parse_args, submit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args, launch_args = parse_args(argv)
    try:
        done = submit(args, launch_args)
    except SubmitError as e:
        sys.stderr.write(f"submit: {e}\n")
        return 2
    if done.job is None:  # --dry-run: the script itself on stdout
        print(done.script, end="")
        print("\n".join(done.report), file=sys.stderr)
    else:
        print("\n".join(done.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
