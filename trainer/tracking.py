"""Experiment trackers beside metrics.jsonl: Weights & Biases (`log.wandb`) and MLflow (`log.mlflow`),
from rank 0 only. One tracker run per mimscale run: its id is kept in <run>/tracking.json, so a resume,
a Slurm requeue, a chain's next task or a reshard (all the same run directory) go on with the same
tracker run. Which steps a tracker already has is trainer/metrics.py's business (it never sends a step
twice); this module only talks to the two libraries, each an optional extra."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

from .config import Config, to_dict

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"


def tracker_ids(run_dir: Path) -> dict:
    path = Path(run_dir) / TRACKING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def save_tracker_id(run_dir: Path, name: str, value: dict) -> None:
    path = Path(run_dir) / TRACKING_FILE
    ids = {**tracker_ids(run_dir), name: value}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ids, indent=1) + "\n")
    os.replace(tmp, path)  # a kill never leaves half a file, which would start a second tracker run


def numbers(values: dict) -> dict[str, float]:
    """What a tracker can plot: the numeric values (a value that could not be measured is None)."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbTracker:
    def __init__(self, cfg: Config, run_dir: Path):
        import wandb

        lg = cfg.log
        saved = tracker_ids(run_dir).get("wandb", {})
        run_id = saved.get("id") or uuid.uuid4().hex[:12]  # W&B ids: lower-case letters and digits
        save_tracker_id(run_dir, "wandb", {"id": run_id, "project": lg.wandb_project, "mode": lg.wandb})
        self.wandb = wandb
        # resume="allow": the same id continues the run (a requeue, a chain's next task) or starts it
        self.run = wandb.init(mode=lg.wandb, project=lg.wandb_project, entity=lg.wandb_entity or None,
                              group=lg.wandb_group or None, tags=list(lg.wandb_tags) or None, name=run_dir.name,
                              id=run_id, resume="allow", dir=str(run_dir), config=to_dict(cfg),
                              allow_val_change=True, settings=wandb.Settings(quiet=True))
        log.info("W&B run %s (%s, project %s)%s%s", run_id, lg.wandb, lg.wandb_project, " continued" if saved else "",
                 f"; send it with `wandb sync {self.run.dir.rsplit('/files', 1)[0]}`" if lg.wandb == "offline" else "")

    def log(self, step: int, values: dict) -> None:
        self.run.log(numbers(values), step=step)

    def pictures(self, step: int, paths: list[Path]) -> None:
        self.run.log({f"pictures/{Path(p).stem}": self.wandb.Image(str(p)) for p in paths}, step=step)

    def results(self, step: int, values: dict) -> None:
        """A result computed after the run: to the run's summary (W&B takes no step at or before its last)."""
        self.run.summary.update(numbers(values))

    def close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


class MlflowTracker:
    """Through MlflowClient (no global active run). The store: `log.mlflow_uri`, else the
    MLFLOW_TRACKING_URI a lab's server sets, else a local store <run>/mlruns (MLflow 3 refuses a file
    store unless MLFLOW_ALLOW_FILE_STORE is set: asking for one here is that consent)."""

    def __init__(self, cfg: Config, run_dir: Path):
        import mlflow
        from mlflow.entities import Param

        uri = cfg.log.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(uri)
        saved = tracker_ids(run_dir).get("mlflow", {})
        if saved.get("run_id") and saved.get("uri") == uri:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(cfg.log.mlflow_experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(cfg.log.mlflow_experiment))
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            save_tracker_id(run_dir, "mlflow", {"run_id": self.run_id, "uri": uri})
            params = [Param(k, str(v)[:6000]) for k, v in flatten(to_dict(cfg)).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        log.info("MLflow run %s at %s", self.run_id, uri)

    def log(self, step: int, values: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in numbers(values).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def results(self, step: int, values: dict) -> None:
        self.log(step, values)

    def pictures(self, step: int, paths: list[Path]) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p), "pictures")

    def close(self, exit_code: int) -> None:
        # a stopped run (a chain's task, a requeue) stays RUNNING: the next launch goes on with it
        if exit_code:
            self.client.set_terminated(self.run_id, "FAILED")


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Trackers:
    """The configured trackers of this rank (none but on rank 0). A tracker that fails to log is a
    warning, once, and is dropped: the run and metrics.jsonl go on."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    @classmethod
    def open(cls, cfg: Config, rank: int) -> Trackers:
        if rank != 0:
            return cls([])
        run_dir = Path(cfg.run.output_dir).expanduser()
        run_dir.mkdir(parents=True, exist_ok=True)
        out = []
        if cfg.log.wandb != "off":
            out.append(WandbTracker(cfg, run_dir))
        if cfg.log.mlflow:
            out.append(MlflowTracker(cfg, run_dir))
        return cls(out)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, what: str, *args) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, what)(*args)
            except Exception as e:  # noqa: BLE001  (a tracker's outage must not stop training)
                log.warning("%s failed (%s: %s); no more is sent to it in this run", type(t).__name__,
                            type(e).__name__, e)
                self.trackers.remove(t)

    def log(self, step: int, values: dict) -> None:
        self._each("log", step, values)

    def pictures(self, step: int, paths: list[Path]) -> None:
        self._each("pictures", step, [p for p in paths if Path(p).is_file()])

    def results(self, step: int, values: dict) -> None:
        self._each("results", step, values)

    def close(self, exit_code: int = 0) -> None:
        self._each("close", exit_code)
        self.trackers = []


def send_results(run_dir: Path, step: int | None, record: dict) -> list[str]:
    """A result computed after the run (scripts/evaluate.py: a linear probe, a kNN sweep) to the trackers
    the run itself logged to (its config.yaml; the ids in tracking.json) -> their names ([] if none)."""
    from .config import files_unchecked, load_config

    run_dir = Path(run_dir)
    if not (run_dir / TRACKING_FILE).is_file() or not (run_dir / "config.yaml").is_file():
        return []
    with files_unchecked():  # (the run's teacher files need not be where they were)
        cfg = load_config(run_dir / "config.yaml")
    cfg.run.output_dir = str(run_dir)  # the directory as it is now, holding tracking.json
    trackers = Trackers.open(cfg, 0)
    names = [type(t).__name__.removesuffix("Tracker") for t in trackers.trackers]
    trackers.results(step or 0, record)
    trackers.close()
    return names
