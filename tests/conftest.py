import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.shards import write_shard
from trainer.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


def tiny_clip_file(path: Path, seed: int = 0) -> Path:
    """The tiny CLIP teacher (models.teachers.tiny_clip) written to `path` (.pt/.bin: torch.save;
    safetensors otherwise), the caller's random state left as it was."""
    import torch

    from models.teachers import save_clip, tiny_clip

    with torch.random.fork_rng():
        return save_clip(tiny_clip(seed), path)


def tiny_tokenizer_file(path: Path, seed: int = 0, arch=None) -> Path:
    """A tiny BEiT tokenizer (a dVAE encoder, 32 codes) written to `path`."""
    import torch

    from models.dvae import DVAEArch, Encoder, save_encoder

    arch = arch or DVAEArch(group_count=3, n_hid=8, n_blk_per_group=1, vocab_size=32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        save_encoder(Encoder(arch), path)
    return path


def tiny_frozen_files(tmp: Path) -> dict[str, str]:
    """The tiny CLIP and the tiny tokenizer, each from seed 0, in `tmp`: {"clip": path, "tokenizer": path}."""
    return {"clip": str(tiny_clip_file(tmp / "clip.safetensors")),
            "tokenizer": str(tiny_tokenizer_file(tmp / "tokenizer.safetensors"))}


@pytest.fixture(scope="session")
def frozen_files(tmp_path_factory) -> dict[str, str]:
    """tiny_frozen_files, written once per session."""
    return tiny_frozen_files(tmp_path_factory.mktemp("frozen_files"))


# Loader workers and the tests share 2 cores: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def gpu_session(markexpr: str) -> bool:
    """Whether `-m markexpr` selects the GPU tests and nothing else (`pytest -m gpu`)."""
    if not markexpr.strip():
        return False
    from _pytest.mark.expression import Expression

    expr = Expression.compile(markexpr)
    others = [set(), {"slow"}, {"slurm"}, {"slow", "slurm"}]  # the marks a test can carry beside gpu
    def selects(marks: set) -> bool:
        return expr.evaluate(lambda name, **kw: name in marks)
    return any(selects(m | {"gpu"}) for m in others) and not any(selects(m) for m in others)


def pytest_configure(config):
    """A session is either the CPU tests or the GPU ones (`pytest -m gpu`), because Triton decides
    when a kernel is defined whether it is compiled or interpreted. The CPU session runs the kernels
    in Triton's interpreter on CPU tensors and hides any GPU (so a 2-rank test on a 1-GPU machine
    does not ask for cuda:1, and nothing compiled meets a CPU tensor); the GPU session leaves both.
    Set before any test module imports torch's CUDA state or models.kernels."""
    config.gpu_session = gpu_session(config.option.markexpr or "")
    if not config.gpu_session:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["TRITON_INTERPRET"] = "1"


# The files that take minutes, roughly longest first (CI's --durations): `pytest -n 2 --dist loadfile` (the
# README's command) hands each worker whole files in collection order, so these go first instead of
# one starting the default run when the other is nearly done. Whole files
# also keep a file's session fixture (the BEiT chain) built once, and tests/slurm/test_cluster.py's
# jobs off each other's two Slurm CPUs.
LONGEST_FIRST = ("runs/test_default_run.py", "dist/test_resume.py", "dist/test_distributed.py",
                 "runs/test_beit_chain.py", "runs/test_frozen_teacher_runs.py", "faults/test_crash_safety.py",
                 "runs/test_itpn_runs.py", "slurm/test_cluster.py", "runs/test_step_syncs.py", "dist/test_comm.py",
                 "dist/test_reshard.py", "runs/test_dinov2_runs.py", "runs/test_compile.py")


def pytest_collection_modifyitems(config, items):
    tests = Path(__file__).parent
    missing = [name for name in LONGEST_FIRST if not (tests / name).is_file()]
    if missing:  # a renamed file would silently lose its place
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names no such file: {missing}")

    def rank(item) -> int:
        name = item.path.relative_to(tests).as_posix() if item.path.is_relative_to(tests) else ""
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's own order kept
    if not config.gpu_session:
        skip = pytest.mark.skip(reason="a GPU test: they run in their own session, `pytest -m gpu` (this one keeps "
                                       "to the CPU)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """What an xdist worker imported from scripts/, for the session's check below."""
    imported = getattr(node, "workeroutput", {}).get("scripts_imported", [])
    node.config.scripts_imported_by_workers = [*getattr(node.config, "scripts_imported_by_workers", []), *imported]


def pytest_sessionfinish(session, exitstatus):
    """Tests import the package, never a script (tests/unit/test_layering.py reads their source; this
    sees what was really imported, in whatever way): a session that imported one fails."""
    import sys

    scripts = ROOT / "scripts"
    imported = sorted(name for name, m in list(sys.modules.items())
                      if Path(getattr(m, "__file__", None) or "/").resolve().is_relative_to(scripts))
    if hasattr(session.config, "workeroutput"):  # an xdist worker: its exit status is not the session's
        session.config.workeroutput["scripts_imported"] = imported
        return
    imported = sorted({*imported, *getattr(session.config, "scripts_imported_by_workers", ())})
    if imported:
        session.config.get_terminal_writer().line(f"tests imported scripts: {', '.join(imported)}", red=True)
        session.exitstatus = 1


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(root: Path, n_shards: int, per_shard: int, extra: dict | None = None) -> list[str]:
    """n_shards tar files of per_shard samples keyed `s{shard}_{i}` (label = shard % 10).
    `extra` maps a shard index to a list of additional raw samples appended to it."""
    urls = []
    for s in range(n_shards):
        samples = [{"__key__": f"s{s}_{i}", "jpg": jpeg_bytes(1000 * s + i), "cls": s % 10}
                   for i in range(per_shard)]
        samples += (extra or {}).get(s, [])
        path = root / f"shard-{s:04d}.tar"
        write_shard(path, samples)
        urls.append(str(path))
    return urls


@pytest.fixture(scope="session")
def digits_dirs(tmp_path_factory):
    from data.digits import digits_shards

    return digits_shards(tmp_path_factory.mktemp("cache"))


def torchrun(*args: str, timeout: int = 600):
    """Two CPU ranks (gloo) of `args` (a script and its arguments), from the repository root."""
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def main_in_process(*args: str) -> int:
    """`launch.main(args)` in this process (no seconds of imports per run), the environment and the
    signal handlers put back after: a run exports RANK, WORLD_SIZE, MASTER_PORT... for its process
    group, and ends ignoring SIGTERM and SIGUSR1 (trainer.stop_signals.ignore), which later subprocesses
    would inherit (a multiprocessing pool that cannot be terminated hung a later test)."""
    import signal

    import launch
    from trainer.stop_signals import SIGNALS

    saved, handlers = dict(os.environ), {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        return launch.main([str(a) for a in args])
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of a run directory's metrics.jsonl, in its order: a continuous curve has each step
    once (dict() of it keeps the last record of each step)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


# what differs between two runs of the same steps: the wall clock and what is measured by it
WALL_CLOCK = ("time", "images_per_s", "step_time_s", "max_rss_gib", "max_memory_gib", "model_tflops_per_s", "mfu")


def records(run: Path) -> list[dict]:
    """metrics.jsonl's records in order, without the wall-clock values: two runs of the same steps
    (one of them killed and resumed) have equal lists."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK and not k.startswith("time_")} for r in rows]


def wandb_records(run: Path):
    """Every record a run wrote to W&B offline, <run>/wandb/offline-run-*/run-*.wandb in order (each
    launch's own directory): LevelDB-style log blocks of protobuf Records, W&B's transaction log."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, block, buf = path.read_bytes(), 7, 32768, b""
        assert data[:4] == b":W&B", path
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                pos += block - pos % block
                continue
            buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a whole record, or its last fragment
                record = pb.Record()
                record.ParseFromString(buf)
                buf = b""
                yield record


def wandb_items(items) -> dict:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def wandb_offline(run: Path) -> tuple[set[str], list[tuple[int, dict]]]:
    """What a run sent to W&B offline: (the run ids, [(step, {key: value})] in the order written)."""
    ids, history = set(), []
    for record in wandb_records(run):
        if record.WhichOneof("record_type") == "run":
            ids.add(record.run.run_id)
        elif record.WhichOneof("record_type") == "history":
            history.append((record.history.step.num, wandb_items(record.history.item)))
    return ids, history


class Run:
    """A finished launch.py run: its metrics.jsonl records, status.json and what it printed."""

    def __init__(self, out: Path, result):
        self.out, self.stdout, self.stderr, self.returncode = out, result.stdout, result.stderr, result.returncode
        metrics, status = out / "metrics.jsonl", out / "status.json"
        self.records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        self.status = json.loads(status.read_text()) if status.exists() else None

    def steps(self, *keys: str) -> list[dict]:
        """Every training record (one per logged step), with `keys` only (all of them if none)."""
        return [{k: r[k] for k in keys} if keys else r for r in self.records if "loss" in r]

    @property
    def summary(self) -> dict:
        """The run's end: the last record (its held-out measures beside their baselines)."""
        return self.records[-1] if self.records else {}


def launch_run(out: Path, config: str, *overrides: str, ranks: int = 1, check: bool = True, timeout: int = 900) -> Run:
    """`python launch.py --config configs/<config>.yaml run.output_dir=<out> ...` on `ranks` CPU ranks
    (torchrun for more than one), quietly (no pictures, no TensorBoard, no kNN unless asked)."""
    import sys

    args = ["launch.py", "--config", str(ROOT / "configs" / f"{config}.yaml"), f"run.output_dir={out}",
            "log.tensorboard=false", "log.pictures=false", "eval.knn_at_end=false", "eval.knn_every_steps=0",
            *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *args] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
        str(free_port()), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return Run(out, result)


def tiny_ibot_cmd(out: Path, steps: int, extra=()) -> list[str]:
    return ["launch.py", "--config", str(ROOT / "configs" / "ibot_vit_tiny.yaml"), f"run.output_dir={out}",
            f"schedule.steps={steps}", "checkpoint.every_steps=3", "log.every_steps=1", "eval.knn_at_end=false",
            "model.arch=vit_test", "ibot.out_dim=64", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
            "data.batch_size=8", "data.num_workers=2", "log.tensorboard=false", "model.drop_path=0.1",
            "log.pictures=false", *extra]


@pytest.fixture(scope="session")
def ibot_two_rank_run(tmp_path_factory) -> Path:
    """A tiny iBOT run, 6 steps on 2 CPU ranks under ZeRO-3 (the resume test's reference run, and
    what the export and evaluation tests convert)."""
    run = tmp_path_factory.mktemp("ibot2") / "run"
    torchrun(*tiny_ibot_cmd(run, 6))
    return run


@pytest.fixture(scope="session")
def beit_chain(tmp_path_factory) -> dict:
    """BEiT's two stages as docs/methods.md runs them, trained once for the session and shared by its tests
    (tests/runs/test_beit_chain.py asserts they learn and converts the BEiT run): the tokenizer
    (configs/dvae_tiny.yaml) with its held-out PSNR, its encoder exported
    (scripts/export_tokenizer.py), BEiT (configs/beit_vit_tiny.yaml) against it with its kNN.
    -> {"dvae": Run, "encoder": Path, "beit": Run}"""
    import sys

    tmp = tmp_path_factory.mktemp("beit_chain")
    dvae = launch_run(tmp / "dvae", "dvae_tiny", "eval.knn_at_end=true")
    encoder = tmp / "encoder.safetensors"
    exported = subprocess.run([sys.executable, "scripts/export_tokenizer.py", str(dvae.out), str(encoder)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    beit = launch_run(tmp / "beit", "beit_vit_tiny", f"beit.tokenizer={encoder}", "eval.knn_at_end=true")
    return {"dvae": dvae, "encoder": encoder, "beit": beit}


# A one-node Slurm for the tests in tests/slurm/ that submit jobs (scripts/ci/slurm_up.sh; .ci/run starts it
# first). Jobs always go to this test cluster (its own SLURM_CONF under /tmp/mimscale-slurm), never to a Slurm
# the machine may already belong to. Without root, slurm_up.sh cannot install Slurm: those tests then fail and
# say so; deselect them with `-m "not slurm"`.
SLURM_DIR = Path(os.environ.get("MIMSCALE_SLURM_DIR", "/tmp/mimscale-slurm"))


def _up(env: dict) -> bool:
    try:
        return subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True,
                              timeout=10).stdout.strip() in ("idle", "mixed", "allocated")
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def slurm() -> dict:
    """The environment that reaches the test cluster, bringing it up if it is not."""
    env = {**os.environ, "SLURM_CONF": str(SLURM_DIR / "slurm.conf"), "MIMSCALE_SLURM_DIR": str(SLURM_DIR),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    pids = SLURM_DIR / f"started-by-pytest-{os.getpid()}.pids"
    if not _up(env):
        result = subprocess.run(["bash", str(ROOT / "scripts" / "ci" / "slurm_up.sh"), str(pids)], env=env,
                                capture_output=True, text=True, timeout=900)
        if result.returncode != 0 or not _up(env):
            pytest.fail("no local Slurm: scripts/ci/slurm_up.sh failed (it installs slurm-wlm and munge as root):\n"
                        + result.stdout[-2000:] + result.stderr[-3000:])
    yield env
    if pids.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "ci" / "slurm_down.sh"), str(pids)], env=env, timeout=120)
        pids.unlink()
