"""The training run, top to bottom: engine, data, resume, steps, checkpoints, kNN."""

from __future__ import annotations

import json
import logging
import resource
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data.digits import resolve_builtin
from data.pipeline import FAILURE_KINDS, PositionMismatch, build_train_loader, labelled_batches
from data.shards import expand_shards
from data.transforms import normalize, normalize_batch
from evaluation.features import extract_features
from evaluation.knn import knn_classify, percent
from models.teachers import TeacherWeightsError

from . import resharding
from .checkpoint import Checkpointer, CheckpointError, rng_state, set_rng_state
from .config import Config, dump_yaml, to_dict
from .distributed import DistEnv, cuda_index
from .engine import apply_schedule, build_engine, init_distributed
from .faults import JobDeadline, StepGuard
from .grad_clip import PerParamClip
from .methods import frozen_files
from .metrics import MetricsWriter
from .plan.flops import step_flops
from .plan.memory import warn_if_over
from .plan.workload import build_meta
from .schedules import Schedules
from .timing import StepTimer, throughput

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def knn_eval(cfg: Config, engine, device: torch.device, dtype: torch.dtype, env: DistEnv) -> float | None:
    """Weighted kNN of the method's evaluation features: train split -> val split."""
    if not cfg.data.val_shards:
        return None
    val_urls = expand_shards(cfg.data.val_shards)
    train_urls = expand_shards(cfg.data.train_shards)
    size, a = cfg.data.global_crops.size, cfg.data.augment
    method = engine.module

    def prepare(images):
        return normalize(images.to(device), a.mean, a.std, dtype)

    dummy = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    feats = {}
    method.eval()
    for name, urls in (("train", train_urls), ("val", val_urls)):
        batches = labelled_batches(urls, size, cfg.eval.batch_size, env.rank, env.world_size)
        feats[name] = extract_features(method.eval_features, batches, prepare, dummy, device=device)
    method.train()
    k = cfg.eval.knn_k
    return knn_classify(*feats["train"], *feats["val"], ks=(k,), temperature=cfg.eval.knn_temp)[k]["top1"]


def evaluate(cfg: Config, engine, device: torch.device, dtype: torch.dtype, env: DistEnv, run_dir: Path,
             step: int) -> dict[str, float]:
    """What tells a user the network is good: kNN on the held-out split (methods with
    `eval_features`), and a method's own measures on the held-out images (`held_out_metrics`: the
    tokenizer's PSNR, iTPN's pixel loss and reconstructions)."""
    method = engine.module
    out = {"knn": knn_eval(cfg, engine, device, dtype, env)} if hasattr(method, "eval_features") else {}
    if not hasattr(method, "held_out_metrics") or not cfg.data.val_shards:
        return out
    batches = labelled_batches(expand_shards(cfg.data.val_shards), cfg.data.global_crops.size, cfg.eval.batch_size,
                               env.rank, env.world_size)
    method.eval()
    with torch.no_grad():
        out.update(method.held_out_metrics((images.to(device) for images, _ in batches), run_dir, step,
                                           cfg.data.global_crops.size))
    method.train()
    return out


def raw_pixel_knn(cfg: Config, env: DistEnv, device: torch.device) -> float | None:
    """The same kNN on the images themselves (at the global crop size, mean-centred, cosine): what a
    learned feature has to beat to be worth anything on this data."""
    if not cfg.data.val_shards:
        return None
    feats = {}
    for name, shards in (("train", cfg.data.train_shards), ("val", cfg.data.val_shards)):
        batches = labelled_batches(expand_shards(shards), cfg.data.global_crops.size, cfg.eval.batch_size, env.rank,
                                   env.world_size)
        feats[name] = extract_features(lambda x: x.flatten(1), batches, lambda x: x.to(device).float() / 255,
                                       torch.zeros(1, 3, 1, 1, dtype=torch.uint8), device=device)
    mean = feats["train"][0].mean(dim=0)
    k = cfg.eval.knn_k
    return knn_classify(feats["train"][0] - mean, feats["train"][1], feats["val"][0] - mean, feats["val"][1],
                        ks=(k,), temperature=cfg.eval.knn_temp)[k]["top1"]


def data_failures(counters, device: torch.device) -> dict[str, int]:
    """Loader failures by kind, summed over ranks (a collective: every rank calls it at the same step)."""
    counts = torch.tensor([float(counters.get(k, 0)) for k in FAILURE_KINDS], device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    per_kind = {f"data_{k}": int(v) for k, v in zip(FAILURE_KINDS, counts.tolist())}
    return {"data_failures": sum(per_kind.values()), **per_kind}


def mean_over_ranks(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """{name: sum over this rank's micro-batches} -> the mean over micro-batches and ranks (a collective)."""
    names = sorted(sums)
    values = torch.stack([sums[k].detach().float() for k in names]) / count
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(names, values.tolist()))


def size_run(cfg: Config, ds_config: dict, env: DistEnv, device: torch.device) -> float | None:
    """Rank 0, before the engine: the method on the meta device (a second for a ViT-G), once for both
    the memory plan (a GPU run that cannot fit warns) and the model FLOPs per optimizer step (-> the
    count; the ranks are alike). Estimates: one that fails is a warning, never a stopped run."""
    try:
        meta = build_meta(cfg)
        if device.type == "cuda":
            warn_if_over(cfg, ds_config, env.world_size, method=meta)
        return step_flops(cfg, meta)["total"]
    except Exception as e:  # noqa: BLE001
        log.warning("could not size this run (memory plan, FLOPs per step): %s: %s", type(e).__name__, e)
        return None


def breakdown(record: dict) -> str:
    """' (data 3% fwd 30% bwd 55% opt 10% ema 2%, 41.2 TFLOP/s, MFU 41.7%)' of a metrics record."""
    total = record["step_time_s"]
    parts = [f"{short} {100 * record[f'time_{k}_s'] / total:.0f}%" for k, short in
             (("data", "data"), ("forward", "fwd"), ("backward", "bwd"), ("optimizer", "opt"), ("ema", "ema"))
             if f"time_{k}_s" in record and total > 0]
    if "model_tflops_per_s" in record:
        parts.append(f"{record['model_tflops_per_s']:.3g} TFLOP/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    return f" ({', '.join(parts)})" if parts else ""


def train(cfg: Config, ds_config: dict, env: DistEnv, resume: str | None = None, stop_at: int | None = None,
          stop_after: int | None = None) -> dict:
    run_dir = Path(cfg.run.output_dir).expanduser()
    cfg.data.train_shards, cfg.data.val_shards = resolve_builtin(
        cfg.data.train_shards, cfg.data.val_shards, cfg.data.cache_dir)
    env.export()
    init_distributed()
    # Not cuda:LOCAL_RANK: under `srun --gpus-per-task=1` every task sees one GPU, its cuda:0.
    device = (torch.device("cuda", cuda_index(env.local_rank, torch.cuda.device_count()))
              if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = DTYPES[cfg.run.precision]

    flops_per_step = size_run(cfg, ds_config, env, device) if env.rank == 0 else None
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep)
    source = Path(resume) if resume else ckpt.latest()
    # Written by another number of ranks: DeepSpeed's universal checkpoint (trainer/resharding.py),
    # which the engine must be built to load.
    saved_ranks = resharding.saved_world_size(source) if source is not None else 0
    reshard = source is not None and (source / "COMPLETE").is_file() and saved_ranks != env.world_size
    if reshard:
        if ds_config.get("zero_optimization", {}).get("stage") != 3:
            raise CheckpointError(f"{source} was written by {saved_ranks} ranks, this run has "
                                  f"{env.world_size}: resuming on another number of ranks needs ZeRO stage 3 "
                                  "(--ds_config zero3.json), or the same number of ranks")
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    engine, ema = build_engine(cfg, ds_config, cfg.run.seed)
    loader = build_train_loader(cfg.data, patch_size=cfg.model.patch_size, seed=cfg.run.seed, rank=env.rank,
                                world_size=env.world_size, pin_memory=device.type == "cuda")
    schedules = Schedules.from_config(cfg, type(engine.module))
    metrics = MetricsWriter(run_dir, enabled=env.rank == 0, tensorboard=cfg.log.tensorboard)
    # Rank 0 alone watches the time limit (one squeue call, not one per rank); the guard's
    # all-reduce makes every rank stop with it.
    deadline = JobDeadline.from_job(cfg.checkpoint.before_time_limit_s) if env.rank == 0 else None
    guard = StepGuard(cfg.optim.max_consecutive_skips, deadline=deadline)
    if env.rank == 0:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))

    method = engine.module
    frozen = {name: getattr(method, name) for name in frozen_files(cfg)}
    step, summary = 0, {}
    global_batch = cfg.data.batch_size * cfg.optim.grad_accum * env.world_size
    if source is not None:
        if reshard:
            universal = resharding.convert(source)
            parts = resharding.merged_parts(source, env.rank, env.world_size, ema)
            saved = json.loads(parts["config"])
            log.warning("%s was written by %d ranks; resumed on %d through a universal checkpoint. The global "
                        "batch is now %d images (it was %d): the schedules go on by step, the lr is not rescaled",
                        source, saved_ranks, env.world_size, global_batch,
                        saved["data"]["batch_size"] * saved["optim"]["grad_accum"] * saved_ranks)
        else:
            parts = ckpt.read_parts(source)
        for name, path in frozen_files(cfg).items():
            sha, saved = frozen[name].weights_sha256, str(parts.get(f"{name}_sha256"))
            if saved != sha:
                raise TeacherWeightsError(
                    f"{path} (sha256 {sha[:12]}), the frozen {name}'s weights, is not the file {source} was trained "
                    f"with (sha256 {saved[:12]}); point the config at that file")
        if reshard:
            resharding.load_engine(engine, universal)
        else:
            ckpt.load_engine(engine, source)
        step = parts["step"]
        if ema is not None:
            ema.load_state_dict(parts["ema"])
        if reshard:
            d = parts["data"]
            loader.restart(d["restart_epoch"], d["counters"])
            log.warning("data: %d samples taken by %d ranks' streams; the %d new ones start epoch %d (no sample "
                        "seen is shown again before it; what no old stream reached in the epoch before is skipped)",
                        d["consumed"], d["saved_ranks"], env.world_size * max(1, cfg.data.num_workers),
                        d["restart_epoch"])
        else:
            try:
                loader.load_state_dict(parts["data"])
            except PositionMismatch as e:  # e.g. data.num_workers changed: the model state is still good
                log.warning("%s; the data stream starts over from its first epoch", e)
        for name, buf in method.named_buffers():
            buf.copy_(parts["buffers"][name])
        set_rng_state(parts["rng"])
        if parts.get("rng_reseed") is not None:  # a new rank beyond the old count: not a copy of another's draws
            resharding.reseed(parts["rng_reseed"])
        summary = parts.get("summary", {})
        guard.skipped = parts.get("skipped_steps", 0)
        log.info("resumed from %s at step %d", source, step)
    elif cfg.eval.knn_at_end:
        untrained = evaluate(cfg, engine, device, dtype, env, run_dir, 0)
        summary.update({f"{k}_random_init": v for k, v in untrained.items()})
        if hasattr(method, "eval_features"):
            summary["knn_raw_pixels"] = raw_pixel_knn(cfg, env, device)

    def save() -> None:
        parts = {"data": loader.state_dict(), "buffers": dict(method.named_buffers()), "rng": rng_state(),
                 "summary": summary, "config": json.dumps(to_dict(cfg)), "skipped_steps": guard.skipped,
                 "command": command}
        if ema is not None:
            parts["ema"] = ema.state_dict()
        for name, module in frozen.items():  # frozen networks are not saved: they are reloaded from their files
            parts[f"{name}_sha256"] = module.weights_sha256
        path = ckpt.save(engine, step, parts)
        log.info("saved %s", path)

    # What produced this run, for the exported model card (this rank's own argv; the launcher is not visible).
    command = shlex.join(["python", *sys.argv]) + (f"  # on {env.world_size} ranks" if env.world_size > 1 else "")
    weights = method.loss_weights

    def logged(k: str) -> str:  # a method's outputs beside its loss terms are metrics (BEiT's accuracy)
        return f"loss_{k}" if k in weights else k

    clipper = None
    if cfg.optim.clip_grad > 0 and cfg.optim.clip_mode == "per_param":
        clipper = PerParamClip([(n, p) for n, p in method.named_parameters() if p.requires_grad], cfg.optim.clip_grad)
    timer = StepTimer(cfg.log.sync_timing, device)
    a = cfg.data.augment
    batches = iter(loader)
    window_start, window_steps = time.perf_counter(), 0
    # Loss sums over the applied steps since the last log line: one step's loss on a small batch
    # is too noisy to compare across lines (a skipped step's non-finite loss stays out).
    window_sums: dict[str, torch.Tensor] = {}
    window_count = 0
    last = min(cfg.schedule.steps, stop_at or cfg.schedule.steps, step + (stop_after or cfg.schedule.steps))
    stopped_by = None
    while step < last:
        step_start = time.perf_counter()
        timer.start_step(logged_next=(step + 1) % cfg.log.every_steps == 0 or step + 1 == cfg.schedule.steps)
        values = schedules.at(step)
        apply_schedule(engine.optimizer, values)
        # The method's running statistics (iBOT's centers) move in its forward; a skipped step undoes them.
        before = [b.clone() for b in method.buffers() if b.is_floating_point()]
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.optim.grad_accum):
            with timer.phase("data"):
                batch = normalize_batch(next(batches), a.mean, a.std, device, dtype)
            with timer.phase("forward"):
                losses = engine(batch, {**values, "step": step, "micro_step": step * cfg.optim.grad_accum + micro})
                loss = sum(weights[k] * v for k, v in losses.items() if k in weights)
            with timer.phase("backward"):
                engine.backward(guard.check(loss))
            for k, v in {"loss": loss, **{logged(k): v for k, v in losses.items()}}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            with timer.phase("optimizer"):
                if clipper is not None and engine.is_gradient_accumulation_boundary():
                    clipper(getattr(engine.optimizer, "loss_scale", 1.0))
                engine.step()
        step += 1
        window_steps += 1
        if deadline is not None:
            deadline.observe(time.perf_counter() - step_start)
        if guard.record(engine.was_step_applied(), step, losses, ckpt.latest):
            if ema is not None:
                with timer.phase("ema"):
                    ema.update(values["momentum"])
            for k, v in sums.items():
                window_sums[k] = window_sums.get(k, 0.0) + v
            window_count += cfg.optim.grad_accum
        else:
            for b, saved in zip((b for b in method.buffers() if b.is_floating_point()), before):
                b.copy_(saved)
        if step % cfg.log.every_steps == 0 or step == cfg.schedule.steps:
            elapsed = time.perf_counter() - window_start
            # What was optimised: the weighted total and its terms, averaged over the micro-batches,
            # the ranks and the applied steps since the last line (NaN when every one was skipped).
            losses_mean = (mean_over_ranks(window_sums, window_count) if window_count else
                           {k: float("nan") for k in sums})
            record = {**losses_mean, "lr": values["lr"],
                      "weight_decay": values["weight_decay"], "momentum": values["momentum"],
                      **{k: values[k] for k in method.logged_schedules},
                      "images_per_s": window_steps * global_batch / elapsed,
                      "step_time_s": elapsed / window_steps, "epoch": loader.epoch,
                      "skipped_steps": guard.skipped, **data_failures(loader.counters, device),
                      **timer.window(), **({"model_flops_per_step": flops_per_step} if flops_per_step else {}),
                      **throughput(flops_per_step, elapsed / window_steps, device)}
            if device.type == "cuda":
                record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            else:
                record["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            metrics.write(step, record)
            shown = " ".join(f"{k} {record[logged(k)]:.4f}" for k in losses)
            log.info("step %d/%d loss %.4f (%s) lr %.2e %.0f img/s %.2fs/step%s", step, cfg.schedule.steps,
                     record["loss"], shown, record["lr"], record["images_per_s"], record["step_time_s"],
                     breakdown(record))
            window_start, window_steps = time.perf_counter(), 0
            window_sums, window_count = {}, 0
        every = cfg.eval.knn_every_steps
        if every and step % every == 0 and step < cfg.schedule.steps and cfg.data.val_shards:
            t0 = time.perf_counter()
            result = evaluate(cfg, engine, device, dtype, env, run_dir, step)
            metrics.write(step, result)
            if "knn" in result:
                log.info("step %d: kNN top-1 %.2f%% (k=%d, held-out split; random init %s, raw pixels %s; %.0f s)",
                         step, result["knn"], cfg.eval.knn_k, percent(summary.get("knn_random_init")),
                         percent(summary.get("knn_raw_pixels")), time.perf_counter() - t0)
            window_start += time.perf_counter() - t0  # keep the evaluation out of the step time
        if guard.stop_requested:
            log.warning("%s: saving step %d and stopping; the same command resumes",
                        guard.signal_name or "a stop signal on another rank", step)
            stopped_by = guard.signal_name or "signal"
            break
        if step % cfg.checkpoint.every_steps == 0 and step < cfg.schedule.steps:
            save()
    finished = step >= cfg.schedule.steps
    if finished and not stopped_by and cfg.eval.knn_at_end and not {"knn", "psnr"} & set(summary):
        summary.update(evaluate(cfg, engine, device, dtype, env, run_dir, step))
    newest = ckpt.latest()
    if newest is None or newest.name != f"step{step:08d}":  # not already saved by the loop
        save()
    metrics.write(step, {k: v for k, v in summary.items() if v is not None})
    metrics.close()
    if dist.is_initialized():
        dist.barrier()
    if env.rank == 0:  # what a job script reads to decide: done, or requeue / hand over to the next job
        status = {"state": "finished" if finished else "stopped", "step": step, "steps": cfg.schedule.steps,
                  "stopped_by": stopped_by or (None if finished else "step limit"),
                  "checkpoint": str(ckpt.latest()), "time": time.time()}
        (run_dir / "status.json").write_text(json.dumps(status) + "\n")
    return {**summary, "step": step, "stopped_by": stopped_by}
