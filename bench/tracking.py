"""MLflow tracking: one experiment per study, a parent run per Optuna study, a nested child run per trial.

Per-epoch metrics go in one batched, asynchronous call per epoch so logging does not slow training.
Models are logged as state dicts (`mlflow.pytorch.log_model` is slow).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from bench import config, figures
from bench.config import Config, ConfigError
from bench.train import TrainResult

STUDY_TAG = "vaebench.optuna_study"  # on the parent run: the Optuna study it tracks


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_reachable(uri: str) -> None:
    """Raises ConfigError when the tracking store cannot be used, before anything is written."""
    path = sqlite_path(uri)
    if path is not None:
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(f"tracking.uri={uri!r}: folder {folder} does not exist or is not writable")
        return
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except Exception as e:
            raise ConfigError(f"tracking.uri={uri!r}: tracking server unreachable ({e}); start one with "
                              "`mlflow server --host 127.0.0.1`, or use sqlite:///mlflow.db") from None
        return
    if not uri.startswith(("postgresql://", "postgresql+psycopg2://", "mysql://", "file:")):
        raise ConfigError(f"tracking.uri={uri!r}: expected sqlite:///FILE, http://HOST:PORT or "
                          "postgresql://USER@HOST/DB")


def setup(cfg: Config) -> str:
    """Points MLflow at the tracking store and returns the study's experiment id (created once)."""
    uri = config.tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.study.name)
    if experiment is not None:
        return experiment.experiment_id
    path = sqlite_path(uri)
    # Artifacts beside the SQLite file, not in whatever folder the command happens to run from.
    location = (path.resolve().parent / "mlartifacts").as_uri() if path is not None else None
    return client.create_experiment(cfg.study.name, artifact_location=location)


def parent_run(experiment_id: str, study_name: str, cfg: Config) -> str:
    """The parent run of an Optuna study: found again on resume, created on the first run."""
    client = MlflowClient()
    found = client.search_runs([experiment_id], f"tags.`{STUDY_TAG}` = '{study_name}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=study_name, tags={
        STUDY_TAG: study_name, "study": cfg.study.name, "config_hash": config.config_hash(cfg),
        "git_commit": git_commit(), "torch_version": torch.__version__,
        "mlflow.note.content": cfg.study.description})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(config.to_yaml(cfg))
        client.log_artifact(run.info.run_id, str(Path(tmp) / "config.yaml"))
    return run.info.run_id


def end_parent(run_id: str, failed: bool) -> None:
    MlflowClient().set_terminated(run_id, "FAILED" if failed else "FINISHED")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "none"
    except (OSError, subprocess.TimeoutExpired):
        return "none"


def start_child(cfg: Config, parent_id: str, experiment_id: str, name: str, tags: dict[str, Any]) -> str:
    """A nested run for one trial, with every resolved param; returns its run id."""
    mlflow.config.enable_async_logging(True)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=name, parent_run_id=parent_id, nested=True,
                           tags={k: str(v) for k, v in tags.items()},
                           log_system_metrics=cfg.tracking.system_metrics)
    mlflow.log_params({k: str(v)[:6000] for k, v in config.flatten(config.to_dict(cfg)).items()})
    return run.info.run_id


def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    mlflow.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch, synchronous=False)


def finish_child(result: TrainResult | None, cfg: Config, final: dict[str, float], state: str,
                 reason: str = "") -> None:
    """Final metrics, figures, config and state dict; the run ends FINISHED only when COMPLETE."""
    if final:
        mlflow.log_metrics(final, synchronous=False)
    mlflow.set_tags({"state": state, "reason": reason[:5000]})
    if result is not None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "config.yaml").write_text(config.to_yaml(cfg))
            if cfg.eval.figures:
                figures.save_all(result, folder)
            torch.save(result.model.state_dict(), folder / "model_state_dict.pt")
            mlflow.log_artifacts(str(folder))
    mlflow.flush_async_logging()
    status = {"complete": "FINISHED", "pruned": "KILLED", "interrupted": "KILLED"}.get(state, "FAILED")
    mlflow.end_run(status)


def mark_run(run_id: str, status: str, reason: str) -> None:
    """Ends a run left RUNNING by a process that died (SIGKILL, lost machine)."""
    client = MlflowClient()
    run = client.get_run(run_id)
    if RunStatus.is_terminated(run.info.status):
        return
    client.set_tag(run_id, "state", "killed")
    client.set_tag(run_id, "reason", reason)
    client.set_terminated(run_id, status)
