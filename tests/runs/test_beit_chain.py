"""BEiT's two stages chained as docs/methods.md runs them, on the embedded digits, on the CPU: train the
tokenizer, export its encoder, pretrain the ViT against it (conftest's `beit_chain`, trained once)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_the_tokenizer_reconstructs_and_uses_its_codebook(beit_chain):
    # The held-out reconstruction improves on the untrained network and on each image's mean colour, and
    # the codebook does not collapse (over seeds 0-2, bench/results/quality_ci_seed{0,1,2}.json: +8.2 to +8.6 dB
    # and +7.0 to +7.3 dB, perplexity 16.6 to 23.6 of 32).
    dvae = beit_chain["dvae"]
    s = dvae.summary
    assert s["psnr"] > s["psnr_random_init"] + 5 and s["psnr"] > s["psnr_mean_colour"] + 5, s
    assert s["usage"] > 0.5 and s["perplexity"] > 32 / 4, s  # dvae.min_code_usage is 5%; 32 codes
    assert "codebook is collapsing" not in dvae.stderr
    assert (dvae.out / "reconstructions.png").stat().st_size > 10_000
    # Its export: the encoder alone, its architecture in the metadata.
    with safe_open(str(beit_chain["encoder"]), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["vocab_size"] == "32" and meta["group_count"] == "3"
    assert keys and all(k.startswith("blocks.") for k in keys)  # no decoder


def test_beit_learns_features_against_it(beit_chain):
    # The masked-token loss falls below what the image-blind predictor gets on the same tokens and its
    # accuracy rises above the blind one's (over seeds 0-2: 0.46 to 0.56 below, 9.5 to 13.4 points above,
    # bench/results/quality_ci_seed{0,1,2}.json); the kNN of the mean patch token beats the untrained
    # network's, by little (+2.7, +8.7, +10.7: BEiT trains for fine-tuning, not for frozen read-outs).
    beit = beit_chain["beit"]
    assert "frozen tokenizer loaded from" in beit.stderr
    last = beit.steps()[-1]
    assert last["loss_mim"] < last["mim_blind"] - 0.2, last
    assert last["token_accuracy"] > last["accuracy_blind"] + 0.05, last
    s = beit.summary
    assert s["knn"] > s["knn_random_init"], s


def test_continuing_with_another_tokenizer_stops_before_any_step(beit_chain, tmp_path):
    from models.dvae import Encoder, read_encoder_arch, save_encoder

    other = save_encoder(Encoder(read_encoder_arch(beit_chain["encoder"])), tmp_path / "other.safetensors")
    run = beit_chain["beit"].out
    status = (run / "status.json").read_text()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "launch.py", "--config", "configs/beit_vit_tiny.yaml",
                        f"beit.tokenizer={other}", f"run.output_dir={run}", "schedule.steps=700"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "is not the file" in r.stderr and str(other) in r.stderr, r.stderr[-3000:]
    assert (run / "status.json").read_text() == status  # the run is as it was
