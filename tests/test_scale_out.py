"""Scale-out: local workers sharing one study on SQLite and on PostgreSQL, an MLflow tracking server
backed by PostgreSQL, and that server lost in the middle of a study. Every variant runs exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from bench import config, report, run, study, tracking
from tests.conftest import shrink_args
from tests.helpers import (
    ONE_THREAD_ENV,
    SEEDS,
    Postgres,
    mlflow_server,
    seed_study_args,
    start_and_catch_second_trial,
)

# The smoke study's 4 families × 2 seeds: 8 variants of a second or two each.
SMOKE = ["study=smoke", "study.seeds=[0, 1]", "eval.figures=false"]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server on 127.0.0.1 for this module's tests (CI has one: tests/setup.sh)."""
    server = Postgres()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server_backend(postgres) -> str:
    """One MLflow database for the tracking-server tests: its tables are made once."""
    return postgres.database("mlflow_server")


def _stores(args: list[str]) -> tuple[list[optuna.trial.FrozenTrial], pd.DataFrame]:
    cfg = config.load(args)
    trials = optuna.load_study(study_name=study.study_name(cfg), storage=study.storage_url(cfg)).get_trials()
    mlflow.set_tracking_uri(config.tracking_uri(cfg))
    runs = mlflow.search_runs(experiment_names=[cfg.study.name])
    return trials, runs[runs["tags.mlflow.parentRunId"].notna()]


def _assert_every_variant_once(args: list[str]) -> pd.DataFrame:
    """Exactly one trial per variant, COMPLETE, with exactly one FINISHED child run; returns the runs."""
    trials, children = _stores(args)
    expected = sorted(study.variant_key(p) for p in study.variants(config.load(args)))
    assert sorted(t.user_attrs["variant"] for t in trials) == expected  # no duplicate, none missing
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(children["run_id"]) == sorted(t.user_attrs["mlflow_run_id"] for t in trials)
    assert (children["status"] == "FINISHED").all()
    return children


def test_two_workers_on_sqlite(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    args = [*SMOKE[:1], *shrink_args(tmp_path), *SMOKE[1:], "study.n_workers=2"]
    assert run.main(args) == 0
    out, err = capfd.readouterr()  # the workers' output too (they write to the same descriptors)
    assert "database is locked" not in out + err
    _assert_every_variant_once(args)


@pytest.mark.postgres
def test_four_workers_on_postgresql(postgres, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    args = [*SMOKE[:1], *shrink_args(tmp_path), *SMOKE[1:], "study.n_workers=4",
            f"study.storage={postgres.database('optuna_4')}", f"tracking.uri={postgres.database('mlflow_4')}",
            f"tracking.artifact_location={tmp_path / 'artifacts'}"]
    assert run.main(args) == 0
    out, err = capfd.readouterr()
    assert "database is locked" not in out + err and "Traceback" not in err
    children = _assert_every_variant_once(args)
    # artifacts in the configured folder, not in the working directory
    assert (tmp_path / "artifacts").is_dir() and not (tmp_path / "mlruns").exists()
    artifacts = {a.path for a in MlflowClient().list_artifacts(children["run_id"].iloc[0])}
    assert "model_state_dict.pt" in artifacts


@pytest.mark.postgres
def test_tracking_server_backed_by_postgresql(postgres, server_backend, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with mlflow_server(server_backend, tmp_path / "served", tmp_path / "server.log") as url:
        args = [*SMOKE[:1], *shrink_args(tmp_path), *SMOKE[1:], f"tracking.uri={url}",
                f"study.storage={postgres.database('optuna_server')}"]
        assert run.main(args) == 0
        experiment = mlflow.get_experiment_by_name("smoke").experiment_id
        assert f"MLflow: {url} (experiment 'smoke', {url}/#/experiments/{experiment}); Optuna: " in capsys.readouterr().out
        children = _assert_every_variant_once(args)
        run_id = children["run_id"].iloc[0]
        served = {a.path for a in MlflowClient().list_artifacts(run_id)}
        assert {"config.yaml", "model_state_dict.pt"} <= served
        assert tracking.load_model(run_id).latent_dim == 8  # downloaded through the server
    assert list((tmp_path / "served").rglob("model_state_dict.pt"))  # where the server keeps them


@pytest.mark.postgres
def test_tracking_server_lost_mid_study_loses_no_finished_work(server_backend, tmp_path, monkeypatch):
    """The server goes away while trial 1 trains: the run stops with an error (exit 1, not a hang), the
    Optuna study keeps trial 0 COMPLETE; with the server back, the same command finishes the study
    without training trial 0 again."""
    monkeypatch.chdir(tmp_path)
    env = {k: v for k, v in ONE_THREAD_ENV.items() if k not in tracking.HTTP_DEFAULTS}  # the suite's own
    with mlflow_server(server_backend, tmp_path / "served", tmp_path / "server.log") as url:
        args = [*seed_study_args(tmp_path), f"tracking.uri={url}"]
        proc = start_and_catch_second_trial(args, tmp_path, env)
    # the hang guard: with MLflow's own retry settings this took 13 minutes (see the next test)
    assert proc.wait(timeout=300) == 1, (tmp_path / "run.log").read_text()
    log = (tmp_path / "run.log").read_text()
    # nor MLflow's two "View run" lines for trial 0's run: the command's summary links the experiment once
    assert "MLflow tracking failed" in log and "View run" not in log and "View experiment" not in log, log
    cfg = config.load(args)
    trials = optuna.load_study(study_name=study.study_name(cfg), storage=study.storage_url(cfg)).get_trials()
    assert trials[0].state == TrialState.COMPLETE
    assert trials[1].state in (TrialState.RUNNING, TrialState.FAIL)  # FAIL on the next run
    kept = trials[0].user_attrs["mlflow_run_id"]

    with mlflow_server(server_backend, tmp_path / "served", tmp_path / "server.log") as url:
        # the same study: where results go (tracking.uri) is no part of it
        args = [*seed_study_args(tmp_path), f"tracking.uri={url}"]
        assert run.main(args) == 0
        trials, children = _stores(args)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["train.seed"] for t in complete) == SEEDS
    assert complete[0].user_attrs["mlflow_run_id"] == kept
    assert set(children["status"]) == {"FINISHED", "KILLED"} and (children["status"] == "KILLED").sum() == 1


def test_a_lost_tracking_server_fails_a_request_in_seconds_not_minutes():
    """MLflow retries a failed HTTP request with its own defaults (7 retries, backoff factor 2, 120 s
    timeout: 13 minutes for a server that is gone); bench.tracking lowers them for every process that
    imports it (workers inherit them), unless the user set them."""
    code = "import os, bench.tracking; print(os.environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES'], " \
           "os.environ['MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR'], os.environ['MLFLOW_HTTP_REQUEST_TIMEOUT'])"
    clean = {k: v for k, v in os.environ.items() if k not in tracking.HTTP_DEFAULTS}
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "1", "30"]
    mine = {**clean, "MLFLOW_HTTP_REQUEST_TIMEOUT": "600"}
    out = subprocess.run([sys.executable, "-c", code], env=mine, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "1", "600"]


@pytest.mark.postgres
def test_a_password_in_a_store_url_is_never_printed_logged_or_reported(postgres, tmp_path, monkeypatch, capsys):
    # trust authentication ignores the password: the URL works, and its secret must go nowhere
    monkeypatch.chdir(tmp_path)
    # generated passwords hold / and +; SQLAlchemy takes ' as given too
    url = postgres.database("secret").replace("postgresql://postgres@", "postgresql://postgres:s3cr/et'pw+x@")
    args = [*SMOKE[:1], *shrink_args(tmp_path), *SMOKE[1:], f"study.storage={url}"]
    assert run.main(args) == 0
    assert report.main([*args, f"report_dir={tmp_path / 'reports'}"]) == 0
    out, err = capsys.readouterr()
    assert "s3cr" not in out + err and "postgres:***@127.0.0.1" in out
    children = _assert_every_variant_once(args)
    assert (children["params.study.storage"].str.contains("postgres:***@", regex=False)).all()
    for run_id in children["run_id"]:
        assert "s3cr" not in mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    written = [p.read_text(encoding="utf-8", errors="replace") for p in (tmp_path / "reports").rglob("*.*")
               if p.suffix in (".md", ".html", ".csv", ".tex")]
    assert written and not any("s3cr" in text for text in written)
    # and an unreachable one's error
    unreachable = url.replace(f":{postgres.port}/", ":1/")
    assert run.main([*args, f"study.storage={unreachable}"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and "s3cr" not in err and "postgres:***@127.0.0.1:1/" in err
