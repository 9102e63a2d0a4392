"""DeepSpeed JSON configs: find them, and fill in what the YAML config owns.

Batch size, gradient accumulation, clipping, precision and the optimizer's hyper-parameters are
set once, in the YAML, and written into the DeepSpeed dict here. A JSON that sets one of them to
a different value, or leaves anything as "auto", is refused before any process group starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .config import PROJECT_ROOT, Config, ConfigError

DS_CONFIG_DIR = PROJECT_ROOT / "ds_configs"


def resolve_ds_config(name: str) -> Path:
    """A path as given, or a bare name (`zero3`, `zero3.json`) looked up in ds_configs/."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if len(path.parts) == 1:
        for candidate in (DS_CONFIG_DIR / name, DS_CONFIG_DIR / f"{name}.json"):
            if candidate.is_file():
                return candidate
    known = ", ".join(sorted(p.name for p in DS_CONFIG_DIR.glob("*.json")))
    raise ConfigError("--ds_config", name, f"file not found (bare names are looked up in ds_configs/: {known})")


# accelerate's DeepSpeed options (`accelerate launch --zero_stage 3 ...`, or the deepspeed_config section of an
# `accelerate config` file) reach the ranks as these variables (accelerate/utils/launch.py
# prepare_deepspeed_cmd_env): variable -> (the DeepSpeed key it sets, its type, its value when absent)
ACCELERATE_OPTIONS = {
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": ("zero_optimization.stage", int, 0),
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": ("gradient_accumulation_steps", int, 1),
    "ACCELERATE_GRADIENT_CLIPPING": ("gradient_clipping", float, 0.0),
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ("zero_optimization.offload_optimizer.device", str, "none"),
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ("zero_optimization.offload_param.device", str, "none"),
}


def launched_by_accelerate(environ) -> bool:
    """`accelerate launch --use_deepspeed` (or its config's distributed_type DEEPSPEED) started this process."""
    return environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def ds_config_name(ds_config: str | None, environ) -> tuple[str, bool]:
    """The DeepSpeed JSON of this launch -> (its name, whether accelerate chose it): `--ds_config`, else the
    file of `accelerate launch --use_deepspeed --deepspeed_config_file F` (or of an accelerate config's
    deepspeed_config section), else zero3.json. Both given must be the same file."""
    accelerate = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if launched_by_accelerate(environ) else None
    if accelerate and ds_config and resolve_ds_config(ds_config).resolve() != resolve_ds_config(accelerate).resolve():
        raise ConfigError("--ds_config", ds_config, f"accelerate's deepspeed_config_file is {accelerate}: give one "
                                                    "DeepSpeed JSON, or the same file to both")
    return ds_config or accelerate or "zero3.json", bool(accelerate and not ds_config)


def check_accelerate(ds: dict, cfg: Config, environ, source: str) -> None:
    """accelerate's own DeepSpeed options must say what the merged DeepSpeed dict (`ds`) and the YAML say:
    accelerate fills "auto" values of its own config, but this launcher takes the DeepSpeed JSON and the
    YAML as they are, so a flag that disagrees would be silently ignored otherwise."""
    if not launched_by_accelerate(environ):
        return
    for var, (key, kind, absent) in ACCELERATE_OPTIONS.items():
        if not environ.get(var):
            continue
        given = kind(environ[var])
        present, value = _get(ds, key)
        value = value if present else absent
        if not _same(kind(value), given):
            flag = var.removeprefix("ACCELERATE_").removeprefix("DEEPSPEED_").lower()
            raise ConfigError(source, key, f"is {value!r} here but accelerate's {flag} is {given!r}; make them agree "
                                           "(this launcher takes the DeepSpeed JSON and the YAML as they are)")
    precision = {"bf16": "bf16", "fp16": "fp16", "no": "fp32"}.get(environ.get("ACCELERATE_MIXED_PRECISION", "no"))
    if precision and precision != "fp32" and precision != cfg.run.precision:  # (accelerate always sets "no")
        given = environ["ACCELERATE_MIXED_PRECISION"]
        raise ConfigError("run.precision", cfg.run.precision, f"accelerate says mixed_precision {given}; match them")
    init = environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT")
    if init and (init.lower() == "true") != cfg.model.sharded_init:
        raise ConfigError("model.sharded_init", str(cfg.model.sharded_init),
                          f"accelerate's zero3_init_flag is {init}; make them agree")


def owned_values(cfg: Config, world_size: int) -> dict[str, tuple[str, Any]]:
    """DeepSpeed key (dotted) -> (the YAML key that owns it, its value)."""
    o = cfg.optim
    micro, accum = cfg.data.batch_size, o.grad_accum
    return {
        "train_micro_batch_size_per_gpu": ("data.batch_size", micro),
        "gradient_accumulation_steps": ("optim.grad_accum", accum),
        "train_batch_size": (f"data.batch_size x optim.grad_accum x {world_size} ranks", micro * accum * world_size),
        # per_param clipping is ours (trainer/grad_clip.py): DeepSpeed's global clipping is then off
        "gradient_clipping": ("optim.clip_grad", o.clip_grad) if o.clip_mode == "global" else
                             ("optim.clip_mode per_param", 0.0),
        "bf16.enabled": ("run.precision", cfg.run.precision == "bf16"),
        "fp16.enabled": ("run.precision", cfg.run.precision == "fp16"),
        "optimizer.params.lr": ("optim.lr", o.lr),
        "optimizer.params.betas": ("optim.betas", list(o.betas)),
        "optimizer.params.eps": ("optim.eps", o.eps),
        "optimizer.params.weight_decay": ("optim.weight_decay[0]", o.weight_decay[0]),
    }


def build_ds_config(name: str | None, cfg: Config, world_size: int, environ=None) -> dict:
    """Load `name` (None: accelerate's deepspeed_config_file, else zero3.json), check it against `cfg` (and
    against accelerate's DeepSpeed options, where `accelerate launch --use_deepspeed` started this process:
    `environ`), and return the complete DeepSpeed dict."""
    environ = {} if environ is None else environ
    name, _ = ds_config_name(name, environ)
    path = resolve_ds_config(name)
    source = str(path)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(source, "", f"not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(source, "", "top level must be an object")
    _reject_auto(ds, source, "")
    for key, (owner, value) in owned_values(cfg, world_size).items():
        present, current = _get(ds, key)
        if present and not _same(current, value):
            raise ConfigError(source, key, f"is {current!r} here but {owner} gives {value!r}; "
                                           "remove it from the JSON (the launcher fills it from the YAML)")
        _put(ds, key, value)
    ds.setdefault("optimizer", {}).setdefault("type", "AdamW")
    params = ds["optimizer"].setdefault("params", {})
    # torch's AdamW (DeepSpeed's `torch_adam`), so that no run starts by JIT-compiling DeepSpeed's
    # optimizer ops: FusedAdam on a GPU node (nvcc and CUDA_HOME, one rank per node building while
    # the others wait on its lock), cpu_adam under zero3_offload (measured on this project's 2-core
    # machine: a 35 s build, then 40 ms per step for 50M fp32 parameters against 29 ms for torch's
    # fused CPU AdamW). On the CPU, DeepSpeed's CPU FusedAdam op rounds differently depending on where
    # its buffers sit in memory (1-ulp differences in ~60% of the weights on the first step after a
    # resume), so a resumed CPU run would drift; torch's AdamW is exact. A JSON that sets torch_adam
    # or fused keeps its choice.
    if params.get("torch_adam", True):
        params.setdefault("torch_adam", True)
        if torch.cuda.is_available():  # one multi-tensor kernel, on the GPU or on the offloaded CPU states
            params.setdefault("fused", True)
    _check_step_skipping(ds, source, cfg.run.precision)
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") == 3 and zero.get("stage3_param_persistence_threshold", 1) != 0:
        # Persistent parameters stay whole on every rank; the shard-local EMA writes partitions
        # only, so a persistent teacher parameter would never change.
        raise ConfigError(source, "zero_optimization.stage3_param_persistence_threshold",
                          f"{zero.get('stage3_param_persistence_threshold', 'unset (DeepSpeed: 100000)')}"
                          ": must be 0 (the EMA teacher is updated partition by partition)")
    if cfg.run.compile == "model" and zero.get("stage") == 3:
        raise ConfigError(source, "zero_optimization.stage", "3 with run.compile model: under ZeRO-3 compile the "
                                                             "blocks (run.compile blocks), or use ZeRO stage 0-2")
    check_accelerate(ds, cfg, environ, source)
    return ds


def _check_step_skipping(ds: dict, source: str, precision: str) -> None:
    """The loop relies on DeepSpeed skipping an optimizer step whose gradient norm is inf/NaN
    (trainer/faults.py): ZeRO-3 always does; below stage 3 only fp16, and bf16 with
    `bf16.check_grad_overflow` (DeepSpeed's default, made explicit here)."""
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if precision == "bf16":
        if ds["bf16"].get("check_grad_overflow", True) is not True:
            raise ConfigError(source, "bf16.check_grad_overflow", "must be true: a step with a non-finite gradient "
                                                                  "must be skipped, not applied")
        ds["bf16"]["check_grad_overflow"] = True
    elif precision == "fp32" and stage != 3:
        raise ConfigError(source, "zero_optimization.stage",
                          f"{stage} with run.precision fp32: DeepSpeed checks fp32 gradients for inf/NaN only under "
                          "ZeRO stage 3; use stage 3 or run.precision bf16")


def _reject_auto(node: Any, source: str, prefix: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _reject_auto(v, source, f"{prefix}{k}.")
    elif node == "auto":
        raise ConfigError(source, prefix.rstrip("."), '"auto" is not accepted: give a value, or leave the key '
                                                      "out where the YAML config owns it")


def _get(ds: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = ds
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _put(ds: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = ds
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b
