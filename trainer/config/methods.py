"""The methods' sections: iBOT (and iBOT + CLIP), MaskAlign, and the frozen teacher they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .fields import _at_least, _check_prob, _check_range, opt, require

IBOT = "bytedance/ibot"


@dataclass
class IBOTConfig:
    """Defaults are main_ibot.py's argument defaults unless the help says otherwise."""

    out_dim: int = opt(8192, f"Prototypes K of the [CLS] head ({IBOT} main_ibot.py --out_dim 8192, at every size).")
    patch_out_dim: int | None = opt(None, "Prototypes of the patch head when it is not shared (--patch_out_dim); "
                                          "null: out_dim. With shared_head_teacher it must equal out_dim: iBOT "
                                          "ignores it then.")
    shared_head: bool = opt(True, "One projection head for [CLS] and patch tokens (--shared_head true, as every "
                                  "recipe in iBOT's README; main_ibot.py's own default is false).")
    separate_patch_mlp: bool = opt(
        False, f"With shared_head false: false = iBOT's iBOTHead, one MLP and a second prototype layer for patches "
               f"({IBOT} models/head.py, last_layer2); true = DINOv2's separate_head, a whole second head "
               "(facebookresearch/dinov2 ssl_meta_arch.py).")
    shared_head_teacher: bool = opt(
        True, f"With shared_head false: the EMA teacher keeps one shared head, so its patch targets come from its "
              f"[CLS] prototypes and the student's patch prototypes have no teacher twin ({IBOT} "
              "--shared_head_teacher, default true). false: the teacher mirrors the student (DINOv2).")
    head_hidden_dim: int = opt(2048, "Hidden width of the 3-layer head MLP.")
    head_norm: Literal["none", "bn", "ln"] = opt(
        "none", f"Norm after each hidden layer of the head MLP ({IBOT} main_ibot.py --norm_in_head, default none). "
                "bn: batch statistics over every token of a forward on every rank (iBOT's SyncBatchNorm; its "
                "teacher uses batch statistics too), the head run on all tokens as iBOT runs it.")
    head_bottleneck_dim: int = opt(256, "Bottleneck before the prototypes.")
    norm_last_layer: bool = opt(True, "Fix the prototype norms to 1 (more stable; False for ViT-S in iBOT).")
    prototype_init: Literal["linear", "trunc_normal"] = opt(
        "linear", f"Initial prototype directions: 'linear' = nn.Linear's default (kaiming-uniform, row norm about "
                  f"0.58), as iBOT's and DINO's weight_norm(nn.Linear) ({IBOT} models/head.py); 'trunc_normal': "
                  "std 0.02 (row norm about 0.32 at 256 inputs).")
    student_temp: float = opt(0.1, "Student softmax temperature.")
    teacher_temp: tuple[float, float] = opt(
        (0.04, 0.04), "[CLS] teacher temperature: warm-up start and final value (--warmup_teacher_temp 0.04, "
                      "--teacher_temp 0.04; iBOT's README recipes warm it to 0.07).")
    teacher_patch_temp: tuple[float, float] = opt(
        (0.04, 0.07), "Patch teacher temperature: warm-up start and final value (--warmup_teacher_patch_temp 0.04, "
                      "--teacher_patch_temp 0.07).")
    teacher_temp_warmup_steps: int = opt(37_500, "Steps of linear warm-up of both teacher temperatures "
                                                 "(--warmup_teacher_temp_epochs 30: 30 epochs of IN-1k at 1024).")
    center_momentum: float = opt(0.9, "Momentum of the teacher output centers ([CLS] and patch).")
    ema_momentum: tuple[float, float] = opt((0.996, 1.0), "Teacher EMA momentum: start and end of a cosine.")
    cls_weight: float = opt(1.0, "Weight of L_CLS in the optimised loss.")
    mim_weight: float = opt(1.0, "Weight of L_MIM in the optimised loss.")
    freeze_last_layer_steps: int = opt(1250, "Prototype layer gets lr 0 for these first steps (one epoch).")
    clip_weight: float = opt(1.0, "method ibot_clip: weight of the frozen-teacher feature distillation term.")
    clip_loss: Literal["cosine", "smooth_l1"] = opt(
        "cosine", "method ibot_clip: distance between predicted and (normalised) teacher features.")

    def validate(self) -> None:
        _at_least(self, 1, "out_dim", "head_hidden_dim", "head_bottleneck_dim")
        if self.patch_out_dim is not None:
            _at_least(self, 1, "patch_out_dim")
        _at_least(self, 0, "student_temp", strict=True)
        for name in ("teacher_temp", "teacher_patch_temp"):
            require(all(t > 0 for t in getattr(self, name)), name, "must be > 0")
        require(0 <= self.center_momentum < 1, "center_momentum", f"{self.center_momentum} is outside [0, 1)")
        _check_range(self.ema_momentum, "ema_momentum", 0.0, 1.0)
        _at_least(self, 0, "teacher_temp_warmup_steps", "freeze_last_layer_steps")
        require(self.cls_weight >= 0 and self.mim_weight >= 0, "cls_weight", "loss weights must be >= 0")
        _at_least(self, 0, "clip_weight")
        if not self.shared_head and self.shared_head_teacher:
            require(self.patch_out_dim in (None, self.out_dim), "patch_out_dim",
                     f"{self.patch_out_dim}: with shared_head_teacher the teacher scores patches with its [CLS] "
                     f"prototypes, so it must equal out_dim ({self.out_dim})")


@dataclass
class FrozenTeacherConfig:
    arch: str = opt("ViT-L-14", "An open_clip image tower (ViT-B-16, ViT-L-14, ViT-H-14, ViT-g-14; add -quickgelu "
                                "for OpenAI's weights), clip_vit_tiny (CPU tests), or any timm ViT name (a DINO "
                                "teacher: vit_base_patch16_224.dino).")
    weights: str | None = opt(None, "Local weights file: open_clip .pt/.bin (whole CLIP or its visual tower), a "
                                    "timm/DINO state dict, or .safetensors. Never downloaded.")
    blocks: list[int] = opt([], "Teacher blocks whose outputs are targets (0-based; negative counts from the end). "
                                "Empty: the method's default (maskalign: the last 5, MaskAlign's --loss_weights top5; "
                                "ibot_clip: the last).")
    mean: tuple[float, float, float] | None = opt(None, "Teacher input normalisation mean; null: the arch's own.")
    std: tuple[float, float, float] | None = opt(None, "Teacher input normalisation std; null: the arch's own.")
    antialias: bool = opt(False, "Resize the teacher's input and position embeddings with antialiasing (timm's "
                                 "default). false: bicubic without, as MaskAlign does (OpenDriveLab/MaskAlign "
                                 "models_pretrain.py: forward_clip, resize_pos_embed).")
    replicate: bool = opt(False, "Under ZeRO-3, keep the frozen teacher whole on every rank (bf16, outside the "
                                 "engine: never gathered) instead of partitioned and gathered block by block at "
                                 "each forward. Costs its full size per GPU (ViT-L/14 0.6 GiB, bigG/14 3.4 GiB) and "
                                 "saves that size in all-gather traffic per rank per micro-batch: worth it "
                                 "whenever that memory is free (scripts/plan_memory.py shows it). The reference "
                                 "code (DDP) always holds it whole.")


@dataclass
class TeacherConfig:
    clip: FrozenTeacherConfig = opt(FrozenTeacherConfig(), "The frozen teacher of maskalign and ibot_clip.")


MASKALIGN = "OpenDriveLab/MaskAlign"


@dataclass
class MaskAlignConfig:
    """Defaults follow the official code's ViT-B recipe (README: --mask_type attention --mask_ratio 0.7
    --loss_weights top5 --head_type linear --fusion_type linear --loss_type smoothl1 --target_norm whiten)."""

    mask_ratio: float = opt(0.7, "Fraction r of patches the student never sees; it encodes int(N * (1 - r)) "
                                 "(int() as the reference).")
    masking: Literal["attentive", "random"] = opt(
        "attentive", "attentive: visible patches chosen by the teacher's last-block [CLS] attention; random: uniform.")
    attentive_sampling: Literal["multinomial", "topk"] = opt(
        "multinomial", f"How attentive masking picks the visible patches: sampled without replacement with "
                       f"probabilities proportional to the attention ({MASKALIGN} models_pretrain.py "
                       "attention_masking: torch.multinomial), or the top-k.")
    student_blocks: list[int] = opt([], "Student blocks fed to the alignment (0-based, negative from the end); "
                                        "empty: all.")
    adapter_on: Literal["teacher_level", "student_level"] = opt(
        "teacher_level", f"teacher_level: W mixes the student's block outputs, then one adapter per teacher level "
                         f"maps the mix ({MASKALIGN} models_pretrain.py get_student); student_level: one adapter per "
                         "student block, then W mixes the adapted features (the paper: y_j = sum_i w_ij A_i(x_i)).")
    adapter: Literal["linear", "mlp"] = opt(
        "linear", "Adapter: one linear layer (--head_type linear) or the paper's light 2-layer MLP (GELU).")
    adapter_hidden_dim: int = opt(0, "Hidden width of the 2-layer adapters; 0: the student's width (as the "
                                     "reference's --head_type mlp).")
    dynamic: bool = opt(True, "Learn W (false: fixed at its start value, the paper's layer-wise alignment).")
    w_offset: float = opt(0.01, f"W starts at the layer-wise mapping (student level at the same relative depth) plus "
                                f"this constant everywhere ({MASKALIGN}: torch.eye(depth) + 0.01).")
    align_cls: bool = opt(True, "Align the [CLS] token too (the reference concatenates it with the visible patches).")
    pos_embed: Literal["sincos", "learned"] = opt(
        "sincos", "Student position embeddings: fixed 2-D sin-cos in MAE's layout (the reference, built on MAE), "
                  "or learned.")
    loss_beta: float = opt(1.0, "Smooth-L1 transition point (the paper's loss: 1).")
    align_weight: float = opt(2.0, f"Weight of the alignment loss (the mean over levels of smooth-L1); "
                                   f"{MASKALIGN} forward_loss adds 2 * F.smooth_l1_loss.")

    def validate(self) -> None:
        require(0.0 < self.mask_ratio < 1.0, "mask_ratio", f"{self.mask_ratio} is outside (0, 1)")
        _at_least(self, 0, "adapter_hidden_dim", "w_offset", "align_weight")
        _at_least(self, 0, "loss_beta", strict=True)


BEIT = "microsoft/unilm beit/"


@dataclass
class BEiTConfig:
    """Defaults are run_beit_pretraining.py's (microsoft/unilm beit/) unless the help says otherwise."""

    tokenizer: str | None = opt(None, "The frozen tokenizer: a dVAE encoder exported by scripts/export_tokenizer.py "
                                      "(.safetensors, architecture in its metadata), or a state dict in OpenAI "
                                      "DALL-E's Encoder layout (blocks.*.w/b; .pt/.bin/.safetensors). Never "
                                      "downloaded; pickled modules (DALL-E's encoder.pkl) are refused: convert them.")
    vocab_size: int = opt(8192, "Visual tokens the tokenizer's codebook has (the head's classes); the tokenizer "
                                "file must agree.")
    layer_scale: float = opt(0.1, f"LayerScale init of every block ({BEIT} --layer_scale_init_value: 0.1 for base, "
                                  "1e-5 for large); 0: off. Replaces model.layer_scale for this method.")
    rel_pos_bias: Literal["shared", "per_block", "none"] = opt(
        "shared", f"Relative position bias: one table shared by all blocks ({BEIT} --rel_pos_bias, default), one per "
                  "block, or none.")
    abs_pos_embed: bool = opt(False, f"Absolute (learned) position embeddings too ({BEIT} --abs_pos_emb, default "
                                     "false).")
    qkv_bias: Literal["qv", "qkv", "none"] = opt(
        "qv", f"Attention input biases: query and value only, no key bias ({BEIT} modeling_finetune.py Attention), "
              "all three (timm), or none.")
    init: Literal["beit", "timm"] = opt(
        "beit", f"beit: N(0, 0.02) truncated at +-0.02 and each block's output projections divided by sqrt(2 * layer) "
                f"({BEIT} modeling_pretrain.py fix_init_weight); timm: timm's ViT init.")

    def validate(self) -> None:
        _at_least(self, 2, "vocab_size")
        _at_least(self, 0, "layer_scale")


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
        _at_least(self, 1, "group_count", "n_blk_per_group", "n_init")
        _at_least(self, 4, "n_hid")
        require(self.n_hid % 4 == 0, "n_hid", f"{self.n_hid} must be divisible by 4 (blocks narrow to n_out / 4)")
        _at_least(self, 2, "vocab_size")
        require(all(t > 0 for t in self.temperature), "temperature", "must be > 0")
        require(all(w >= 0 for w in self.kl_weight), "kl_weight", "must be >= 0")
        _at_least(self, 0, "temperature_steps", "kl_steps")
        _check_prob(self.min_code_usage, "min_code_usage")


ITPN = "sunsmarterjie/iTPN"


@dataclass
class ITPNConfig:
    """Defaults are the reference's pixel recipe (itpn_pixel: itpn_base_dec512d8b, --mask_ratio 0.75)
    unless the help says otherwise; model.arch must be a HiViT (hivit_base, hivit_large, ...)."""

    teacher: Literal["ema", "clip", "none"] = opt(
        "none", f"Target of masked feature modelling: none = pixels only ({ITPN} itpn_pixel), ema = the moving-"
                f"averaged backbone (the paper's MFM; its code is not public), clip = the frozen teacher.clip.* "
                f"({ITPN} itpn_clip).")
    mask_ratio: float = opt(0.75, "Fraction of patches dropped before the first stage; int(N * (1 - r)) are "
                                  f"encoded, uniformly random per image ({ITPN} itpn_pixel --mask_ratio 0.75).")
    pos_embed: Literal["sincos", "learned"] = opt(
        "sincos", "Absolute position embeddings: learned from MAE's 2-D sin-cos table (itpn_pixel), or learned from "
                  "trunc-normal 0.02 (itpn_clip, which adds a relative bias not built here).")
    layer_scale: float = opt(0.0, f"LayerScale init of the backbone's blocks (MLP and attention); 0: off (itpn_pixel; "
                                  f"{ITPN} itpn_clip --layer_scale_init_value 0.1).")
    fpn_dim: int = opt(256, "Width F of the pyramid levels.")
    fpn_depth: int = opt(2, f"MLP fusion blocks per top-down step (itpn_pixel: 2; {ITPN} itpn_clip: 1).")
    decoder_dim: int = opt(512, "Width of the pixel decoder (dec512d8b).")
    decoder_depth: int = opt(8, "Transformer blocks of the pixel decoder (dec512d8b).")
    decoder_heads: int = opt(16, "Attention heads of the pixel decoder (decoder_num_heads 16).")
    norm_pix_loss: bool = opt(True, "Pixel targets normalised per patch by its mean and std (MAE's norm_pix_loss, "
                                    "on in itpn_pixel).")
    pixel_weight: float = opt(1.0, f"Weight of the pixel term (the MSE over masked patches); 0 turns the pixel "
                                   f"decoder off ({ITPN} itpn_clip trains without it).")
    mfm_dim: int = opt(256, "Width of each level's feature decoder. No reference exists for decoding dropped "
                            "patches' features (itpn_clip keeps [MASK] tokens in the backbone instead): ours.")
    mfm_depth: int = opt(2, "Transformer blocks of each level's feature decoder (ours, see mfm_dim).")
    mfm_heads: int = opt(8, "Attention heads of each level's feature decoder.")
    mfm_weights: tuple[float, float, float] = opt(
        (1.0, 1.0, 1.0), "Weights of the feature terms of the pyramid levels at strides 16, 8 and 4 (0 leaves a level "
                         f"out). {ITPN} itpn_clip: one CLIP target for the fused levels, weight 1.")
    mfm_loss: Literal["smooth_l1", "cosine"] = opt(
        "smooth_l1", f"Distance to the LayerNorm'ed teacher features ({ITPN} itpn_clip: nn.SmoothL1Loss()).")
    mfm_positions: Literal["all", "masked"] = opt(
        "all", f"Patches whose features are reconstructed: every patch ({ITPN} itpn_clip: 'we supervise all tokens as "
               "default') or the masked ones only.")
    ema_momentum: tuple[float, float] = opt((0.996, 1.0), "teacher ema: momentum, start and end of a cosine (as "
                                                          "iBOT's).")

    def validate(self) -> None:
        require(0.0 < self.mask_ratio < 1.0, "mask_ratio", f"{self.mask_ratio} is outside (0, 1)")
        _at_least(self, 1, "fpn_dim", "fpn_depth", "decoder_dim", "decoder_depth", "decoder_heads", "mfm_dim",
                  "mfm_depth", "mfm_heads")
        for name in ("decoder", "mfm"):
            dim, heads = getattr(self, f"{name}_dim"), getattr(self, f"{name}_heads")
            require(dim % 16 == 0 and dim % heads == 0, f"{name}_dim",
                     f"{dim} must be divisible by 16 (the stride-4 level's 16 inner tokens) and by {heads} heads")
        _at_least(self, 0, "layer_scale", "pixel_weight")
        require(all(w >= 0 for w in self.mfm_weights), "mfm_weights", "must be >= 0")
        _check_range(self.ema_momentum, "ema_momentum", 0.0, 1.0)
        require(self.pixel_weight > 0 or (self.teacher != "none" and any(self.mfm_weights)), "pixel_weight",
                 "0 with no feature term (teacher none or every mfm_weights 0) leaves nothing to train")
