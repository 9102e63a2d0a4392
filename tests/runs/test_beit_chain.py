"""BEiT's two stages chained as docs/methods.md runs them, on the embedded digits, on the CPU: train the
tokenizer, export its encoder, pretrain the ViT against it (conftest's `beit_chain`, trained once), and
convert the BEiT runs (export/convert.py) to `BeitModel` and timm's Beit: the chain's run (BEiT's
defaults) and a 2-step one with the other switches (vit_test), against the chain's tokenizer. One file,
so that `pytest -n 2` (which hands a worker whole files) trains the chain once."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import launch_run
from safetensors import safe_open

from export import convert as hf_convert
from trainer.weights import ExportError

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


# --------------------------------------------------------------------------- export

FILES = ["README.md", "config.json", "model.safetensors", "preprocessor_config.json", "timm_model.safetensors"]


@pytest.fixture(scope="module")
def shared_run(beit_chain) -> Path:
    """BEiT's defaults: shared relative position bias, no absolute position embeddings, q/v biases,
    layer-scale: the session's BEiT training (conftest's beit_chain)."""
    return beit_chain["beit"].out


@pytest.fixture(scope="module")
def per_block_run(tmp_path_factory, beit_chain) -> Path:
    """The other switches, in one run: a table per block, absolute position embeddings too, timm's fused
    q/k/v bias (BeitModel has no key bias) and no layer-scale."""
    return launch_run(tmp_path_factory.mktemp("beit_per_block") / "run", "beit_vit_tiny",
                      f"beit.tokenizer={beit_chain['encoder']}", "schedule.steps=2", "checkpoint.every_steps=2",
                      "model.arch=vit_test", "data.batch_size=8", "beit.rel_pos_bias=per_block",
                      "beit.abs_pos_embed=true", "beit.qkv_bias=qkv", "beit.layer_scale=0").out


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO)


def one(state: dict, *suffixes: str) -> torch.Tensor:
    """The one tensor whose name ends with any of `suffixes` (transformers 5.x's names or 4.x's)."""
    found = [v for k, v in state.items() if k.endswith(suffixes)]
    assert len(found) == 1, (suffixes, sorted(state))
    return found[0]


def load_strictly(out: Path):
    """BeitModel through AutoModel, with nothing missing, unexpected or mismatched."""
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "BeitModel"
    assert not any(info.values()), info
    return model.eval()


def timm_file(out: Path) -> tuple[dict, str, dict]:
    """The timm file's tensors, model name and kwargs, after loading it into timm's Beit strictly."""
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(out / "timm_model.safetensors"), "pt") as f:
        meta = f.metadata()
    state, kwargs = load_file(str(out / "timm_model.safetensors")), json.loads(meta["timm_kwargs"])
    timm.create_model(meta["timm_name"], num_classes=0, **kwargs).load_state_dict(state, strict=True)
    return state, meta["timm_name"], kwargs


def test_relative_position_index_is_beits():
    # transformers and timm both rebuild microsoft/unilm beit's index from the grid; ours must be the same
    # for the tables to be copied as they are (also on a non-square grid, where rows and columns differ).
    from timm.models.beit import gen_relative_position_index
    from transformers.models.beit.modeling_beit import BeitRelativePositionBias

    import export.hf
    from models.vit import RelativePositionBias

    for grid in ((4, 4), (3, 5)):
        rel = RelativePositionBias(grid, 1)  # its forward, with each row of the table holding its own number
        with torch.no_grad():
            rel.relative_position_bias_table.copy_(torch.arange(len(rel.relative_position_bias_table))[:, None])
            ours = rel()[0].round().long()
        if grid[0] == grid[1]:
            assert torch.equal(export.hf.our_relative_position_index(grid[0]), ours)
        assert torch.equal(BeitRelativePositionBias.generate_relative_position_index(grid), ours)
        assert torch.equal(gen_relative_position_index(grid), ours)


def test_shared_bias_run_becomes_beit_model_and_timm_beit(shared_run, tmp_path):
    from trainer.weights import read_backbone

    out = tmp_path / "hf"
    done = hf_convert.convert(shared_run, out)
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert done.hf_class == "BeitModel" and done.timm_name == "beit_base_patch16_224"
    assert "timm.create_model('beit_base_patch16_224', pretrained=True" in done.lines[1]
    assert len(done.errors) == 4 and max(done.errors.values()) <= 1e-5, done.errors

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BeitModel"] and config["mimscale"]["method"] == "beit"
    assert config["use_shared_relative_position_bias"] and not config["use_relative_position_bias"]
    assert not config["use_absolute_position_embeddings"] and not config["use_mean_pooling"]
    assert config["use_mask_token"] and config["layer_scale_init_value"] == 0.1
    assert config["layer_norm_eps"] == 1e-6 and config["drop_path_rate"] == 0.0 and config["hidden_act"] == "gelu"
    assert config["image_size"] == 32 and config["patch_size"] == 8 and config["vocab_size"] == 32

    ours = read_backbone(shared_run).state
    model = load_strictly(out)
    hf = model.state_dict()
    table = one(hf, "relative_position_bias_table")  # the shared one, the only one
    assert torch.equal(table, ours["rel_pos_bias.relative_position_bias_table"]) and table.abs().max() > 0
    for i in range(2):
        assert torch.equal(one(hf, f"{i}.attention.q_proj.bias", f"{i}.attention.attention.query.bias"),
                           ours[f"blocks.{i}.attn.q_bias"])
        assert torch.equal(one(hf, f"{i}.attention.v_proj.bias", f"{i}.attention.attention.value.bias"),
                           ours[f"blocks.{i}.attn.v_bias"])
        q, k, v = ours[f"blocks.{i}.attn.qkv.weight"].chunk(3)
        assert torch.equal(one(hf, f"{i}.attention.k_proj.weight", f"{i}.attention.attention.key.weight"), k)
        assert torch.equal(one(hf, f"{i}.lambda_2"), ours[f"blocks.{i}.ls2.gamma"])
    assert not [k for k in hf if k.endswith(("k_proj.bias", "key.bias"))]  # BeitModel has no key bias
    assert torch.equal(hf["embeddings.mask_token"].flatten(), ours["mask_token"].flatten())

    # last_hidden_state is after the final norm (use_mean_pooling=False), and the pooler just takes [CLS].
    x = hf_convert.sample_photos(32, out)
    with torch.no_grad():
        result = model(pixel_values=x)
    assert torch.equal(result.pooler_output, result.last_hidden_state[:, 0])

    state, name, kwargs = timm_file(out)
    assert name == "beit_base_patch16_224" and kwargs["global_pool"] == "token" and kwargs["init_values"] == 0.1
    assert kwargs["use_shared_rel_pos_bias"] and not kwargs["use_rel_pos_bias"] and not kwargs["use_abs_pos_emb"]
    assert torch.equal(state["rel_pos_bias.relative_position_bias_table"], table)
    assert torch.equal(state["blocks.1.gamma_1"], ours["blocks.1.ls1.gamma"]) and "mask_token" not in state

    card = (out / "README.md").read_text()
    assert "class `BeitModel`" in card and "one table shared by all blocks" in card and "no key bias" in card
    assert "beit_base_patch16_224" in card and "pooler_output" in card


def test_per_block_bias_with_absolute_positions_and_a_key_bias(per_block_run, tmp_path):
    from trainer.weights import read_backbone

    out = tmp_path / "hf"
    errors = hf_convert.convert(per_block_run, out).errors
    assert len(errors) == 4 and max(errors.values()) <= 1e-5, errors
    config = json.loads((out / "config.json").read_text())
    assert config["use_relative_position_bias"] and not config["use_shared_relative_position_bias"]
    assert config["use_absolute_position_embeddings"] and config["layer_scale_init_value"] == 0.0

    ours = read_backbone(per_block_run).state
    assert "blocks.0.attn.qkv.bias" in ours and "blocks.0.ls1.gamma" not in ours  # what this run is for
    hf = load_strictly(out).state_dict()
    assert not [k for k in hf if "lambda" in k]
    assert torch.equal(hf["embeddings.position_embeddings"], ours["pos_embed"])
    for i in range(2):
        table = one(hf, f"{i}.relative_position_bias.relative_position_bias_table")
        assert torch.equal(table, ours[f"blocks.{i}.attn.rel_pos.relative_position_bias_table"])
        q, _, v = ours[f"blocks.{i}.attn.qkv.bias"].chunk(3)
        assert torch.equal(one(hf, f"{i}.attention.q_proj.bias", f"{i}.attention.attention.query.bias"), q)
        assert torch.equal(one(hf, f"{i}.attention.v_proj.bias", f"{i}.attention.attention.value.bias"), v)

    state, _, kwargs = timm_file(out)
    assert kwargs["use_rel_pos_bias"] and kwargs["use_abs_pos_emb"] and kwargs["init_values"] == 0
    assert torch.equal(state["blocks.1.attn.relative_position_bias_table"],
                       ours["blocks.1.attn.rel_pos.relative_position_bias_table"])
    assert "pos_embed" in state and not [k for k in state if "gamma" in k or "qkv.bias" in k]
    card = (out / "README.md").read_text()
    assert "one table per block" in card and "absolute position embeddings: yes" in card
    assert "key bias is dropped" in card


def test_check_sees_the_beit_tensors(shared_run, per_block_run, tmp_path, monkeypatch):
    # After 2 steps the tables, biases and gammas are still near their init (zeros, 0.1): give them
    # large random values, so the check compares features that depend on them (the per-block run's
    # key bias too, which the export drops); then a table in the wrong order must fail the check.
    import export.hf

    real_read, real_map = hf_convert.read_backbone, export.hf.to_hf_state

    def randomised(*args, **kwargs):
        b = real_read(*args, **kwargs)
        g = torch.Generator().manual_seed(0)
        for k, v in b.state.items():
            if k.endswith(("relative_position_bias_table", "q_bias", "v_bias", "qkv.bias", "gamma", "pos_embed")):
                b.state[k] = torch.randn(v.shape, generator=g)
        return b

    monkeypatch.setattr(hf_convert, "read_backbone", randomised)
    for run in (shared_run, per_block_run):
        errors = hf_convert.convert(run, tmp_path / run.parent.name).errors
        assert max(errors.values()) <= 1e-5, (run, errors)

    def flipped(*args, **kwargs):  # loads strictly, puts each offset's bias on another offset
        out = real_map(*args, **kwargs)
        for k in [k for k in out if k.endswith("relative_position_bias_table")]:
            out[k] = out[k].flip(0)
        return out

    monkeypatch.setattr(export.hf, "to_hf_state", flipped)
    with pytest.raises(ExportError) as e:
        hf_convert.convert(shared_run, tmp_path / "flipped")
    assert str(e.value).startswith("check failed") and "transformers_cls" in str(e.value), str(e.value)[-2000:]
    assert "timm_" not in str(e.value)  # the timm file was written from the same state, correctly
    assert not (tmp_path / "flipped").exists()
