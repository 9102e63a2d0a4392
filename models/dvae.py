"""The discrete VAE of DALL-E (Ramesh et al. 2021), the image tokenizer of BEiT.

The encoder maps an image to logits over `vocab_size` codes on a grid 2**(group_count - 1) times
coarser (8x for DALL-E's 4 groups); the decoder maps a (relaxed) one-hot code grid back to the
parameters of a logit-Laplace distribution per pixel value. Pixels enter the network mapped into
[eps, 1 - eps] (`map_pixels`), where the logit of the logit-Laplace is finite.

Module names follow DALL-E's `dall_e` package (`blocks.input`, `blocks.group_1.block_1.res_path
.conv_1`, `id_path`, `blocks.output.conv`), so its state dicts differ from ours only in `w`/`b`
vs `weight`/`bias` (`convert_dalle_state_dict`). DALL-E's released `encoder.pkl` is a pickled
module, which `weights_only` loading refuses: save its `state_dict()` once, where you trust it.

Weights files (`read_encoder_file`): our safetensors export carries the architecture in its
metadata; DALL-E-layout state dicts (.pt/.pth/.bin, or .safetensors without our metadata) have
it inferred from their keys and shapes. Every failure is a one-line `TokenizerWeightsError` that
names the file.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from .teachers import FrozenWeightsError, load_frozen, state_mismatch

LOGIT_LAPLACE_EPS = 0.1
ENCODER_FORMAT = "mimscale-dvae-encoder"
ReconstructionLoss = Literal["logit_laplace", "l1", "mse"]
RECONSTRUCTION_LOSSES = ("logit_laplace", "l1", "mse")


class TokenizerWeightsError(FrozenWeightsError):
    """The tokenizer's weights file is missing, unreadable, or of another architecture."""

    kind = "tokenizer"


@dataclass(frozen=True)
class DVAEArch:
    """Shape of the dVAE; the defaults are DALL-E's."""

    group_count: int = 4
    """Resolution groups; every group but the last halves (encoder) or doubles (decoder) the grid."""
    n_hid: int = 256
    """Width of the first encoder group (last decoder group); group i has 2**i times as many channels."""
    n_blk_per_group: int = 2
    """Residual blocks per group."""
    vocab_size: int = 8192
    """Number of codes."""
    n_init: int = 128
    """Width of the decoder's input projection (the encoder does not use it)."""

    def __post_init__(self):
        for f in fields(self):
            if not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 1:
                raise ValueError(f"DVAEArch.{f.name} must be a positive integer, got {getattr(self, f.name)!r}")
        if self.n_hid % 4:
            raise ValueError(f"DVAEArch.n_hid must be a multiple of 4 (blocks narrow to width/4), got {self.n_hid}")

    @property
    def n_layers(self) -> int:
        return self.group_count * self.n_blk_per_group

    def to_metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> DVAEArch:
        """Inverse of `to_metadata`; other keys are ignored. Raises ValueError if a field is missing."""
        missing = [f.name for f in fields(cls) if f.name not in meta]
        if missing:
            raise ValueError(f"metadata lacks {', '.join(missing)}")
        try:
            return cls(**{f.name: int(meta[f.name]) for f in fields(cls)})
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad architecture in metadata ({e})") from None


def downsampling(arch: DVAEArch) -> int:
    """Image pixels per token along each side."""
    return 2 ** (arch.group_count - 1)


# --------------------------------------------------------------------------- networks


def _conv(n_in: int, n_out: int, k: int) -> nn.Conv2d:
    conv = nn.Conv2d(n_in, n_out, k, padding=(k - 1) // 2)
    # DALL-E's initialisation (N(0, 1 / fan_in), zero bias), so that training from scratch starts as theirs did.
    nn.init.normal_(conv.weight, std=1 / math.sqrt(n_in * k * k))
    nn.init.zeros_(conv.bias)
    return conv


class ResBlock(nn.Module):
    """id_path(x) + post_gain * res_path(x). The residual path narrows to n_out / 4 channels; its
    kernel sizes are (3, 3, 3, 1) in the encoder and (1, 3, 3, 3) in the decoder."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_mid = n_out // 4
        widths = [n_in, n_mid, n_mid, n_mid, n_out]
        self.post_gain = 1 / n_layers**2  # keeps the sum of all residual branches near unit scale
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        layers = []
        for i, k in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", _conv(widths[i], widths[i + 1], k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(n_in: int, n_out: int, arch: DVAEArch, kernels: tuple[int, int, int, int],
           resample: tuple[str, nn.Module] | None) -> nn.Sequential:
    """n_blk_per_group blocks (the first one changes the width), then the optional resampling layer."""
    blocks = [(f"block_{j + 1}", ResBlock(n_in if j == 0 else n_out, n_out, arch.n_layers, kernels))
              for j in range(arch.n_blk_per_group)]
    return nn.Sequential(OrderedDict(blocks + ([resample] if resample else [])))


class Encoder(nn.Module):
    """Mapped pixels [B, 3, H, W] -> code logits [B, vocab_size, H / d, W / d], d = downsampling(arch)."""

    def __init__(self, arch: DVAEArch):
        super().__init__()
        self.arch = arch
        G, widths = arch.group_count, [arch.n_hid * 2**i for i in range(arch.group_count)]
        layers = [("input", _conv(3, arch.n_hid, 7))]
        for i in range(G):
            pool = ("pool", nn.MaxPool2d(kernel_size=2)) if i < G - 1 else None
            layers.append((f"group_{i + 1}", _group(widths[max(i - 1, 0)], widths[i], arch, (3, 3, 3, 1), pool)))
        output = OrderedDict(relu=nn.ReLU(), conv=_conv(widths[-1], arch.vocab_size, 1))
        layers.append(("output", nn.Sequential(output)))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x_mapped: torch.Tensor) -> torch.Tensor:
        return self.blocks(x_mapped)


class Decoder(nn.Module):
    """Codes [B, vocab_size, h, w] (one-hot or relaxed) -> logit-Laplace statistics [B, 6, h * d, w * d]:
    location mu (channels 0-2) and log-scale (3-5) per colour channel, in the logit of mapped pixels."""

    def __init__(self, arch: DVAEArch):
        super().__init__()
        self.arch = arch
        G, widths = arch.group_count, [arch.n_hid * 2 ** (arch.group_count - 1 - i) for i in range(arch.group_count)]
        layers = [("input", _conv(arch.vocab_size, arch.n_init, 1))]
        for i in range(G):
            up = ("upsample", nn.Upsample(scale_factor=2, mode="nearest")) if i < G - 1 else None
            n_in = arch.n_init if i == 0 else widths[i - 1]
            layers.append((f"group_{i + 1}", _group(n_in, widths[i], arch, (1, 3, 3, 3), up)))
        output = OrderedDict(relu=nn.ReLU(), conv=_conv(widths[-1], 2 * 3, 1))
        layers.append(("output", nn.Sequential(output)))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.blocks(codes)


class DiscreteVAE(nn.Module):
    def __init__(self, arch: DVAEArch):
        super().__init__()
        self.arch = arch
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)

    def forward(self, x_mapped: torch.Tensor, tau: float, hard: bool = False,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (code logits [B, V, h, w], decoder statistics [B, 6, H, W]) for a Gumbel-softmax sample."""
        logits = self.encoder(x_mapped)
        return logits, self.decoder(gumbel_softmax(logits, tau, hard=hard, generator=generator))


# --------------------------------------------------------------------------- pixels, sampling, losses


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps]: the logit-Laplace needs pixel values away from 0 and 1."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


def gumbel_softmax(logits: torch.Tensor, tau: float, hard: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel-softmax sample over the code axis (dim 1) of logits [B, V, ...], in their dtype.
    hard: one-hot in the forward, the soft sample's gradient in the backward (straight-through)."""
    # torch's F.gumbel_softmax takes no generator; the noise is drawn in fp32 even for bf16 logits.
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(u.clamp_(min=torch.finfo(torch.float32).tiny)))
    soft = ((logits.float() + gumbel) / tau).softmax(dim=1)
    if hard:
        one_hot = torch.zeros_like(soft).scatter_(1, soft.argmax(dim=1, keepdim=True), 1.0)
        soft = one_hot - soft.detach() + soft
    return soft.to(logits.dtype)


def logit_laplace_nll(x_mapped: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood [B] of mapped pixels [B, 3, H, W] under the logit-Laplace with location
    stats[:, :3] and log-scale stats[:, 3:]: density 1 / (2 b x (1 - x)) exp(-|logit(x) - mu| / b)."""
    x, mu, log_b = x_mapped.float(), stats[:, :3].float(), stats[:, 3:].float()
    nll = math.log(2) + log_b + torch.log(x) + torch.log1p(-x) + (torch.logit(x) - mu).abs() * torch.exp(-log_b)
    return nll.flatten(1).sum(1)


def reconstruction(stats: torch.Tensor) -> torch.Tensor:
    """The decoded image in [0, 1]: the logit-Laplace's median, unmapped."""
    return unmap_pixels(torch.sigmoid(stats[:, :3].float()))


def reconstruction_loss(kind: ReconstructionLoss, x01: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Per image [B], summed (not averaged) over its 3 * H * W pixel values, for images x01 in [0, 1]."""
    if kind == "logit_laplace":
        return logit_laplace_nll(map_pixels(x01.float()), stats)
    if kind not in ("l1", "mse"):
        raise ValueError(f"reconstruction loss {kind!r} is not one of {', '.join(RECONSTRUCTION_LOSSES)}")
    # Unmapped without unmap_pixels' clamp, which would stop the gradient near black and white.
    pred = (torch.sigmoid(stats[:, :3].float()) - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)
    diff = pred - x01.float()
    return (diff.abs() if kind == "l1" else diff.square()).flatten(1).sum(1)


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q(z | x) || uniform over V) [B], summed over latent positions: sum_z q log q + log V."""
    log_q = logits.float().log_softmax(dim=1)
    return ((log_q.exp() * log_q).sum(1) + math.log(logits.shape[1])).flatten(1).sum(1)


def code_stats(tokens: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (perplexity, usage) of token ids: exp(entropy) of their histogram (V when all codes are
    equally frequent, 1 for a single code) and the fraction of codes used at least once; 0-d tensors."""
    flat = tokens.flatten()  # (not bincount: it reads the largest id on the host, a GPU sync per step)
    counts = torch.zeros(vocab_size, device=flat.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    p = counts / counts.sum()
    perplexity = torch.exp(-torch.special.xlogy(p, p).sum())
    return perplexity, (counts > 0).float().mean()


# --------------------------------------------------------------------------- frozen tokenizer


class FrozenTokenizer(nn.Module):
    """A dVAE encoder that is never trained: images in [0, 1] -> token ids, without gradients."""

    def __init__(self, arch: DVAEArch):
        super().__init__()
        self.arch = arch
        self.encoder = Encoder(arch)
        self.weights_sha256: str | None = None  # set when weights are loaded
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTokenizer:
        return super().train(False)  # a no_grad module in train mode upsets ZeRO-3 (DeepSpeed #4922)

    def load_weights(self, path: str | Path) -> str:
        """Load `path` strictly (partitioned or not) -> the file's sha256, also kept as `weights_sha256`."""
        return load_tokenizer_weights(self, path)

    def read_weights(self, path: str | Path) -> dict[str, torch.Tensor]:
        """The file's tensors under this module's own parameter names; refuses another architecture."""
        arch, state = read_encoder_file(path)
        if arch != self.arch:
            raise TokenizerWeightsError(f"{path}: a tokenizer of architecture {arch}, the run was built for "
                                        f"{self.arch}")
        return {f"encoder.{k}": v for k, v in state.items()}

    @torch.no_grad()
    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> int64 token ids [B, H / d, W / d]."""
        x = map_pixels(images01.float()).to(self.encoder.blocks.input.weight.dtype)
        return self.encoder(x).argmax(dim=1)


# --------------------------------------------------------------------------- weights files


def convert_dalle_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DALL-E's parameter names (its Conv2d's `w`, `b`) -> ours (`weight`, `bias`); other keys unchanged."""
    rename = {"w": "weight", "b": "bias"}
    out = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        out[f"{head}.{rename[leaf]}" if head and leaf in rename else key] = value
    return out


def infer_arch(state: dict[str, torch.Tensor], path: str | Path) -> DVAEArch:
    """The encoder architecture of a state dict in our names (n_init left at its default)."""
    first, last = state.get("blocks.input.weight"), state.get("blocks.output.conv.weight")
    if first is None or last is None:
        raise TokenizerWeightsError(f"{path}: not a DALL-E dVAE encoder state dict (no blocks.input / "
                                    f"blocks.output.conv weights; {len(state)} keys, e.g. {next(iter(state), '')})")
    if first.ndim != 4 or first.shape[1] != 3:
        raise TokenizerWeightsError(f"{path}: blocks.input has shape {tuple(first.shape)}, not that of an encoder's "
                                    "input convolution (3 input channels): a decoder?")
    groups = {k.split(".")[1] for k in state if k.startswith("blocks.group_")}
    blocks = {k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")}
    try:
        return DVAEArch(group_count=len(groups), n_hid=first.shape[0], n_blk_per_group=len(blocks),
                        vocab_size=last.shape[0])
    except ValueError as e:
        raise TokenizerWeightsError(f"{path}: cannot infer the encoder architecture ({e})") from None


def check_encoder_state(state: dict[str, torch.Tensor], arch: DVAEArch, path: str | Path) -> None:
    """Strict key and shape check of `state` against `Encoder(arch)`."""
    # Shapes come from a weightless twin: a ZeRO-3 partitioned encoder has none of its own.
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in Encoder(arch).named_parameters()}
    mismatch = state_mismatch(state, expected)
    if mismatch:
        raise TokenizerWeightsError(
            f"{path}: does not fit the dVAE encoder (groups {arch.group_count}, blocks/group {arch.n_blk_per_group}, "
            f"n_hid {arch.n_hid}, vocab {arch.vocab_size}); {mismatch}")


def _read_tensors(path: Path) -> tuple[object, dict[str, str]]:
    """-> (the loaded object, safetensors metadata or {})."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        if isinstance(e, pickle.UnpicklingError):  # torch's message tells how to run the file's code: not here
            code = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            if code:
                raise TokenizerWeightsError(
                    f"{path}: a pickle that needs code to load ({code[1]}), refused by weights_only; if it is "
                    "DALL-E's encoder.pkl (a pickled module), save its state_dict() once where you trust it") from None
            raise TokenizerWeightsError(f"{path}: cannot read tokenizer weights (not a torch file)") from None
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise TokenizerWeightsError(f"{path}: cannot read tokenizer weights ({type(e).__name__}: {first})") from None


def read_encoder_file(path: str | Path, check: bool = True) -> tuple[DVAEArch, dict[str, torch.Tensor]]:
    """-> (architecture, state dict in `Encoder`'s names) from our export or a DALL-E-layout file.
    State dicts wrapped in {"state_dict"|"model": ...}, with a "module." prefix, or of a whole
    `DiscreteVAE` ("encoder." keys) are unwrapped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TokenizerWeightsError(f"{path}: tokenizer weights file not found")
    state, meta = _read_tensors(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TokenizerWeightsError(f"{path}: not a state dict of tensors ({type(state).__name__})")
    if all(k.startswith("module.") for k in state):  # DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("encoder.") for k in state):  # a whole DiscreteVAE
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if meta.get("format") == ENCODER_FORMAT:
        try:
            arch = DVAEArch.from_metadata(meta)
        except ValueError as e:
            raise TokenizerWeightsError(f"{path}: {e}") from None
    else:
        state = convert_dalle_state_dict(state)
        arch = infer_arch(state, path)
    if check:  # (not inside deepspeed.zero.Init: it partitions even the meta-device twin the check builds)
        check_encoder_state(state, arch, path)
    return arch, state


def save_encoder(encoder: Encoder, path: str | Path, extra_metadata: dict | None = None) -> Path:
    """The encoder alone, as one safetensors file with its architecture in the metadata. Written to a
    temporary name and renamed, so `path` is never half-written. Under ZeRO-3, gather the parameters first."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": ENCODER_FORMAT, **encoder.arch.to_metadata(),
            **{str(k): str(v) for k, v in (extra_metadata or {}).items()}}
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


@torch.no_grad()
def read_encoder_arch(path: str | Path, check: bool = True) -> DVAEArch:
    """The architecture of a tokenizer file (for config checks and for building the network before
    its weights are loaded); raises TokenizerWeightsError as `read_encoder_file`."""
    return read_encoder_file(path, check)[0]


def load_tokenizer_weights(tokenizer: FrozenTokenizer, path: str | Path) -> str:
    """Load `path` into `tokenizer` strictly (partitioned under ZeRO-3 or not: `load_frozen`) and
    return the file's sha256. A file of another architecture or vocabulary is refused."""
    tokenizer.weights_sha256 = load_frozen(tokenizer, path, tokenizer.read_weights, TokenizerWeightsError)
    return tokenizer.weights_sha256
