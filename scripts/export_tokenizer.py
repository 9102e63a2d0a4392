"""Export a trained dVAE's encoder (BEiT's tokenizer) to one safetensors file.

    python scripts/export_tokenizer.py runs/dvae_tiny runs/dvae_tiny/encoder.safetensors

Input: a run of method dvae (its newest complete checkpoint), a checkpoint directory, or
`checkpoints/latest`, written on any number of ranks. Output: the encoder alone, its
architecture (and the run's step and command) in the file's metadata; give it to stage 2 as
`beit.tokenizer`. Before exiting, the file is read back the way stage 2 reads it and its token
ids are compared with the checkpoint's encoder on random images (export/tokenizer.py). Errors are
one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.tokenizer import export_tokenizer  # noqa: E402
from models.dvae import TokenizerWeightsError  # noqa: E402
from trainer.weights import ExportError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="run directory, checkpoint directory or checkpoints/latest of a dvae run")
    p.add_argument("out", help="the .safetensors file to write")
    args = p.parse_args(argv)
    try:
        out, arch, step = export_tokenizer(args.source, args.out)
    except (ExportError, TokenizerWeightsError) as e:
        sys.stderr.write(f"export_tokenizer: {e}\n")
        return 2
    print(f"wrote {out}: the encoder of step {step} ({arch.vocab_size} codes, {2 ** (arch.group_count - 1)}x "
          f"down-sampling); use it as beit.tokenizer={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
