"""Convert a training checkpoint to a Hugging Face `transformers` model directory and a timm file
(export/convert.py; `--help` says what is written).

    python scripts/convert_to_hf.py runs/x out/vit-l16-ibot                 # newest checkpoint, EMA teacher
    python scripts/convert_to_hf.py runs/x/checkpoints/step00100000 out/s --weights student --dtype bf16
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
