"""Every tiny recipe at full length on the embedded digits, with what each number is compared to
(bench/quality.py).

    python scripts/bench_quality.py                       # all twenty; about 1 h 30 min on 2 CPU cores
    python scripts/bench_quality.py --only ibot dvae beit --seed 1 --out bench/results/quality_cpu_seed1.json

For every backbone the run's kNN against random init and raw pixels, and a linear probe; for the
tokenizer its PSNR against the untrained network and each image's mean colour; for iTPN its held-out
pixel loss against the untrained network and zeros; fine-tuning from the iBOT, MaskAlign, BEiT and
iTPN runs against from scratch (10% and all labels). Writes bench/results/quality_cpu.json (device,
versions, command, every figure); CI asserts learning at shorter lengths, the docs quote this file.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import RESULTS, record, write  # noqa: E402
from bench.quality import RECIPES, RecipeFailed, run_recipes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="shorter than the recipes (a smoke test; the JSON says so)")
    ap.add_argument("--lengths", choices=["full", "ci"], default="full",
                    help="ci: each recipe as CI's learning test runs it (iTPN: 400 of its 600 steps), for the "
                         "margins those tests assert")
    ap.add_argument("--out", default=str(RESULTS / "quality_cpu.json"))
    args = ap.parse_args(argv)

    def progress(name: str, result: dict) -> None:
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in result.items() if k not in ("command", "curve")),
              flush=True)

    try:
        results = run_recipes(args.only, args.seed, args.steps, args.lengths, progress)
    except RecipeFailed as e:
        print(f"bench_quality: {e}", file=sys.stderr)
        return 1
    out = write(args.out, {"benchmark": "every tiny recipe on the embedded digits (held-out split), "
                                        + ("at full length" if args.lengths == "full" else "as CI runs it"),
                           "seed": args.seed, "steps": args.steps or "each recipe's own", "lengths": args.lengths,
                           "results": results,
                           **record("scripts/bench_quality.py", argv)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
