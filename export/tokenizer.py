"""A trained dVAE's encoder (BEiT's tokenizer) out of a training checkpoint, as one safetensors file.

The file format (the encoder's tensors, its architecture in the metadata) is models/dvae.py's
(`save_encoder` / `read_encoder_file`), next to the network, because stage 2 reads it from the
trainer. Here: the checkpoint's fp32 student read on one CPU process (trainer/weights.py), the
encoder rebuilt with the architecture the run's method names (`export_spec().arch`), written, then
read back as stage 2 reads it and compared token for token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.dvae import DVAEArch, Encoder, map_pixels, read_encoder_file, save_encoder
from trainer.weights import ExportError, as_attributes, checkpoint_method, resolve_checkpoint, student_state


def export_tokenizer(source: str | Path, out: str | Path) -> tuple[Path, DVAEArch, int]:
    """source: a dvae run directory, checkpoint directory or `checkpoints/latest` -> (the file written,
    the encoder's architecture, the checkpoint's step)."""
    ckpt = resolve_checkpoint(source)
    parts = torch.load(sorted(ckpt.glob("rank*.pt"))[0], map_location="cpu", weights_only=True, mmap=True)
    config = json.loads(parts["config"])
    method = checkpoint_method(ckpt, config)
    if method.product != "tokenizer":
        raise ExportError(f"{ckpt} is a {method.name} run: it trains a {method.product}, not a tokenizer; export it "
                          f"with {method.exported_by}")
    arch = method.export_spec(as_attributes(config)).arch
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
    side = 8 * 2 ** (arch.group_count - 1)
    x = map_pixels(torch.rand(4, 3, side, side, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        if read_arch != arch or not torch.equal(encoder(x).argmax(1), again(x).argmax(1)):
            out.unlink()
            raise ExportError(f"{out} does not read back as the checkpoint's encoder; removed it")
    return out, arch, parts["step"]
