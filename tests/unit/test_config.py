import json
import os
import textwrap

import pytest
import torch

import launch
from trainer.config import DEFAULT_CONFIG, Config, ConfigError, describe, load_config
from trainer.distributed import dist_env, first_host
from trainer.ds_config import build_ds_config, resolve_ds_config


def write(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_file_is_valid_and_complete():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.arch == "vit_tiny" and cfg.data.train_shards == "builtin:digits"
    assert cfg.data.global_crops.size % cfg.model.patch_size == 0


def test_overrides_are_typed():
    cfg = load_config(DEFAULT_CONFIG, ["optim.lr=1e-3", "data.batch_size=7", "data.local_crops.scale=[0.1,0.3]",
                                       "run.output_dir=/tmp/x", "data.val_shards=null"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 7
    assert cfg.data.local_crops.scale == (0.1, 0.3)
    assert cfg.data.val_shards is None


def test_base_chain_and_origins(tmp_path):
    write(tmp_path, "data: {batch_size: 8}\n", "base.yaml")
    path = write(tmp_path, "base: base.yaml\noptim: {lr: 0.5}\n")
    cfg = load_config(path)
    assert cfg.data.batch_size == 8 and cfg.optim.lr == 0.5
    # an error in the base file names the base file
    write(tmp_path, "data: {batch_size: 0}\n", "base.yaml")
    with pytest.raises(ConfigError, match=r"base\.yaml: data\.batch_size: 0 must be >= 1"):
        load_config(path)


BAD = [
    ("data: {mask: {ratio: [0.1, 1.5]}}", "data.mask.ratio", "1.5 is outside [0.0, 1.0)"),
    ("data: {bach_size: 4}", "data.bach_size", "did you mean data.batch_size?"),
    ("optimizer: {lr: 0.1}", "optimizer", "did you mean optim?"),
    ("data: {batch_size: sixty}", "data.batch_size", "'sixty' is not an integer"),
    ("data: {num_workers: true}", "data.num_workers", "True is not an integer"),
    ("run: {precision: fp8}", "run.precision", "'fp8' is not one of 'bf16', 'fp16', 'fp32'"),
    ("data: {local_crops: {size: 256}}", "data.local_crops.size", "must be smaller than global_crops.size"),
    ("data: {global_crops: {size: 225}}", "data.global_crops.size", "not a multiple of model.patch_size"),
    ("data: {mask: {prob: 2}}", "data.mask.prob", "2.0 is outside [0, 1]"),
    ("data: {mask: {ratio: [0.5, 0.1]}}", "data.mask.ratio", "is not an interval"),
    ("data: {global_crops: {scale: [0.3]}}", "data.global_crops.scale", "not a list of 2 numbers"),
    ("optim: {lr: 0.001, min_lr: 0.1}", "optim.min_lr", "outside [0, lr=0.001]"),
    ("data: 5", "data", "expected a mapping"),
    ("data: {global_crops: {number: 3}}", "data.global_crops.number", "exactly 2 global crops"),
    ("model: {patch_size: 0}", "model.patch_size", "must be > 0"),
    ("optim: {betas: [0.9, 1.0]}", "optim.betas", "1.0 is outside [0.0, 1.0)"),
    ("data: {augment: {color_jitter: [0.4, 0.4, 0.2, 0.9]}}", "data.augment.color_jitter", "hue 0.9"),
    ("method: simclr", "method", "unknown method 'simclr'; known: beit, dinov2, dvae, finetune, ibot"),
]


@pytest.mark.parametrize("text,key,problem", BAD, ids=[b[1] for b in BAD])
def test_bad_config_names_file_key_and_allowed(tmp_path, text, key, problem):
    path = write(tmp_path, "base: " + str(DEFAULT_CONFIG) + "\n" + text + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.key == key
    assert problem in str(e.value)
    assert str(e.value).startswith(f"{path}: {key}: ") or str(e.value).startswith(f"x.yaml: {key}: ")
    assert "\n" not in str(e.value)


def test_bad_override_names_the_command_line():
    with pytest.raises(ConfigError, match=r"^command line: data\.mask\.ratio: 1\.5 is outside"):
        load_config(DEFAULT_CONFIG, ["data.mask.ratio=[0.1,1.5]"])
    with pytest.raises(ConfigError, match="overrides look like key.sub=value"):
        load_config(DEFAULT_CONFIG, ["data.batch_size"])


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: {batch_size: [1,\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_key_is_documented():
    rows = describe()
    assert len(rows) > 40
    assert all(help_text for _, help_text, _ in rows)


# --------------------------------------------------------------------------- DeepSpeed JSON


def test_bare_ds_config_name_resolves():
    assert resolve_ds_config("zero3.json").name == "zero3.json"
    assert resolve_ds_config("zero2").name == "zero2.json"
    with pytest.raises(ConfigError, match="zero3_offload.json"):
        resolve_ds_config("zero9.json")


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json"])
def test_yaml_values_flow_into_ds_config(name):
    cfg = load_config(DEFAULT_CONFIG, ["data.batch_size=12", "optim.grad_accum=3", "optim.clip_grad=1.5",
                                       "optim.lr=2e-4", "optim.clip_mode=global", "run.precision=bf16"])
    ds = build_ds_config(name, cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 12
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 12 * 3 * 4
    assert ds["gradient_clipping"] == 1.5
    assert ds["optimizer"]["params"]["lr"] == 2e-4
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(ds)
    assert ds["zero_optimization"]["stage"] in (2, 3)
    # per_param clipping is ours: DeepSpeed's global clipping is then off
    per_param = build_ds_config(name, load_config(DEFAULT_CONFIG, ["optim.clip_grad=1.5", "run.precision=bf16"]),
                                world_size=4)
    assert per_param["gradient_clipping"] == 0.0
    fp32 = build_ds_config(name, load_config(DEFAULT_CONFIG, ["run.precision=fp32"]), 1) if name != "zero2.json" \
        else None
    assert fp32 is None or (fp32["bf16"]["enabled"] is False and fp32["fp16"]["enabled"] is False)


def test_ds_config_disagreeing_with_yaml_is_refused(tmp_path):
    cfg = load_config(None, ["optim.clip_mode=global", "run.precision=bf16"])
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": 1.0, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"gradient_clipping: is 1.0 here but optim.clip_grad gives 3.0"):
        build_ds_config(str(path), cfg, 1)
    path.write_text(json.dumps({"bf16": {"enabled": False}}))
    with pytest.raises(ConfigError, match=r"bf16.enabled: .*run.precision"):
        build_ds_config(str(path), cfg, 1)
    # agreeing values are fine
    path.write_text(json.dumps({"gradient_clipping": 3.0}))
    assert build_ds_config(str(path), cfg, 1)["gradient_clipping"] == 3.0
    path.write_text(json.dumps({"gradient_clipping": 1.0}))
    with pytest.raises(ConfigError, match=r"gradient_clipping: is 1.0 here but optim.clip_mode per_param gives 0.0"):
        build_ds_config(str(path), load_config(), 1)


def test_ds_config_auto_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    with pytest.raises(ConfigError, match=r"zero_optimization.reduce_bucket_size: \"auto\" is not accepted"):
        build_ds_config(str(path), load_config(), 1)


# --------------------------------------------------------------------------- launch.py


def test_launch_bad_config_is_one_line_and_exit_2(capsys):
    assert launch.main(["data.mask.ratio=[0.1,1.5]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mimscale: config error: command line: data.mask.ratio: 1.5 is outside [0.0, 1.0)"


def test_launch_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert launch.main([f"run.output_dir={blocker}/run"]) == 2
    assert "run.output_dir" in capsys.readouterr().err


def test_launch_too_few_shards_for_ranks_x_workers(tmp_path, capsys, monkeypatch, digits_dirs):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    rc = launch.main([f"data.train_shards={digits_dirs['train']}", "data.num_workers=2",
                      f"run.output_dir={tmp_path}", "--dry-run", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "15 shards cannot feed 8 ranks x 2 loader streams (16 needed" in err


def test_launch_dry_run_streams_batches(tmp_path, capsys, digits_dirs):
    rc = launch.main([f"data.train_shards={digits_dirs['train']}", f"run.output_dir={tmp_path}",
                      "data.num_workers=0", "data.batch_size=16", "--dry-run", "3"])
    assert rc == 0
    out = capsys.readouterr()
    assert "streamed 3 batches" in out.err
    # the memory planner's table and verdict for this run, before any batch (trainer/plan)
    assert "activations: student (saved for backward)" in out.out and "memory plan: fits:" in out.err


# --------------------------------------------------------------------------- launchers


def test_dist_env_from_each_launcher():
    single = dist_env({})
    assert single.world_size == 1 and single.rank == 0 and single.master_port > 0
    t = dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "123"})
    assert (t.rank, t.world_size, t.local_rank, t.master_addr, t.master_port) == (3, 8, 1, "h", 123)
    s = dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                  "SLURM_JOB_NODELIST": "gpu[003-010,012]", "SLURM_JOB_ID": "4242"})
    assert (s.rank, s.world_size, s.local_rank, s.master_addr, s.launcher) == (5, 16, 1, "gpu003", "slurm")
    assert s.master_port == 20000 + 4242


# What one task of an 8-GPU node (its fourth: SLURM_LOCALID 3) has under each binding, and what it must use.
SLURM_TASK = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_JOB_NODELIST": "gpu[1-2]"}


@pytest.mark.parametrize("how,environ,visible,index", [
    ("srun --gpus-per-task=1", {**SLURM_TASK, "CUDA_VISIBLE_DEVICES": "3"}, 1, 0),
    ("srun --gpus-per-task=1, cgroup-constrained", {**SLURM_TASK, "CUDA_VISIBLE_DEVICES": "0"}, 1, 0),
    ("srun --gpus-per-node=8", {**SLURM_TASK, "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, 8, 3),
    ("srun --gpus-per-node=8 --gpu-bind=single:1", {**SLURM_TASK, "CUDA_VISIBLE_DEVICES": "3"}, 1, 0),
    ("srun --gpus-per-node=8 --gpu-bind=map_gpu:0,1,2,3,4,5,6,7", {**SLURM_TASK, "CUDA_VISIBLE_DEVICES": "3"}, 1, 0),
    ("torchrun --nproc_per_node 8", {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3"}, 8, 3),
])
def test_each_task_uses_a_gpu_it_can_see(how, environ, visible, index):
    """Issue 28 (2): the device is chosen from what the task sees, not cuda:SLURM_LOCALID (an invalid
    ordinal for local ranks 1-7 when each task sees one GPU)."""
    from trainer.distributed import cuda_index

    assert cuda_index(dist_env(environ).local_rank, visible, environ) == index, how


def test_a_task_that_sees_too_few_gpus_says_so():
    from trainer.distributed import cuda_index

    environ = {**SLURM_TASK, "SLURM_LOCALID": "5", "CUDA_VISIBLE_DEVICES": "0,1"}
    with pytest.raises(RuntimeError, match=r"local rank 5 but this process sees 2 GPUs \(CUDA_VISIBLE_DEVICES=0,1\)"):
        cuda_index(dist_env(environ).local_rank, 2, environ)


@pytest.mark.parametrize("nodes,first", [("node1", "node1"), ("a[1-4]", "a1"), ("gpu[003-010,012],x2", "gpu003"),
                                         ("n[07,09]", "n07"), ("h1,h2", "h1")])
def test_first_host(nodes, first):
    assert first_host(nodes) == first


def test_every_shipped_config_is_valid(tmp_path):
    """Large configs name teacher files that only exist on a cluster: a stand-in path is given."""
    from pathlib import Path

    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"")
    from conftest import tiny_tokenizer_file

    from models.dvae import DVAEArch

    # Stand-in tokenizers: the tiny one (4x down, 32 codes) and the recipes' shape (8x, 8192), narrow.
    tokenizers = {"beit_vit_tiny.yaml": tiny_tokenizer_file(tmp_path / "tok32.safetensors"),
                  "*": tiny_tokenizer_file(tmp_path / "tok8192.safetensors",
                                           arch=DVAEArch(group_count=4, n_hid=8, n_blk_per_group=1, vocab_size=8192))}
    configs = sorted((Path(launch.__file__).parent / "configs").glob("*.yaml"))
    assert len(configs) >= 14
    for path in configs:
        frozen = "teacher:" in path.read_text() or path.name.startswith("ibot_clip")
        overrides = [f"teacher.clip.weights={weights}"] if frozen else []
        if path.name.startswith("beit_"):
            overrides.append(f"beit.tokenizer={tokenizers.get(path.name, tokenizers['*'])}")
        cfg = load_config(path, overrides)
        assert cfg.method in ("ibot", "maskalign", "ibot_clip", "beit", "dvae", "itpn", "finetune", "dinov2"), path


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_no_run_jit_compiles_deepspeeds_optimizer_ops(monkeypatch, name):
    """Issue 28 (7): torch's AdamW (fused on a GPU, also for the offloaded CPU states) instead of
    DeepSpeed's FusedAdam / cpu_adam, which every node would JIT-compile on its first step."""
    cfg = load_config(None, ["run.precision=bf16"])
    assert build_ds_config(name, cfg, 1)["optimizer"]["params"]["torch_adam"] is True  # the CPU: exact resume
    assert "fused" not in build_ds_config(name, cfg, 1)["optimizer"]["params"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    params = build_ds_config(name, cfg, 1)["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True


def test_a_first_run_builds_no_extension(tmp_path):
    """Issue 28 (7): with an empty TORCH_EXTENSIONS_DIR the first step needs no C++ build (DeepSpeed's
    CPU backend compiled its shared-memory comm op first: ~20 s of the first step's 25 s here)."""
    import subprocess
    import sys
    import time

    from conftest import ROOT

    ext = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "launch.py", f"run.output_dir={tmp_path / 'run'}", "schedule.steps=1",
                        "eval.knn_at_end=false", "log.pictures=false", "log.tensorboard=false"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step 1/1" in p.stderr and "built successfully" not in p.stdout + p.stderr
    assert not ext.exists() or not any(ext.iterdir()), f"built: {sorted(x.name for x in ext.iterdir())}"
    print(f"first step after {elapsed:.1f} s")


def test_a_tracker_asked_for_without_its_package_stops_with_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "mlflow") else
                        real(name, *a))
    for override, extra in (("log.wandb=offline", "wandb"), ("log.mlflow=true", "mlflow")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert str(e.value) == (f"command line: log.{extra}: the {extra} package is not installed: "
                                f"pip install -e '.[{extra}]'")
    assert load_config(None, ["log.wandb=off"]).log.wandb == "off"  # YAML's bare off is false: still 'off'
