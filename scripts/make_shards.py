"""Convert an ImageFolder tree or a `path<TAB>label` list into WebDataset tar shards (data/convert.py).

    python scripts/make_shards.py /data/imagenet21k/train /data/shards/in22k --samples-per-shard 1000 --workers 32
    python scripts/make_shards.py files.tsv /data/shards/mine

ImageFolder: one sub-directory per class, indexed in sorted order. List file: `path<TAB>label` per
line (integer labels kept, names indexed in sorted order; relative paths from the list's directory).
Each sample holds `jpg` (JPEGs copied byte for byte), `cls` and `json`; samples are shuffled with
`--seed` first. Output: `<prefix>-NNNNNN.tar`, `classes.json`, `manifest.json`. Shards are written
atomically: run the same command again after an interruption and only the rest is written.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.convert import SourceError, convert_to_shards  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="ImageFolder root, or a path<TAB>label list file")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--prefix", default="shard")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed; must stay the same to resume")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    args = p.parse_args(argv)
    try:
        done = convert_to_shards(args.source, args.out, args.samples_per_shard, args.workers, args.prefix, args.seed,
                                 not args.no_shuffle, say=lambda line: print(line, file=sys.stderr))
    except SourceError as e:
        print(f"make_shards: {e}", file=sys.stderr)
        return 2
    print(f"wrote {done['manifest']}: {done['samples']} samples in {done['shards']} shards, "
          f"{len(done['unreadable'])} unreadable sources", file=sys.stderr)
    for line in done["unreadable"][:10]:
        print(f"  unreadable: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
