"""The run's sections: run, model, data, optimizer, schedule, checkpoints, logging, evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .fields import at_least, check_prob, check_range, opt, require

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class SpikeGuardConfig:
    enabled: bool = opt(
        False, "Roll back a loss spike: reload the newest complete checkpoint before it, move the data past the "
               "steps since (recorded in rollbacks.jsonl), go on. No reference trainer does this; false: today's "
               "behaviour (a non-finite step is skipped, optim.max_consecutive_skips of them stop the run).")
    window: int = opt(200, "Applied steps each loss term's running median and MAD are taken over.")
    min_history: int = opt(50, "Steps of history before a step can be called a spike.")
    factor: float = opt(
        10.0, "A step is a spike when its loss, or any term of it (means over ranks), exceeds the window's median "
              "by more than factor x max(1.4826 MAD, rel_floor x |median|). Upward only.")
    rel_floor: float = opt(0.02, "Smallest deviation the factor multiplies, as a fraction of |median| (a loss with "
                                 "almost no spread would otherwise call any rise a spike).")
    nonfinite_steps: int = opt(
        3, "This many non-finite (skipped) steps in a row roll back too; at most optim.max_consecutive_skips.")
    lr_scale: float = opt(1.0, "After a rollback the lr is multiplied by this for lr_scale_steps steps.")
    lr_scale_steps: int = opt(0, "Steps the lower lr lasts after a rollback (0: none).")
    max_rollbacks: int = opt(3, "Rollbacks allowed within rollback_window steps; one more stops the run with a line "
                                "naming the steps (a spike that comes back is not data, and would loop).")
    rollback_window: int = opt(10_000, "Steps over which max_rollbacks counts.")

    def validate(self) -> None:
        at_least(self, 3, "window", "min_history")
        at_least(self, 0, "factor", "rel_floor", "lr_scale", strict=True)
        at_least(self, 1, "nonfinite_steps", "max_rollbacks", "rollback_window")
        at_least(self, 0, "lr_scale_steps")
        require(self.min_history <= self.window, "min_history", f"{self.min_history} exceeds window ({self.window})")


@dataclass
class RunConfig:
    output_dir: str = opt("runs/default", "Run directory: checkpoints, metrics.jsonl, TensorBoard events, log.")
    seed: int = opt(0, "Global seed; data order, augmentations and masks are pure functions of it.")
    precision: Literal["bf16", "fp16", "fp32"] = opt(
        "bf16", "Training precision of the student. fp32 is true fp32 everywhere, the Triton attention's dots "
                "included (IEEE, not tl.dot's default TF32), as torch's matmuls default to.")
    kernels: Literal["auto", "triton", "torch"] = opt(
        "auto", "Attention / softmax-CE implementations: 'torch' (PyTorch references), 'triton' (Triton kernels "
                "where written; a CUDA GPU, or TRITON_INTERPRET=1 on the CPU) or 'auto' (the kernels on a CUDA GPU "
                "where a start-up self-check against the references passes, the references elsewhere).")
    spike_guard: SpikeGuardConfig = opt(SpikeGuardConfig(), "Rolling back a loss spike (trainer/spike_guard.py).")
    compile: Literal["off", "blocks", "model"] = opt(
        "off", "torch.compile (inductor) of the student (trainer/compile.py): 'blocks' compiles each backbone block "
               "(under ZeRO-3 each a leaf module gathered whole; one graph, no break), 'model' the student's "
               "networks whole (ZeRO stage 0-2 only). The Triton attention is a custom op inside the graph. "
               "DINOv3 (facebookresearch/dinov3 ssl_default_config.yaml train.compile: true), timm --torchcompile; "
               "off: iBOT's, DINOv2's and BEiT's eager runs.")

    def validate(self) -> None:
        require(bool(self.output_dir.strip()), "output_dir", "must not be empty")
        if self.kernels == "triton":
            from models.kernels import triton_available

            ok, why = triton_available()
            require(ok, "kernels", f"'triton' cannot run here: {why}; use 'torch' or 'auto'")
        at_least(self, 0, "seed")


@dataclass
class ModelConfig:
    arch: str = opt("vit_small", "Backbone name from the model registry (vit_tiny, vit_small ... vit_gigantic; "
                                 "hivit_tiny, hivit_base, hivit_large for method itpn).")
    patch_size: int = opt(16, "Patch size in pixels; crop sizes must be multiples of it.")
    drop_path: float = opt(0.1, "Stochastic depth rate of the last block (linear over depth).")
    drop_path_uniform: bool = opt(
        False, "Every block drops its residual branches at drop_path, not a rate rising linearly to it over depth "
               "(facebookresearch/dinov2 dinov2/configs/ssl_default_config.yaml student.drop_path_uniform: true; "
               "iBOT, timm: linear).")
    ffn: Literal["mlp", "swiglu"] = opt(
        "mlp", "Each block's feed-forward: 'mlp' (GELU, the arch's MLP width) or 'swiglu' (SiLU-gated, timm's "
               "SwiGLUPacked layout, hidden width DINOv2's rule (int(2/3 * MLP width) + 7) // 8 * 8: "
               "facebookresearch/dinov2 dinov2/layers/swiglu_ffn.py, ffn_layer: swiglufused in "
               "dinov2/configs/train/vitg14.yaml).")
    registers: int = opt(
        0, "Learned register tokens after [CLS], dropped at the output (Darcet et al., 'Vision Transformers Need "
           "Registers'; facebookresearch/dinov2 student.num_register_tokens, 4 in its *_reg4 models).")
    layer_scale: float | None = opt(None, "LayerScale init value (e.g. 1e-5 for giant models); null: off.")
    grad_checkpointing: int = opt(0, "Recompute every k-th block in backward (1: every block; 0: off).")
    sharded_init: bool = opt(False, "Build the model under deepspeed.zero.Init (no rank holds all weights; "
                                    "use for ViT-H and larger under ZeRO-3).")
    pos_embed_interp: Literal["dino", "timm"] = opt(
        "dino", "How position embeddings are resampled for another grid (local crops): 'dino' = bicubic without "
                "antialias at scale (n + 0.1) / N, as iBOT, DINO and DINOv2 (bytedance/ibot "
                "models/vision_transformer.py interpolate_pos_encoding; DINOv2 interpolate_offset 0.1, "
                "interpolate_antialias false); 'timm' = timm's resample_abs_pos_embed (bicubic, antialias, to size).")

    def validate(self) -> None:
        from models.archs import ARCHS

        known = list(ARCHS)
        require(self.arch in known, "arch", f"{self.arch!r} is not one of {', '.join(known)}")
        at_least(self, 0, "patch_size", strict=True)
        require(0.0 <= self.drop_path < 1.0, "drop_path", f"{self.drop_path} is outside [0, 1)")
        at_least(self, 0, "grad_checkpointing", "registers")


@dataclass
class CropConfig:
    number: int = opt(2, "How many crops of this kind per image.")
    size: int = opt(224, "Output side in pixels (square).")
    scale: tuple[float, float] = opt((0.32, 1.0), "RandomResizedCrop area range, as fractions of the image.")
    second_size: int | None = opt(
        None, "Global crops only: also give each crop at this side, cut from the same box (BEiT: 112, the tokenizer's "
              "view of the 224 crop, lanczos; colour jitter and flip then come before the crop, as microsoft/unilm "
              "beit/datasets.py DataAugmentationForBEiT). null: one size.")

    def validate(self) -> None:
        at_least(self, 0, "number")
        if self.second_size is not None:
            at_least(self, 0, "second_size", strict=True)
        at_least(self, 0, "size", strict=True)
        check_range(self.scale, "scale", 0.0, 1.0)
        require(self.scale[1] > 0, "scale", "upper bound must be > 0")


@dataclass
class AugmentConfig:
    flip_p: float = opt(0.5, "Horizontal flip probability.")
    color_jitter_p: float = opt(0.8, "Probability of applying colour jitter.")
    color_jitter: tuple[float, float, float, float] = opt(
        (0.4, 0.4, 0.2, 0.1), "Colour jitter strengths: brightness, contrast, saturation, hue."
    )
    grayscale_p: float = opt(0.2, "Random grayscale probability.")
    blur_p: list[float] = opt([1.0, 0.1], "Gaussian blur probability of each global crop (iBOT: 1.0, 0.1).")
    local_blur_p: float = opt(0.5, "Gaussian blur probability of each local crop.")
    blur_sigma: tuple[float, float] = opt((0.1, 2.0), "Gaussian blur radius range.")
    solarize_p: list[float] = opt([0.0, 0.2], "Solarisation probability of each global crop (iBOT: 0.0, 0.2).")
    mean: tuple[float, float, float] = opt(IMAGENET_MEAN, "Normalisation mean (RGB).")
    std: tuple[float, float, float] = opt(IMAGENET_STD, "Normalisation std (RGB).")
    photometric: Literal["auto", "worker", "device"] = opt(
        "auto", "Where the colour work (jitter, grayscale, blur, solarisation) runs: 'worker' (PIL in the loader "
                "processes, as the reference code), 'device' (batched on the training device, bit-identical: the "
                "loader workers only decode, crop and flip), 'auto' (device on a CUDA GPU, worker otherwise).")
    resize: Literal["auto", "pil", "torch"] = opt(
        "pil", "Random-resized-crop resampling: 'pil' (torchvision's PIL bicubic, as bytedance/ibot main_ibot.py "
               "DataAugmentationiBOT), 'torch' (torch's "
                "uint8 antialiased bicubic, about 2x faster; within 1 level of PIL's on ~1% of pixels, "
                "tests/unit/test_photometric.py; needs photometric 'device'), 'auto' (torch where photometric is "
                "'device').")

    def validate(self) -> None:
        require(self.resize != "torch" or self.photometric != "worker", "resize",
                 "'torch' needs photometric 'device' (or 'auto' on a GPU): PIL's colour work needs PIL crops")
        for name in ("flip_p", "color_jitter_p", "grayscale_p", "local_blur_p"):
            check_prob(getattr(self, name), name)
        for name in ("blur_p", "solarize_p"):
            for v in getattr(self, name):
                check_prob(v, name)
        b, c, s, h = self.color_jitter
        require(min(b, c, s) >= 0, "color_jitter", "brightness, contrast, saturation must be >= 0")
        require(0 <= h <= 0.5, "color_jitter", f"hue {h} is outside [0, 0.5]")
        check_range(self.blur_sigma, "blur_sigma", 0.0, 100.0)
        require(all(s > 0 for s in self.std), "std", "every entry must be > 0")


@dataclass
class MaskConfig:
    kind: Literal["block", "random"] = opt("block", "BEiT blockwise masks or uniformly random patches.")
    ratio: tuple[float, float] = opt(
        (0.1, 0.5), "Masked fraction of a global view's patches, drawn uniformly per view from this range."
    )
    prob: float = opt(0.5, "Probability that a global view is masked at all (iBOT: 0.5).")
    patches: int | None = opt(None, "Mask exactly this many patches (as far as blocks fit) instead of a ratio: BEiT's "
                                    "--num_mask_patches 75 of 196. null: use `ratio`.")
    min_block_patches: int | None = opt(
        None, "Smallest block, in patches. null: iBOT's (min(h, w) // 3)^2, 16 on a 14 x 14 grid and 25 on 16 x 16 "
              "(bytedance/ibot loader.py); BEiT: 16.")
    min_aspect: float = opt(0.3, "Block aspect ratios are drawn log-uniformly from [min_aspect, 1/min_aspect].")
    fill_exact: bool = opt(
        False, "When no block fits the remaining count, grow the mask patch by patch to exactly int(ratio * h * w). "
               "false: stop short, as iBOT's and BEiT's generators do (bytedance/ibot loader.py, "
               "microsoft/unilm beit/masking_generator.py).")
    spread: bool = opt(
        False, "Draw the masks of a batch's global crops together, as DINOv2 (facebookresearch/dinov2 "
               "dinov2/data/collate.py): exactly int(prob * crops) of them masked, their ratios spread over "
               "linspace(ratio[0], ratio[1]), the rest whole, shuffled. false: each crop on its own with "
               "probability prob (iBOT).")
    max_block_fraction: float | None = opt(
        None, "Cap on the patches one block adds, as a fraction of the grid (DINOv2's MaskingGenerator "
              "max_num_patches = 0.5 * h * w, dinov2/train/train.py). null: no cap (iBOT, BEiT).")

    def validate(self) -> None:
        check_range(self.ratio, "ratio", 0.0, 1.0, hi_open=True)
        if self.max_block_fraction is not None:
            require(0 < self.max_block_fraction <= 1, "max_block_fraction",
                    f"{self.max_block_fraction} is outside (0, 1]")
        check_prob(self.prob, "prob")
        if self.patches is not None:
            at_least(self, 1, "patches")
        if self.min_block_patches is not None:
            at_least(self, 1, "min_block_patches")
        require(0 < self.min_aspect <= 1, "min_aspect", f"{self.min_aspect} is outside (0, 1]")


@dataclass
class DataConfig:
    train_shards: str = opt(
        "builtin:digits",
        "WebDataset shards: a brace pattern, a directory of .tar files, a list file (.txt), a pipe: or "
        "s3:// URL, or builtin:digits (the embedded data set, written to cache_dir on first use).",
    )
    val_shards: str | None = opt(None, "Labelled shards for kNN evaluation; builtin:digits has its own split.")
    batch_size: int = opt(64, "Images per rank per micro-step.")
    num_workers: int = opt(8, "Loader processes per rank; 0 reads in the training process.")
    shuffle_buffer: int = opt(2000, "Samples held per loader process for shuffling (raw bytes, not decoded).")
    shard_retries: int = opt(2, "Extra attempts to open a shard before it is skipped and counted.")
    max_failed_fraction: float = opt(
        0.05, "Stop the run when more than this fraction of the samples read on a rank cannot be used (corrupt or "
              "missing images; judged after 200 samples). Each failure is skipped, counted and logged either way.")
    global_crops: CropConfig = opt(CropConfig(2, 224, (0.32, 1.0)), "Global crops (teacher and student).")
    local_crops: CropConfig = opt(CropConfig(10, 96, (0.05, 0.32)), "Local crops (student only, never masked).")
    augment: AugmentConfig = opt(AugmentConfig(), "Photometric augmentations (DINO/iBOT recipe).")
    mask: MaskConfig = opt(MaskConfig(), "Patch masks of the global crops.")
    s3_command: str = opt("aws s3 cp --quiet {url} -", "Shell command streaming an s3:// URL to stdout.")
    cache_dir: str = opt("~/.cache/mimscale", "Where builtin data sets are written.")

    def validate(self) -> None:
        require(bool(self.train_shards.strip()), "train_shards", "must not be empty")
        at_least(self, 1, "batch_size")
        at_least(self, 0, "num_workers")
        at_least(self, 1, "shuffle_buffer")
        at_least(self, 0, "shard_retries")
        check_prob(self.max_failed_fraction, "max_failed_fraction")
        require(self.global_crops.number >= 1, "global_crops.number", f"{self.global_crops.number} must be >= 1")
        require("{url}" in self.s3_command, "s3_command", "must contain {url}")
        require(self.local_crops.second_size is None, "local_crops.second_size",
                 "only global crops have a second size")
        if self.local_crops.number > 0:
            require(self.local_crops.size < self.global_crops.size, "local_crops.size",
                     f"{self.local_crops.size} must be smaller than global_crops.size "
                     f"({self.global_crops.size})")



@dataclass
class OptimConfig:
    lr: float = opt(5e-4, "Peak learning rate for the whole global batch (no implicit scaling).")
    min_lr: float = opt(1e-6, "Learning rate at the end of the cosine.")
    warmup_steps: int = opt(1000, "Linear learning-rate warm-up, in optimizer steps.")
    decay_steps: int = opt(0, "Optimizer steps from the start to the end of the cosine, after which the rate stays "
                              "at min_lr; 0: the cosine ends at schedule.steps (iBOT, BEiT). DALL-E's dVAE: "
                              "1,200,000 of 3,000,000 updates.")
    weight_decay: tuple[float, float] = opt((0.04, 0.4), "Weight decay at the start and end (cosine).")
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas.")
    eps: float = opt(1e-8, "AdamW epsilon.")
    clip_grad: float = opt(3.0, "Gradient-norm clipping threshold (see clip_mode); 0 disables clipping.")
    clip_mode: Literal["per_param", "global"] = opt(
        "per_param", "per_param: each parameter's gradient is scaled to norm <= clip_grad on its own, as iBOT and "
                     "DINO do (bytedance/ibot utils.py clip_gradients, clip 3.0); global: DeepSpeed's clipping of "
                     "the norm of all gradients together.")
    patch_embed_lr_mult: float = opt(
        1.0, "The patch embedding's lr multiplied by this, on top of layer decay (facebookresearch/dinov2 "
             "dinov2/configs/ssl_default_config.yaml optim.patch_embed_lr_mult 0.2, dinov2/utils/param_groups.py; "
             "iBOT, BEiT: 1).")
    decay_embeddings: bool = opt(
        True, "Weight decay on pos_embed, cls_token and mask_token: only biases and 1-D parameters are exempt, as in "
              "iBOT, DINO and MAE/MaskAlign (bytedance/ibot utils.py get_params_groups). false: also exempt what "
              "the backbone's no_weight_decay() names (timm's convention).")
    grad_accum: int = opt(1, "Micro-steps per optimizer step.")
    layer_decay: float = opt(1.0, "Layer-wise lr decay factor (1.0: off).")
    max_consecutive_skips: int = opt(
        10, "Optimizer steps skipped for a non-finite loss or gradient norm (on any rank) are counted; this many "
            "in a row stop the run, naming the step and the newest checkpoint. fp16 loss-scale overflows count too.")

    def validate(self) -> None:
        at_least(self, 0, "lr", strict=True)
        require(0 <= self.min_lr <= self.lr, "min_lr", f"{self.min_lr} is outside [0, lr={self.lr}]")
        at_least(self, 0, "warmup_steps", "decay_steps")
        require(self.decay_steps == 0 or self.decay_steps > self.warmup_steps, "decay_steps",
                 f"{self.decay_steps} must exceed warmup_steps ({self.warmup_steps}), or be 0")
        require(all(w >= 0 for w in self.weight_decay), "weight_decay", "must be >= 0")
        check_range(self.betas, "betas", 0.0, 1.0, hi_open=True)
        at_least(self, 0, "eps", strict=True)
        at_least(self, 0, "clip_grad")
        at_least(self, 1, "grad_accum")
        require(0 < self.layer_decay <= 1, "layer_decay", f"{self.layer_decay} is outside (0, 1]")
        at_least(self, 0, "patch_embed_lr_mult")
        at_least(self, 1, "max_consecutive_skips")


@dataclass
class ScheduleConfig:
    steps: int = opt(100_000, "Optimizer steps to train for.")

    def validate(self) -> None:
        at_least(self, 1, "steps")


@dataclass
class CheckpointConfig:
    every_steps: int = opt(1000, "Save every N optimizer steps (and at the end).")
    keep: int = opt(3, "Newest checkpoints kept; older ones are deleted after a successful save.")
    before_time_limit_s: int = opt(
        300, "In a Slurm job with a time limit (SLURM_JOB_END_TIME, else squeue's time left), save and stop when "
             "the limit is less than this many seconds plus the longest step seen away, whether or not the job "
             "asked for a warning signal (--signal); 0 turns this off.")

    def validate(self) -> None:
        at_least(self, 1, "every_steps")
        at_least(self, 1, "keep")
        at_least(self, 0, "before_time_limit_s")


@dataclass
class LogConfig:
    every_steps: int = opt(20, "Print and record metrics every N optimizer steps.")
    tensorboard: bool = opt(True, "Write TensorBoard event files into the run directory.")
    pictures: bool = opt(True, "When a run finishes, write curves.png (metrics.jsonl) and attention.png (the "
                               "backbone's [CLS] attention on held-out images) into the run directory.")
    sync_timing: bool = opt(True, "Time each phase of a step (data wait, forward, backward, optimizer, EMA). On a "
                                  "GPU the last step before each log line synchronises at each boundary, so its "
                                  "times are the GPU's (that step loses its overlap; the others keep it); false: "
                                  "whole-step times only.")

    wandb: Literal["off", "online", "offline"] = opt(
        "off", "Weights & Biases from rank 0: the resolved config, every metrics.jsonl record (same keys, same "
               "steps), the held-out results and the run's pictures. 'offline' writes <run>/wandb/ for a later "
               "`wandb sync`. The run id is kept in <run>/tracking.json: a resume, a requeue, a chain's next task "
               "or a reshard go on with the same W&B run. Needs the extra: pip install -e '.[wandb]'.")
    wandb_project: str = opt("mimscale", "W&B project.")
    wandb_entity: str = opt("", "W&B entity (team or user); empty: the API key's default entity.")
    wandb_group: str = opt("", "W&B group (e.g. a sweep's name); empty: none.")
    wandb_tags: list[str] = opt([], "W&B tags.")
    mlflow: bool = opt(False, "MLflow from rank 0, like log.wandb (parameters: the flattened config; metrics; "
                              "pictures as artifacts); the run id kept in <run>/tracking.json. Needs the extra: "
                              "pip install -e '.[mlflow]'.")
    mlflow_uri: str = opt("", "MLflow tracking URI; empty: MLFLOW_TRACKING_URI, else a local store <run>/mlruns.")
    mlflow_experiment: str = opt("mimscale", "MLflow experiment name.")

    def validate(self) -> None:
        at_least(self, 1, "every_steps")
        import importlib.util

        for key, on in (("wandb", self.wandb != "off"), ("mlflow", self.mlflow)):
            require(not on or importlib.util.find_spec(key) is not None, key,
                    f"the {key} package is not installed: pip install -e '.[{key}]'")



@dataclass
class EvalConfig:
    knn_k: int = opt(20, "Neighbours of the weighted kNN (DINO: 20).")
    knn_temp: float = opt(0.07, "Temperature of the kNN vote weights.")
    knn_at_end: bool = opt(True, "Run kNN on val_shards after training (and on the untrained network first).")
    knn_every_steps: int = opt(0, "Also run kNN on val_shards every this many steps and log it as `knn` "
                                  "(metrics.jsonl, TensorBoard): representation quality seen rising; 0: off.")
    batch_size: int = opt(128, "Images per rank per feature-extraction batch.")

    def validate(self) -> None:
        at_least(self, 1, "knn_k")
        at_least(self, 0, "knn_temp", strict=True)
        at_least(self, 1, "batch_size")
        at_least(self, 0, "knn_every_steps")

