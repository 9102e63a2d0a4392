"""Compile every Triton kernel of models/kernels/ for A100 (sm_80) and H100 (sm_90) without a GPU
(models/kernels/compile.py says how).

    python scripts/compile_kernels.py                      # the full sweep (about 1000 compilations)
    python scripts/compile_kernels.py --subset ci          # what tests/unit/test_compile_kernels.py runs
    python scripts/compile_kernels.py --targets sm_90 --head-dims 88 --kernels _attn_fwd -j 2

Writes a table to stdout (registers, spills, shared memory, HMMA/HGMMA per kernel x config x target)
and JSON (`--json`, default bench/results/kernels_compiled.json for the full sweep). Exit code 1 when a
shipped config fails: a compile error, a spill, shared memory over the limit, or, on sm_90, an
attention kernel without HGMMA.
"""

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's kernels keep one config; we want the GPU's
    os.environ.pop("TRITON_INTERPRET")
    os.execv(sys.executable, [sys.executable, *sys.argv])

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import RESULTS, record, write  # noqa: E402
from models.kernels.compile import (  # noqa: E402
    DTYPES,
    EXTRA_DTYPES,
    HEAD_DIMS,
    LAYOUTS,
    SUBSETS,
    TARGETS,
    kernel_names,
    sweep,
    table,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", choices=sorted(SUBSETS), help="a named subset instead of the full sweep")
    ap.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=sorted(TARGETS))
    ap.add_argument("--head-dims", nargs="+", type=int, choices=HEAD_DIMS, default=list(HEAD_DIMS))
    ap.add_argument("--dtypes", nargs="+", choices=sorted({**DTYPES, **EXTRA_DTYPES}), default=sorted(DTYPES))
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    ap.add_argument("--kernels", nargs="+", help="kernel names (default: all)")
    ap.add_argument("-j", "--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="output JSON (default: bench/results/kernels_compiled.json for the full sweep)")
    ap.add_argument("--quiet", action="store_true", help="no table, only the summary")
    args = ap.parse_args(argv)
    choice = dict(SUBSETS[args.subset]) if args.subset else {
        "head_dims": args.head_dims, "dtypes": args.dtypes, "layouts": args.layouts, "targets": args.targets}
    kernels = tuple(args.kernels) if args.kernels else None
    if kernels and set(kernels) - set(kernel_names()):
        print(f"compile_kernels: unknown kernels {sorted(set(kernels) - set(kernel_names()))}; known: "
              f"{kernel_names()}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = sweep(**choice, kernels=kernels, workers=args.workers,
                    say=(lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr)))
    wall = time.perf_counter() - t0
    bad = [r for r in results if r.problems]
    if not args.quiet:
        print(table(results))
    print(f"{len(results)} compilations in {wall:.0f} s; {len(bad)} with problems"
          + (": " + "; ".join(sorted({f'{r.kernel} {r.config} {r.target}: {", ".join(r.problems)}' for r in bad}))
             if bad else ""))
    full = not args.subset and not kernels and choice == {"head_dims": list(HEAD_DIMS), "dtypes": sorted(DTYPES),
                                                          "layouts": list(LAYOUTS), "targets": sorted(TARGETS)}
    out = args.json or (RESULTS / "kernels_compiled.json" if full else None)
    if out:
        about = record("scripts/compile_kernels.py", argv, "triton")
        write(out, {"benchmark": "Triton kernels compiled ahead of time (no GPU)",
                    "selection": {**choice, "kernels": kernels},
                    "results": [{**asdict(r), "problems": r.problems} for r in results],
                    "with_problems": len(bad), "wall_s": round(wall, 1), **about,
                    "device": f"none (compiled on {about['device']} for {', '.join(choice['targets'])})"})
        print(f"wrote {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
