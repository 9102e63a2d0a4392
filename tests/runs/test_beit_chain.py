"""BEiT's two stages chained as the README runs them, on the embedded digits, on the CPU: train the
tokenizer, export its encoder, pretrain the ViT against it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(*args: str, rc: int = 0, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == rc, (args, r.stderr[-4000:])
    return r


def test_tokenizer_then_beit_learns_features(tmp_path):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    # Stage 1: the held-out reconstruction improves on the untrained network and on each image's mean
    # colour, and the codebook does not collapse (seen here: 16.5 dB against 8.1 and 9.3; 100% of 32 used).
    dvae_run = tmp_path / "dvae"
    r = _run("launch.py", "--config", "configs/dvae_tiny.yaml", f"run.output_dir={dvae_run}", cache)
    m = re.search(r"PSNR ([\d.]+) dB \(untrained: ([\d.]+) dB; each image's mean colour: ([\d.]+) dB\), codebook "
                  r"perplexity ([\d.]+) of (\d+), codes used ([\d.]+)%", r.stdout)
    assert m, r.stdout[-2000:]
    psnr, untrained, colour, perplexity, vocab, used = map(float, m.groups())
    assert psnr > untrained + 5 and psnr > colour + 5, m.group(0)
    assert used > 50 and perplexity > vocab / 4, m.group(0)  # dvae.min_code_usage is 5%
    assert "codebook is collapsing" not in r.stderr
    assert (dvae_run / "reconstructions.png").stat().st_size > 10_000

    # Export: the encoder alone, its architecture in the metadata.
    encoder = tmp_path / "encoder.safetensors"
    _run("scripts/export_tokenizer.py", str(dvae_run), str(encoder))
    with safe_open(str(encoder), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["vocab_size"] == str(int(vocab)) and meta["group_count"] == "3"
    assert keys and all(k.startswith("blocks.") for k in keys)  # no decoder

    # Stage 2: the masked-token loss falls below what the image-blind predictor gets on the same tokens,
    # and the kNN of the mean patch token beats the untrained network's clearly.
    beit_run = tmp_path / "beit"
    r = _run("launch.py", "--config", "configs/beit_vit_tiny.yaml", f"beit.tokenizer={encoder}",
             f"run.output_dir={beit_run}", cache, "eval.knn_every_steps=0", "log.pictures=false")
    assert "frozen tokenizer loaded from" in r.stderr
    lines = [json.loads(line) for line in (beit_run / "metrics.jsonl").read_text().splitlines()]
    last_loss = [rec for rec in lines if "loss_mim" in rec][-1]
    assert last_loss["loss_mim"] < last_loss["mim_blind"] - 0.2, last_loss
    assert last_loss["token_accuracy"] > last_loss["accuracy_blind"], last_loss
    m = re.search(r"kNN top-1 .*: ([\d.]+)%\s+random init: ([\d.]+)%", r.stdout)
    assert m, r.stdout[-2000:]
    trained, random_init = float(m.group(1)), float(m.group(2))
    # Seen here: README's figures (BEiT section)
    assert trained >= random_init + 5.0, (trained, random_init)

    # Continuing the run with another tokenizer of the same shape stops before any step, naming that file.
    from models.dvae import Encoder, read_encoder_arch, save_encoder

    other = save_encoder(Encoder(read_encoder_arch(encoder)), tmp_path / "other.safetensors")
    r = _run("launch.py", "--config", "configs/beit_vit_tiny.yaml", f"beit.tokenizer={other}",
             f"run.output_dir={beit_run}", cache, "schedule.steps=700", rc=2)
    assert "is not the file" in r.stderr and str(other) in r.stderr, r.stderr[-3000:]
