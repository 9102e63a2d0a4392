"""Convert a training checkpoint to a Hugging Face `transformers` model directory and a timm file
(export/convert.py says what is written and how it is checked).

    python scripts/convert_to_hf.py runs/x out/vit-l16-ibot                 # newest checkpoint, EMA teacher
    python scripts/convert_to_hf.py runs/x/checkpoints/step00100000 out/s --weights student --dtype bf16
    python scripts/convert_to_hf.py runs/ft/checkpoints/best out/classifier --labels classes.txt  # fine-tuned

Errors (not a checkpoint, incomplete, untrusted pickle, unknown architecture, an existing output,
a failed check) are one line on stderr and exit 2; nothing is left at the output path.
"""

import argparse
import logging
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.classifier import read_labels  # noqa: E402
from export.convert import DTYPES, SCRIPT, convert  # noqa: E402
from trainer.weights import ExportError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run directory, a checkpoint directory (stepNNNNNNNN) or "
                                           "<run>/checkpoints/latest")
    parser.add_argument("out", help="output directory (must not exist, unless --overwrite)")
    parser.add_argument("--weights", choices=["auto", "teacher", "student"], default="auto",
                        help="the EMA teacher (what iBOT/DINO release and evaluate), the student, or auto: the "
                             "teacher where the method has one (ibot, ibot_clip), else the student (maskalign)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-check", action="store_true", help="skip loading and comparing what was written")
    parser.add_argument("--labels", help="a fine-tuning run's class names, one per line in class order (id2label; "
                                         "default: the class numbers)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    command = shlex.join(["python", SCRIPT, *(sys.argv[1:] if argv is None else argv)])
    try:
        labels = read_labels(args.labels) if args.labels else None
        done = convert(args.checkpoint, args.out, args.weights, args.dtype, args.overwrite, not args.no_check, command,
                       labels)
    except ExportError as e:
        print(f"convert_to_hf: {e}", file=sys.stderr)
        return 2
    print("\n".join(done.lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
