"""DALL-E's discrete VAE: shapes, sampling, losses, code statistics, weights files, and equality
with the `dall_e` package's own networks (the `dev` extra) on random weights."""

import math

import pytest
import torch

from models.dvae import (
    Decoder,
    DiscreteVAE,
    DVAEArch,
    Encoder,
    FrozenTokenizer,
    TokenizerWeightsError,
    code_stats,
    convert_dalle_state_dict,
    downsampling,
    gumbel_softmax,
    kl_to_uniform,
    load_tokenizer_weights,
    logit_laplace_nll,
    map_pixels,
    read_encoder_file,
    reconstruction,
    reconstruction_loss,
    save_encoder,
    unmap_pixels,
)

TINY = DVAEArch(group_count=3, n_hid=16, n_blk_per_group=2, vocab_size=64, n_init=8)


def stage_shapes(blocks: torch.nn.Sequential, x: torch.Tensor) -> dict[str, tuple]:
    shapes = {}
    for name, stage in blocks.named_children():
        x = stage(x)
        shapes[name] = tuple(x.shape)
    return shapes


def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random biases as well (both initialisations leave them at zero), so a misplaced one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith((".b", ".bias")):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def test_full_dalle_arch_shapes_and_parameter_count_on_meta():
    arch = DVAEArch()
    with torch.device("meta"):
        enc, dec = Encoder(arch), Decoder(arch)
        enc_shapes = stage_shapes(enc.blocks, torch.empty(1, 3, 256, 256))
        dec_shapes = stage_shapes(dec.blocks, torch.empty(1, 8192, 32, 32))
    assert enc_shapes == {"input": (1, 256, 256, 256), "group_1": (1, 256, 128, 128), "group_2": (1, 512, 64, 64),
                          "group_3": (1, 1024, 32, 32), "group_4": (1, 2048, 32, 32), "output": (1, 8192, 32, 32)}
    assert dec_shapes == {"input": (1, 128, 32, 32), "group_1": (1, 2048, 64, 64), "group_2": (1, 1024, 128, 128),
                          "group_3": (1, 512, 256, 256), "group_4": (1, 256, 256, 256), "output": (1, 6, 256, 256)}
    assert downsampling(arch) == 8
    # the counts of dall_e's Encoder() and Decoder() (dall_e 0.1)
    assert sum(p.numel() for p in enc.parameters()) == 53_786_240
    assert sum(p.numel() for p in dec.parameters()) == 43_829_766
    assert [n for n, _ in enc.named_parameters()][:4] == [
        "blocks.input.weight", "blocks.input.bias",
        "blocks.group_1.block_1.res_path.conv_1.weight", "blocks.group_1.block_1.res_path.conv_1.bias"]
    assert "blocks.group_2.block_1.id_path.weight" in dict(enc.named_parameters())


def test_tiny_arch_shapes_and_post_gain():
    torch.manual_seed(0)
    vae = DiscreteVAE(TINY)
    x = map_pixels(torch.rand(2, 3, 24, 24))
    assert stage_shapes(vae.encoder.blocks, x) == {
        "input": (2, 16, 24, 24), "group_1": (2, 16, 12, 12), "group_2": (2, 32, 6, 6),
        "group_3": (2, 64, 6, 6), "output": (2, 64, 6, 6)}
    logits, stats = vae(x, tau=1.0)
    assert downsampling(TINY) == 4 and logits.shape == (2, 64, 6, 6) and stats.shape == (2, 6, 24, 24)
    block = vae.decoder.blocks.group_2.block_1
    assert block.post_gain == 1 / (3 * 2) ** 2
    z = torch.randn(2, 64, 6, 6)
    torch.testing.assert_close(block(z), block.id_path(z) + block.res_path(z) / 36)
    kernels = [m.kernel_size[0] for m in vae.encoder.blocks.group_1.block_1.res_path if hasattr(m, "kernel_size")]
    assert kernels == [3, 3, 3, 1]
    kernels = [m.kernel_size[0] for m in block.res_path if hasattr(m, "kernel_size")]
    assert kernels == [1, 3, 3, 3]


def test_arch_metadata_round_trip_and_validation():
    assert DVAEArch.from_metadata({**TINY.to_metadata(), "format": "x"}) == TINY
    with pytest.raises(ValueError, match="n_hid"):
        DVAEArch(n_hid=30)
    with pytest.raises(ValueError, match="vocab_size"):
        DVAEArch.from_metadata({k: v for k, v in TINY.to_metadata().items() if k != "vocab_size"})


def test_pixel_mapping():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(map_pixels(x).flatten(), torch.tensor([0.1, 0.5, 0.9]))
    torch.testing.assert_close(unmap_pixels(map_pixels(x)), x)
    assert unmap_pixels(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]  # clamped


def test_gumbel_softmax_soft_and_straight_through():
    logits = torch.randn(3, 16, 2, 2, requires_grad=True)
    soft = gumbel_softmax(logits, tau=1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(soft.sum(1), torch.ones(3, 2, 2))
    assert (soft > 0).all() and (soft < 1).all()

    cold = gumbel_softmax(logits, tau=1e-3, generator=torch.Generator().manual_seed(1))
    hard = gumbel_softmax(logits, tau=1e-3, hard=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(cold, hard.detach(), atol=1e-3, rtol=0)  # same noise: tau -> 0 is one-hot

    weights = torch.randn(3, 16, 2, 2)
    hard = gumbel_softmax(logits, tau=0.7, hard=True, generator=torch.Generator().manual_seed(2))
    assert set(hard.detach().unique().tolist()) == {0.0, 1.0} and (hard.detach().sum(1) == 1).all()
    (g_hard,) = torch.autograd.grad((hard * weights).sum(), logits)
    soft = gumbel_softmax(logits, tau=0.7, generator=torch.Generator().manual_seed(2))
    (g_soft,) = torch.autograd.grad((soft * weights).sum(), logits)
    assert (hard.detach().argmax(1) == soft.detach().argmax(1)).all()
    torch.testing.assert_close(g_hard, g_soft)

    bf16 = gumbel_softmax(logits.detach().bfloat16(), tau=1.0, hard=True)
    assert bf16.dtype == torch.bfloat16 and (bf16.sum(1) == 1).all()


@pytest.mark.parametrize("tokens, perplexity, usage", [
    (torch.arange(64).repeat(3), 64.0, 1.0),            # uniform over V
    (torch.full((50,), 7), 1.0, 1 / 64),                 # one code
    (torch.arange(0, 64, 2).repeat(2), 32.0, 0.5),       # half the codes, equally
])
def test_code_stats(tokens, perplexity, usage):
    p, u = code_stats(tokens.view(-1, 2), vocab_size=64)
    assert p.item() == pytest.approx(perplexity, rel=1e-5) and u.item() == pytest.approx(usage)


def test_kl_to_uniform():
    torch.testing.assert_close(kl_to_uniform(torch.zeros(2, 64, 3, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    peaked = torch.full((2, 64, 3, 3), -1e4)
    peaked[:, 5] = 0.0
    torch.testing.assert_close(kl_to_uniform(peaked), torch.full((2,), 9 * math.log(64)))
    assert (kl_to_uniform(torch.randn(4, 64, 3, 3)) > 0).all()


def test_logit_laplace_nll_against_the_density():
    x = torch.tensor([0.2, 0.5, 0.85]).view(1, 3, 1, 1)
    mu = torch.tensor([0.0, -1.0, 1.5]).view(1, 3, 1, 1)
    log_b = torch.tensor([0.0, -0.5, 0.3]).view(1, 3, 1, 1)
    expected = 0.0
    for xi, mi, lb in zip(x.flatten().tolist(), mu.flatten().tolist(), log_b.flatten().tolist()):
        b = math.exp(lb)
        density = 1 / (2 * b * xi * (1 - xi)) * math.exp(-abs(math.log(xi / (1 - xi)) - mi) / b)
        expected -= math.log(density)
    stats = torch.cat([mu, log_b], dim=1)
    assert logit_laplace_nll(x, stats).item() == pytest.approx(expected, rel=1e-5)
    two = logit_laplace_nll(torch.cat([x, x]), torch.cat([stats, stats]))
    assert two.shape == (2,)


def test_reconstruction_losses():
    torch.manual_seed(0)
    x01, stats = torch.rand(2, 3, 4, 4), torch.randn(2, 6, 4, 4)
    pred = (torch.sigmoid(stats[:, :3]) - 0.1) / 0.8
    torch.testing.assert_close(reconstruction_loss("l1", x01, stats), (pred - x01).abs().sum((1, 2, 3)))
    torch.testing.assert_close(reconstruction_loss("mse", x01, stats), (pred - x01).square().sum((1, 2, 3)))
    torch.testing.assert_close(reconstruction_loss("logit_laplace", x01, stats),
                               logit_laplace_nll(map_pixels(x01), stats))
    rec = reconstruction(stats)
    assert rec.shape == (2, 3, 4, 4) and rec.min() >= 0 and rec.max() <= 1
    with pytest.raises(ValueError, match="'l2' is not one of"):
        reconstruction_loss("l2", x01, stats)


def test_save_read_round_trip_and_frozen_tokenizer(tmp_path):
    torch.manual_seed(0)
    encoder = randomise_(Encoder(TINY), seed=1)
    path = save_encoder(encoder, tmp_path / "enc.safetensors", extra_metadata={"step": 12})
    arch, state = read_encoder_file(path)
    assert arch == TINY and state.keys() == encoder.state_dict().keys()
    for k, v in encoder.state_dict().items():
        assert torch.equal(state[k], v)

    tok = FrozenTokenizer(TINY)
    assert tok.weights_sha256 is None
    assert len(load_tokenizer_weights(tok, path)) == 64
    assert not any(p.requires_grad for p in tok.parameters())
    tok.train()
    assert not tok.training  # always eval (DeepSpeed #4922)
    images = torch.rand(2, 3, 16, 16)
    ids = tok(images)
    assert ids.dtype == torch.int64 and ids.shape == (2, 4, 4)
    with torch.no_grad():
        assert torch.equal(ids, encoder(map_pixels(images)).argmax(1))

    with pytest.raises(TokenizerWeightsError, match=r"built for DVAEArch\(group_count=3, n_hid=8, n_blk_per_group=2"):
        load_tokenizer_weights(FrozenTokenizer(DVAEArch(group_count=3, n_hid=8, n_blk_per_group=2, vocab_size=64)),
                               path)


class NotATensor:
    pass


@pytest.mark.parametrize("make, match", [
    (lambda p: p.with_name("absent.pt"), "not found"),
    (lambda p: (p.write_text("not weights"), p)[1], "cannot read"),
    (lambda p: (p.with_suffix(".safetensors").write_bytes(b"\x00" * 3), p.with_suffix(".safetensors"))[1],
     "cannot read"),
    (lambda p: (torch.save({"w": NotATensor()}, p), p)[1], r"pickle that needs code to load \(.*NotATensor\)"),
    (lambda p: (torch.save([torch.zeros(2)], p), p)[1], "not a state dict"),
    (lambda p: (torch.save({"head.weight": torch.zeros(2)}, p), p)[1], "not a DALL-E dVAE encoder"),
    (lambda p: (torch.save({k.replace(".weight", ".w"): v for k, v in Decoder(TINY).state_dict().items()}, p), p)[1],
     "a decoder"),
])
def test_bad_files_raise_one_line_errors_naming_the_file(tmp_path, make, match):
    path = make(tmp_path / "weights.pt")
    with pytest.raises(TokenizerWeightsError, match=match) as info:
        read_encoder_file(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_missing_keys_are_named(tmp_path):
    state = {k.replace(".weight", ".w").replace(".bias", ".b"): v for k, v in Encoder(TINY).state_dict().items()}
    del state["blocks.group_2.block_2.res_path.conv_3.b"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(TokenizerWeightsError, match=r"missing: blocks\.group_2\.block_2\.res_path\.conv_3\.bias"):
        read_encoder_file(tmp_path / "partial.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_dalle_layout_written_by_hand(tmp_path, suffix):
    """DALL-E's key layout (`w`/`b`) written from our module, so loading is tested without `dall_e`."""
    torch.manual_seed(0)
    ours = randomise_(Encoder(TINY), seed=2)
    state = {k.replace(".weight", ".w").replace(".bias", ".b"): v for k, v in ours.state_dict().items()}
    path = tmp_path / f"dalle{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    arch, loaded = read_encoder_file(path)
    assert arch == DVAEArch(group_count=3, n_hid=16, n_blk_per_group=2, vocab_size=64)  # n_init: default
    twin = Encoder(arch)
    twin.load_state_dict(loaded, strict=True)
    x = map_pixels(torch.rand(2, 3, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(twin(x), ours(x), atol=0, rtol=0)


def test_matches_the_dall_e_package(tmp_path):
    """dall_e's own Encoder and Decoder (random weights) through our loader and modules. Its
    constructor asserts n_hid >= 64 and vocab_size >= 512 and always builds 4 groups."""
    # dall-e is a test dependency ([dev] extra): a missing package fails here, it does not skip
    from dall_e.decoder import Decoder as DalleDecoder
    from dall_e.encoder import Encoder as DalleEncoder

    torch.manual_seed(0)
    ref = randomise_(DalleEncoder(n_hid=64, n_blk_per_group=1, vocab_size=512), seed=3).eval()
    torch.save(ref.state_dict(), tmp_path / "encoder.pt")
    arch, state = read_encoder_file(tmp_path / "encoder.pt")
    assert arch == DVAEArch(group_count=4, n_hid=64, n_blk_per_group=1, vocab_size=512)
    tok = FrozenTokenizer(arch)
    tok.encoder.load_state_dict(state, strict=True)
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ref_logits = ref(map_pixels(images))
        torch.testing.assert_close(tok.encoder(map_pixels(images)), ref_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(tok(images), ref_logits.argmax(1))

    ref_dec = randomise_(DalleDecoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512), seed=4).eval()
    dec = Decoder(DVAEArch(group_count=4, n_hid=64, n_blk_per_group=1, vocab_size=512, n_init=32))
    dec.load_state_dict(convert_dalle_state_dict(ref_dec.state_dict()), strict=True)
    codes = gumbel_softmax(torch.randn(2, 512, 4, 4), tau=1.0, hard=True)
    with torch.no_grad():
        torch.testing.assert_close(dec(codes), ref_dec(codes), atol=1e-5, rtol=1e-5)
