"""Export a trained dVAE's encoder (BEiT's tokenizer) to one safetensors file.

    python scripts/export_tokenizer.py runs/dvae_tiny runs/dvae_tiny/encoder.safetensors

Input: a run of method dvae (its newest complete checkpoint), a checkpoint directory, or
`checkpoints/latest`, written on any number of ranks. Output: the encoder alone, its
architecture (and the run's step and command) in the file's metadata; give it to stage 2 as
`beit.tokenizer`. Before exiting, the file is read back the way stage 2 reads it and its token
ids are compared with the checkpoint's encoder on random images. Errors are one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from export.weights import ExportError, checkpoint_method, resolve_checkpoint, student_state  # noqa: E402
from models.dvae import DVAEArch, Encoder, TokenizerWeightsError, map_pixels, read_encoder_file, save_encoder  # noqa: E402


def export(source: str | Path, out: str | Path) -> tuple[Path, DVAEArch, int]:
    ckpt = resolve_checkpoint(source)
    parts = torch.load(sorted(ckpt.glob("rank*.pt"))[0], map_location="cpu", weights_only=True, mmap=True)
    config = json.loads(parts["config"])
    if checkpoint_method(ckpt, config).product != "tokenizer":
        raise ExportError(f"{ckpt} is a {config.get('method')} run, not a dvae (tokenizer) run")
    d = config["dvae"]
    arch = DVAEArch(group_count=d["group_count"], n_hid=d["n_hid"], n_blk_per_group=d["n_blk_per_group"],
                    vocab_size=d["vocab_size"], n_init=d["n_init"])
    state = {k[len("encoder."):]: v for k, v in student_state(ckpt).items() if k.startswith("encoder.")}
    encoder = Encoder(arch)
    encoder.load_state_dict(state, strict=True)
    out = Path(out).expanduser()
    if out.exists():
        raise ExportError(f"{out} exists; remove it or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_encoder(encoder, out, {"step": str(parts["step"]), "source": str(ckpt), "command": parts.get("command", "")})
    # Read back as stage 2 will, and compare token ids on random images.
    read_arch, read_state = read_encoder_file(out)
    again = Encoder(read_arch)
    again.load_state_dict(read_state, strict=True)
    x = map_pixels(torch.rand(4, 3, 8 * 2 ** (arch.group_count - 1), 8 * 2 ** (arch.group_count - 1),
                              generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        if read_arch != arch or not torch.equal(encoder(x).argmax(1), again(x).argmax(1)):
            out.unlink()
            raise ExportError(f"{out} does not read back as the checkpoint's encoder; removed it")
    return out, arch, parts["step"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="run directory, checkpoint directory or checkpoints/latest of a dvae run")
    p.add_argument("out", help="the .safetensors file to write")
    args = p.parse_args(argv)
    try:
        out, arch, step = export(args.source, args.out)
    except (ExportError, TokenizerWeightsError) as e:
        sys.stderr.write(f"export_tokenizer: {e}\n")
        return 2
    print(f"wrote {out}: the encoder of step {step} ({arch.vocab_size} codes, {2 ** (arch.group_count - 1)}x "
          f"down-sampling); use it as beit.tokenizer={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
