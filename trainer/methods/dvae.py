"""BEiT's stage 1: the tokenizer, a discrete VAE with DALL-E's architecture (models/dvae.py), trained
as the DALL-E paper trains it (seed 002; Ramesh et al. 2021, appendix A.2).

One view per image. The encoder's logits over the codebook at each latent position are relaxed
with Gumbel-softmax (temperature annealed 1 -> 1/16 by a half-cosine), the decoder reconstructs the
image from the relaxed codes, and the loss is the negative evidence lower bound per pixel value:
reconstruction (logit-Laplace NLL of the image mapped into [0.1, 0.9]; or L1 / MSE) plus beta times
KL(q(z|x) || uniform), beta ramped 0 -> 6.6. Both are summed per image and divided by its 3 x H x W
values, so beta means what it means in the paper.

What tells a user the tokenizer is any good, on the held-out images: reconstruction PSNR from the
argmax codes (what BEiT will see), against the untrained network and each image's mean colour;
the codebook's perplexity and the fraction of codes used (a collapsed codebook is the usual
failure: a warning below `dvae.min_code_usage`), and `reconstructions.png` in the run directory
(originals above, reconstructions below).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models.dvae import (
    DiscreteVAE,
    DVAEArch,
    code_stats,
    gumbel_softmax,
    kl_to_uniform,
    map_pixels,
    reconstruction,
    reconstruction_loss,
)
from models.teachers import channel_column
from trainer.config.checks import check_single_view
from trainer.config.fields import at_least, check_prob, opt, require
from trainer.schedules import cosine

from .base import ExportSpec, Method, register

DALLE = "openai/DALL-E and its paper (Ramesh et al. 2021, appendix A.2)"


@dataclass
class DVAEConfig:
    """The tokenizer of BEiT's stage 1: DALL-E's discrete VAE. Defaults are DALL-E's."""

    group_count: int = opt(4, f"Encoder/decoder groups; a 2x2 max-pool after each but the last: 4 -> 8x down "
                              f"({DALLE}).")
    n_hid: int = opt(256, "Width of the first group (the groups have 1, 2, 4, 8 x n_hid).")
    n_blk_per_group: int = opt(2, "Residual blocks per group.")
    n_init: int = opt(128, "Width of the decoder's input convolution.")
    vocab_size: int = opt(8192, "Codebook size.")
    temperature: tuple[float, float] = opt((1.0, 1.0 / 16), "Gumbel-softmax relaxation temperature: start and end.")
    temperature_steps: int = opt(150_000, "Steps of the cosine anneal of the temperature (DALL-E: 150,000 updates).")
    kl_weight: tuple[float, float] = opt((0.0, 6.6), "Weight of KL(q(z|x) || uniform): start and end "
                                                     "(DALL-E: 0 -> 6.6).")
    kl_steps: int = opt(5000, "Steps of the cosine ramp of the KL weight (DALL-E: 5,000 updates).")
    recon_loss: Literal["logit_laplace", "l1", "mse"] = opt(
        "logit_laplace", "Reconstruction term: DALL-E's logit-Laplace negative log-likelihood, or L1 / MSE on the "
                         "decoder's location output. Both terms are sums per image divided by its 3 x H x W values.")
    straight_through: bool = opt(False, "Hard one-hot codes in the forward pass with the relaxed gradient "
                                        "(straight-through); false: the soft relaxation, as DALL-E trains.")
    min_code_usage: float = opt(0.05, "Warn when fewer than this fraction of the codes appear in the held-out "
                                      "images' tokens (codebook collapse).")

    def validate(self) -> None:
        at_least(self, 1, "group_count", "n_blk_per_group", "n_init")
        at_least(self, 4, "n_hid")
        require(self.n_hid % 4 == 0, "n_hid", f"{self.n_hid} must be divisible by 4 (blocks narrow to n_out / 4)")
        at_least(self, 2, "vocab_size")
        require(all(t > 0 for t in self.temperature), "temperature", "must be > 0")
        require(all(w >= 0 for w in self.kl_weight), "kl_weight", "must be >= 0")
        at_least(self, 0, "temperature_steps", "kl_steps")
        check_prob(self.min_code_usage, "min_code_usage")



log = logging.getLogger(__name__)


def dvae_arch(cfg) -> DVAEArch:
    d = cfg.dvae
    return DVAEArch(group_count=d.group_count, n_hid=d.n_hid, n_blk_per_group=d.n_blk_per_group,
                    vocab_size=d.vocab_size, n_init=d.n_init)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio of images in [0, 1] from their mean squared errors."""
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


@register("dvae")
class DVAE(Method):
    config_section = ("dvae", DVAEConfig)
    logged_schedules = ("gumbel_temp", "kl_weight")
    family, product, exported_by = "", "tokenizer", "scripts/export_tokenizer.py"
    draws_run_pictures = False  # it draws its reconstructions itself

    def __init__(self, arch: DVAEArch, recon_loss: str = "logit_laplace", straight_through: bool = False,
                 min_code_usage: float = 0.05, input_mean=(0.485, 0.456, 0.406), input_std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.arch = arch
        self.student = nn.ModuleDict({"backbone": DiscreteVAE(arch)})
        self.recon_loss, self.straight_through, self.min_code_usage = recon_loss, straight_through, min_code_usage
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)
        self.loss_weights = {"recon": 1.0, "kl": 1.0}  # "kl" arrives already weighted by its schedule

    @classmethod
    def from_config(cls, cfg) -> DVAE:
        d, a = cfg.dvae, cfg.data.augment
        return cls(dvae_arch(cfg), d.recon_loss, d.straight_through, d.min_code_usage, a.mean, a.std)

    @classmethod
    def export_spec(cls, cfg) -> ExportSpec:
        """The tokenizer's architecture, which export/tokenizer.py rebuilds the encoder with."""
        return ExportSpec(arch=dvae_arch(cfg), about="BEiT's tokenizer (DALL-E's dVAE), stage 1")

    @classmethod
    def schedules(cls, cfg):
        """DALL-E's: the relaxation temperature annealed and the KL weight ramped, both by half-cosines."""
        d = cfg.dvae
        return lambda step: {"gumbel_temp": cosine(step, d.temperature_steps, *d.temperature),
                             "kl_weight": cosine(step, d.kl_steps, *d.kl_weight)}

    @classmethod
    def validate(cls, cfg) -> None:
        check_single_view(cfg)
        d, size = cfg.dvae, cfg.data.global_crops.size
        down = 2 ** (d.group_count - 1)
        require(size % down == 0, "data.global_crops.size", f"{size} is not a multiple of the dVAE's "
                f"down-sampling {down} (dvae.group_count {d.group_count})")
        require(not cfg.model.grad_checkpointing, "model.grad_checkpointing", "the dVAE has no blocks to recompute")

    def plan_calls(self, cfg, s, dt) -> list:
        vae = self.student.backbone

        def student():
            x = torch.empty(s.b, 3, s.global_size, s.global_size, device="meta")
            logits = vae.encoder(map_pixels(x).to(dt)).float()
            return vae.decoder(gumbel_softmax(logits, 1.0, hard=self.straight_through).to(dt)).float()

        return [("dVAE encoder + decoder", student, True, self.student)]

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Loader-normalised images -> [0, 1] (the dVAE maps pixels its own way)."""
        mean = channel_column(tuple(self.input_mean), images.device)
        std = channel_column(tuple(self.input_std), images.device)
        return (images.float() * std + mean).clamp(0, 1)

    def forward(self, batch: dict[str, torch.Tensor], values: dict[str, float]) -> dict[str, torch.Tensor]:
        vae = self.student.backbone
        x01 = self.pixels(batch["global_crops"][0])
        dims = x01[0].numel()
        dtype = vae.encoder.blocks.input.weight.dtype
        logits = vae.encoder(map_pixels(x01).to(dtype)).float()
        codes = gumbel_softmax(logits, values["gumbel_temp"], hard=self.straight_through)
        stats = vae.decoder(codes.to(dtype)).float()
        recon = reconstruction_loss(self.recon_loss, x01, stats).mean() / dims
        kl = kl_to_uniform(logits).mean() / dims
        with torch.no_grad():
            perplexity, usage = code_stats(logits.argmax(dim=1), self.arch.vocab_size)
        return {"recon": recon, "kl": values["kl_weight"] * kl, "kl_per_dim": kl.detach(),
                "batch_perplexity": torch.as_tensor(perplexity, dtype=torch.float32, device=logits.device)}

    @classmethod
    def summary_lines(cls, cfg, summary: dict, run_dir: Path) -> list[str]:
        if summary.get("psnr") is None:
            return []
        return [f"held-out reconstruction PSNR {summary['psnr']:.2f} dB (untrained: {summary['psnr_random_init']:.2f} "
                f"dB; each image's mean colour: {summary['psnr_mean_colour']:.2f} dB), codebook perplexity "
                f"{summary['perplexity']:.1f} of {cfg.dvae.vocab_size}, codes used {100 * summary['usage']:.1f}%"]

    @torch.no_grad()
    def held_out_metrics(self, batches, run_dir: Path, step: int, size: int) -> dict[str, float]:
        """PSNR of the argmax-code reconstructions, the mean-colour baseline, codebook perplexity and
        usage over every held-out image of every rank (uint8 `batches` of side `size`); draws
        `reconstructions.png` on rank 0. Ranks step in lockstep (under ZeRO-3 every forward is
        collective): a rank out of images runs a one-image dummy until all are done."""
        vae = self.student.backbone
        dtype = vae.encoder.blocks.input.weight.dtype
        V = self.arch.vocab_size
        device = vae.encoder.blocks.input.weight.device
        distributed = dist.is_initialized()
        totals = torch.zeros(3, device=device, dtype=torch.float64)  # sum PSNR, sum mean-colour PSNR, images
        histogram = torch.zeros(V, device=device, dtype=torch.float64)
        shown = None

        def reconstruct(x01):
            tokens = vae.encoder(map_pixels(x01).to(dtype)).argmax(dim=1)  # [B, h, w]
            codes = F.one_hot(tokens, V).permute(0, 3, 1, 2).to(dtype)
            return tokens, reconstruction(vae.decoder(codes).float())

        while True:
            images = next(batches, None)
            more = torch.tensor([0.0 if images is None else 1.0], device=device)
            if distributed:
                dist.all_reduce(more)
            if more.item() == 0:
                break
            if images is None:
                reconstruct(torch.zeros(1, 3, size, size, device=device))
                continue
            x01 = images.float() / 255
            tokens, rec = reconstruct(x01)
            colour = x01.mean(dim=(2, 3), keepdim=True).expand_as(x01)
            totals[0] += psnr(((rec - x01) ** 2).flatten(1).mean(1)).sum()
            totals[1] += psnr(((colour - x01) ** 2).flatten(1).mean(1)).sum()
            totals[2] += x01.shape[0]
            histogram += torch.bincount(tokens.flatten(), minlength=V).double()
            if shown is None:
                shown = (x01[:8].cpu(), rec[:8].cpu())
        if distributed:
            dist.all_reduce(totals)
            dist.all_reduce(histogram)
        n = max(totals[2].item(), 1.0)
        p = histogram / histogram.sum().clamp(min=1)
        perplexity = math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())
        usage = (histogram > 0).double().mean().item()
        out = {"psnr": totals[0].item() / n, "psnr_mean_colour": totals[1].item() / n, "perplexity": perplexity,
               "usage": usage}
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if rank0:
            log.info("step %d: held-out PSNR %.2f dB (mean colour %.2f dB), codebook perplexity %.1f of %d, %.1f%% of "
                     "codes used", step, out["psnr"], out["psnr_mean_colour"], perplexity, V, 100 * usage)
            if usage < self.min_code_usage:
                log.warning("step %d: only %.1f%% of the %d codes appear in the held-out tokens (dvae.min_code_usage "
                            "%.1f%%): the codebook is collapsing; a larger dvae.kl_weight or a slower temperature "
                            "anneal (dvae.temperature_steps) usually helps", step, 100 * usage, V,
                            100 * self.min_code_usage)
            if shown is not None:
                draw_reconstructions(*shown, Path(run_dir) / "reconstructions.png", step, out["psnr"])
        return out


def draw_reconstructions(originals: torch.Tensor, recs: torch.Tensor, path: Path, step: int, value: float) -> None:
    """Originals (top row) above their reconstructions from the argmax codes (bottom row)."""
    from evaluation.pictures import image_rows_figure

    image_rows_figure([originals, recs], f"held-out originals (top) and dVAE reconstructions from argmax codes "
                      f"(bottom), step {step}, PSNR {value:.2f} dB", path)
