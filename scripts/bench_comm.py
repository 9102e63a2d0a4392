"""ZeRO-3 traffic per optimizer step, counted on CPU ranks (gloo), against the analytic count
(bench/comm.py says how each byte is counted and put down to a part of the step).

    python scripts/bench_comm.py                 # 2 and 4 ranks, every case; JSON in bench/results/
    python scripts/bench_comm.py --ranks 2 --cases ibot_packed

Cases: iBOT with per-resolution forwards against packed multi-crop (Triton's varlen kernel, in its
interpreter here); iBOT + CLIP with the frozen teacher partitioned against replicated.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import RESULTS, record, write  # noqa: E402
from bench.comm import CASES, CaseFailed, measure, summarise  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    ap.add_argument("--regimes", nargs="+", choices=("shipped", "release"), default=["shipped", "release"],
                    help="shipped: ds_configs/zero3.json as is (a tiny model stays gathered for the whole step); "
                         "release: no live, reuse or prefetch allowance, as a model far above those limits")
    ap.add_argument("--steps", type=int, default=2, help="counted steps after 2 warm-up steps")
    ap.add_argument("--json", default=str(RESULTS / "comm_zero3_cpu.json"))
    args = ap.parse_args(argv)
    try:
        results = measure(args.cases, args.ranks, args.regimes, args.steps)
    except CaseFailed as e:
        print(f"bench_comm: {e}", file=sys.stderr)
        return 1
    lines, ratios = summarise(results)
    print("\n".join(lines))
    about = record("scripts/bench_comm.py", argv, "deepspeed")
    write(args.json, {"benchmark": "ZeRO-3 bytes per rank per optimizer step (gloo CPU ranks, tiny ViT)",
                      "results": results, "ratios": ratios, "table": lines, **about,
                      "device": about["device"] + ", gloo"})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
