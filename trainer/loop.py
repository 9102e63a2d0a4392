"""The training run, top to bottom: engine, data, resume, steps, checkpoints, kNN."""

from __future__ import annotations

import json
import logging
import math
import resource
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data.digits import resolve_builtin
from data.pipeline import FAILURE_KINDS, build_train_loader
from data.transforms import normalize_batch
from evaluation.knn import percent

from .checkpoint import Checkpointer
from .compile import CompileReport
from .config import Config, dump_yaml
from .distributed import DistEnv, cuda_index
from .engine import apply_schedule, build_engine, init_distributed
from .faults import JobDeadline, StepGuard
from .grad_clip import PerParamClip
from .held_out import evaluate, raw_pixel_knn
from .metrics import MetricsWriter
from .plan.flops import step_flops
from .plan.memory import warn_if_over
from .plan.workload import build_meta
from .resume import Resume, client_state
from .schedules import Schedules
from .spike_guard import SpikeGuard, record_rollback, skipped_keys_file, write_skipped_keys
from .timing import StepTimer, throughput

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def logged_name(term: str, loss_weights: dict) -> str:
    """A loss term is logged as `loss_<term>`; a method's other outputs are metrics under their own
    names (BEiT's token accuracy)."""
    return f"loss_{term}" if term in loss_weights else term


class LogWindow:
    """What one log line averages: each output's sum over the applied steps since the last line (one
    step's loss on a small batch is too noisy to compare across lines; a skipped step's non-finite
    loss stays out), and the steps and wall time the line covers."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.sums, self.micro_batches = time.perf_counter(), 0, {}, 0

    def add(self, sums: dict[str, torch.Tensor], micro_batches: int) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.micro_batches += micro_batches

    def means(self, names) -> dict[str, float]:
        """The means over micro-batches and ranks (a collective); NaN if every step was skipped."""
        return mean_over_ranks(self.sums, self.micro_batches) if self.micro_batches else dict.fromkeys(names, math.nan)


def float_buffers(method) -> list[torch.Tensor]:
    """The method's running statistics (iBOT's centers): they move in its forward, so a skipped step undoes them."""
    return [b for b in method.buffers() if b.is_floating_point()]


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


def log_record(cfg: Config, values: dict, window: dict[str, float], window_steps: int, elapsed: float,
               global_batch: int, loader, guard: StepGuard, timer: StepTimer, logged_schedules: tuple,
               flops_per_step: float | None, device: torch.device) -> dict:
    """One log line's record: the optimised losses (`window`, means over micro-batches, ranks and the
    applied steps since the last line), the schedules, throughput, data failures, phases, memory."""
    record = {**window, "lr": values["lr"], "weight_decay": values["weight_decay"],
              **{k: values[k] for k in ("momentum", *logged_schedules) if k in values},
              "images_per_s": window_steps * global_batch / elapsed, "step_time_s": elapsed / window_steps,
              "epoch": loader.epoch, "skipped_steps": guard.skipped, **data_failures(loader.counters, device),
              **timer.window(), **({"model_flops_per_step": flops_per_step} if flops_per_step else {}),
              **throughput(flops_per_step, elapsed / window_steps, device)}
    if device.type == "cuda":
        record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        record["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return record


def write_status(run_dir: Path, cfg: Config, step: int, finished: bool, stopped_by: str | None,
                 latest: Path | None) -> None:
    """status.json: what a job script reads to decide (done, or requeue / hand over to the next job)."""
    status = {"state": "finished" if finished else "stopped", "step": step, "steps": cfg.schedule.steps,
              "stopped_by": stopped_by or (None if finished else "step limit"), "checkpoint": str(latest),
              "time": time.time()}
    (run_dir / "status.json").write_text(json.dumps(status) + "\n")


def setup_device(env: DistEnv) -> torch.device:
    """The process group and this rank's device: not cuda:LOCAL_RANK, since under `srun
    --gpus-per-task=1` every task sees one GPU, its cuda:0 (trainer.distributed.cuda_index)."""
    env.export()
    init_distributed()
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", cuda_index(env.local_rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


def optimizer_step(engine, batches, values: dict, step: int, cfg: Config, timer: StepTimer, guard: StepGuard,
                   clipper, device: torch.device, dtype: torch.dtype, seen: list | None = None) -> tuple[dict, dict]:
    """One optimizer step over `optim.grad_accum` micro-batches: -> (the last micro-batch's outputs,
    each output's sum over the micro-batches with the weighted total as "loss", under its logged name).
    `seen`: gets the keys of the samples trained on (the spike guard's record of what it skips)."""
    weights, a = engine.module.loss_weights, cfg.data.augment
    sums: dict[str, torch.Tensor] = {}
    for micro in range(cfg.optim.grad_accum):
        with timer.phase("data"):
            batch = normalize_batch(next(batches), a.mean, a.std, device, dtype)
        if seen is not None:
            seen.extend(batch.get("keys", []))
        with timer.phase("forward"):
            losses = engine(batch, {**values, "step": step, "micro_step": step * cfg.optim.grad_accum + micro})
            loss = sum(weights[k] * v for k, v in losses.items() if k in weights)
        watch = {"loss": loss, **{k: v for k, v in losses.items() if k in weights}} if seen is not None else None
        with timer.phase("backward"):
            engine.backward(guard.check(loss, watch))
        for k, v in {"loss": loss, **{logged_name(k, weights): v for k, v in losses.items()}}.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        with timer.phase("optimizer"):
            if clipper is not None and engine.is_gradient_accumulation_boundary():
                clipper(getattr(engine.optimizer, "loss_scale", 1.0))
            engine.step()
    return losses, sums


def evaluate_during(cfg: Config, engine, device, dtype, env: DistEnv, run_dir: Path, step: int, metrics,
                    summary: dict) -> tuple[float, dict]:
    """The held-out evaluation every `eval.knn_every_steps`, written and logged -> (the seconds it took,
    kept out of the step time; its results)."""
    t0 = time.perf_counter()
    result = evaluate(cfg, engine, device, dtype, env, run_dir, step)
    metrics.write(step, result)
    if result.get("knn") is not None:
        student = f", student {percent(result['knn_student'])}" if "knn_student" in result else ""
        log.info("step %d: kNN top-1 %.2f%%%s (k=%d, held-out split; random init %s, raw pixels %s; %.0f s)",
                 step, result["knn"], student, cfg.eval.knn_k, percent(summary.get("knn_random_init")),
                 percent(summary.get("knn_raw_pixels")), time.perf_counter() - t0)
    for name, value in result.items():
        if name not in ("knn", "knn_student"):
            log.info("step %d: held-out %s %.4g", step, name, value)
    return time.perf_counter() - t0, result


def is_best(method, summary: dict, result: dict, step: int) -> bool:
    """Whether `result` beats the best of the method's `best_by` measure so far (kept in `summary`)."""
    if method.best_by is None or method.best_by[0] not in result:
        return False
    name, higher = method.best_by
    value, best = result[name], summary.get(f"best_{name}")
    if best is not None and not (value > best if higher else value < best):
        return False
    summary.update({f"best_{name}": value, f"best_{name}_step": step})
    return True


def roll_back(cfg: Config, ckpt: Checkpointer, engine, ema, env: DistEnv, run_dir: Path, step: int, reason: str,
              seen: dict[int, list[str]], global_batch: int) -> Resume | None:
    """A spike at `step`: every rank restores the newest complete checkpoint, the data stream left where it
    is (the steps since are skipped, their samples recorded); -> what was restored (None: no checkpoint)."""
    newest = ckpt.latest()
    if newest is None:
        log.warning("step %d: loss spike (%s), but no complete checkpoint to roll back to: going on", step, reason)
        return None
    back = Resume(newest, env.world_size)
    back.restore(ckpt, engine, ema, None, cfg, env.rank, env.world_size, global_batch)
    keys = [k for s, ks in sorted(seen.items()) if s > back.step for k in ks]
    write_skipped_keys(run_dir, step, env.rank, keys)
    everyone = [None] * env.world_size
    if dist.is_initialized():
        dist.all_gather_object(everyone, (str(newest), len(keys)))
    else:
        everyone = [(str(newest), len(keys))]
    if len({path for path, _ in everyone}) != 1:  # the ranks must agree, or their weights would differ
        raise RuntimeError(f"spike rollback: the ranks restored different checkpoints: {[p for p, _ in everyone]}")
    if env.rank == 0:
        record_rollback(run_dir, step, newest, back.step, reason, [n for _, n in everyone], cfg.run.spike_guard)
    g = cfg.run.spike_guard
    log.warning("step %d: loss spike (%s): rolled back to %s (step %d); the data of steps %d-%d (%d samples on this "
                "rank) is skipped, its keys in %s%s", step, reason, newest, back.step, back.step + 1, step, len(keys),
                skipped_keys_file(run_dir, step, env.rank),
                f"; lr x{g.lr_scale:g} for {g.lr_scale_steps} steps" if g.lr_scale_steps else "")
    return back


def train(cfg: Config, ds_config: dict, env: DistEnv, resume: str | None = None, stop_at: int | None = None,
          stop_after: int | None = None, trackers=None) -> dict:
    """`trackers`: rank 0's W&B / MLflow runs (trainer/tracking.py), sent what metrics.jsonl gets."""
    run_dir = Path(cfg.run.output_dir).expanduser()
    cfg.data.train_shards, cfg.data.val_shards = resolve_builtin(
        cfg.data.train_shards, cfg.data.val_shards, cfg.data.cache_dir)
    device, dtype = setup_device(env), DTYPES[cfg.run.precision]
    flops_per_step = size_run(cfg, ds_config, env, device) if env.rank == 0 else None

    # ---- restore: the engine is built for the checkpoint it resumes from
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep)
    start, ds_config = Resume.find(ckpt, resume, env.world_size, ds_config)
    engine, ema = build_engine(cfg, ds_config, cfg.run.seed)
    method = engine.module
    loader = build_train_loader(cfg.data, patch_size=cfg.model.patch_size, seed=cfg.run.seed, rank=env.rank,
                                world_size=env.world_size, pin_memory=device.type == "cuda",
                                **type(method).train_data(cfg, run_dir, env.rank))
    schedules = Schedules.from_config(cfg, type(method))
    # Rank 0 alone watches the time limit (one squeue call, not one per rank); the guard's
    # all-reduce makes every rank stop with it.
    deadline = JobDeadline.from_job(cfg.checkpoint.before_time_limit_s) if env.rank == 0 else None
    spikes = SpikeGuard(cfg.run.spike_guard) if cfg.run.spike_guard.enabled else None
    guard = StepGuard(cfg.optim.max_consecutive_skips, deadline=deadline,
                      rollback_on_skips=cfg.run.spike_guard.nonfinite_steps if spikes else 0)
    if env.rank == 0:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    global_batch = cfg.data.batch_size * cfg.optim.grad_accum * env.world_size
    if start.source is not None:
        start.restore(ckpt, engine, ema, loader, cfg, env.rank, env.world_size, global_batch)
    elif cfg.eval.knn_at_end:  # what the trained network will be compared with
        start.summary.update({f"{k}_random_init": v for k, v in evaluate(cfg, engine, device, dtype, env, run_dir,
                                                                          0).items()})
        if method.eval_features is not None:
            start.summary["knn_raw_pixels"] = raw_pixel_knn(cfg, env, device)
    step, summary, guard.skipped = start.step, start.summary, start.skipped
    metrics = MetricsWriter(run_dir, enabled=env.rank == 0, tensorboard=cfg.log.tensorboard, trackers=trackers,
                            resumed_at=step)
    # What produced this run, for the exported model card (this rank's own argv; the launcher is not visible).
    command = shlex.join(["python", *sys.argv]) + (f"  # on {env.world_size} ranks" if env.world_size > 1 else "")

    def save(best: bool = False) -> None:
        newest = ckpt.latest()
        if newest is None or newest.name != f"step{step:08d}":  # not already saved at this step
            path = ckpt.save(engine, step, client_state(cfg, method, loader, ema, summary, guard.skipped, command))
            log.info("saved %s", path)
        if best and env.rank == 0:
            name = method.best_by[0]
            ckpt.mark_best(ckpt.latest(), name, summary[f"best_{name}"])
        seen.clear()  # the samples a rollback to this checkpoint would skip start here

    # ---- steps
    clipper = None
    if cfg.optim.clip_grad > 0 and cfg.optim.clip_mode == "per_param":
        clipper = PerParamClip([(n, p) for n, p in method.named_parameters() if p.requires_grad], cfg.optim.clip_grad)
    timer = StepTimer(cfg.log.sync_timing, device)
    batches, window, compiled = iter(loader), LogWindow(), CompileReport(cfg.run.compile)
    seen: dict[int, list[str]] = {}  # step -> this rank's sample keys since the newest checkpoint (spike guard)
    last = min(cfg.schedule.steps, stop_at or cfg.schedule.steps, step + (stop_after or cfg.schedule.steps))
    stopped_by = None
    while step < last:
        step_start = time.perf_counter()
        timer.start_step(logged_next=(step + 1) % cfg.log.every_steps == 0 or step + 1 == cfg.schedule.steps)
        values = schedules.at(step)
        if spikes is not None:
            values["lr"] *= spikes.lr_factor(step)
        apply_schedule(engine.optimizer, values)
        before = [b.clone() for b in float_buffers(method)]
        keys = seen.setdefault(step + 1, []) if spikes is not None else None
        losses, sums = optimizer_step(engine, batches, values, step, cfg, timer, guard, clipper, device, dtype, keys)
        step += 1
        window.steps += 1
        if deadline is not None:
            deadline.observe(time.perf_counter() - step_start)
        counts = compiled.step(time.perf_counter() - step_start)
        if counts:
            metrics.write(step, counts)
        applied = guard.record(engine.was_step_applied(), step, losses, ckpt.latest)
        if applied:
            if ema is not None:
                with timer.phase("ema"):
                    ema.update(values["momentum"])
            window.add(sums, cfg.optim.grad_accum)
        else:  # skipped on every rank: the running statistics go back too
            for b, saved in zip(float_buffers(method), before):
                b.copy_(saved)
        reason = spikes.spike(step, guard.means, applied, guard.consecutive) if spikes is not None else None
        if reason is not None:
            back = roll_back(cfg, ckpt, engine, ema, env, run_dir, step, reason, seen, global_batch)
            if back is not None:
                spikes.rolled_back(step, back.step)
                metrics.roll_back(back.step, step, run_dir / "rollbacks" / f"step{step}.metrics.jsonl")
                step, summary, guard.consecutive = back.step, back.summary, 0
                seen.clear()
                window.reset()
                continue
        if step % cfg.log.every_steps == 0 or step == cfg.schedule.steps:
            record = log_record(cfg, values, window.means(sums), window.steps, time.perf_counter() - window.start,
                                global_batch, loader, guard, timer, method.logged_schedules, flops_per_step, device)
            metrics.write(step, record)
            shown = " ".join(f"{k} {record[logged_name(k, method.loss_weights)]:.4f}" for k in losses)
            log.info("step %d/%d loss %.4f (%s) lr %.2e %.0f img/s %.2fs/step%s", step, cfg.schedule.steps,
                     record["loss"], shown, record["lr"], record["images_per_s"], record["step_time_s"],
                     breakdown(record))
            window.reset()
        every = cfg.eval.knn_every_steps
        if every and step % every == 0 and step < cfg.schedule.steps and cfg.data.val_shards:
            seconds, result = evaluate_during(cfg, engine, device, dtype, env, run_dir, step, metrics, summary)
            window.start += seconds
            if is_best(method, summary, result, step):
                save(best=True)
        if guard.stop_requested:
            log.warning("%s: saving step %d and stopping; the same command resumes",
                        guard.signal_name or "a stop signal on another rank", step)
            stopped_by = guard.signal_name or "signal"
            break
        if step % cfg.checkpoint.every_steps == 0 and step < cfg.schedule.steps:
            save()

    # ---- save
    finished = step >= cfg.schedule.steps
    best = False
    if finished and not stopped_by and cfg.eval.knn_at_end and summary.get("held_out_step") != step:
        result = evaluate(cfg, engine, device, dtype, env, run_dir, step)
        best = is_best(method, summary, result, step)
        summary.update(result, held_out_step=step)
    save(best)
    if finished:  # (a stopped run's summary is in its checkpoint; the launch that finishes writes it once)
        metrics.write(step, {k: v for k, v in summary.items() if v is not None})
    metrics.close()
    if dist.is_initialized():
        dist.barrier()
    if env.rank == 0:
        write_status(run_dir, cfg, step, finished, stopped_by, ckpt.latest())
    return {**summary, "step": step, "stopped_by": stopped_by}
