"""vaebench from Python (a notebook, a script): `bench.run.run_study`, twice in one process, after a lost
store, in a thread other than the main one; the likelihood registry on its own; an installed wheel; and
nothing of the caller's (matplotlib's backend, $MLFLOW_TRACKING_URI) changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from bench import config, run, stacked, tracking, train
from bench.config import ConfigError
from models import likelihoods
from tests.conftest import shrink_args
from tests.helpers import ONE_THREAD_ENV, SEEDS, seed_study_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """The caller's folder is tmp_path, without a tracking store of its own in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_run_study_returns_the_summary_and_a_second_study_in_the_same_process_runs_too(in_tmp):
    args = [*seed_study_args(in_tmp), "train.epochs=1", "study.seeds=[0]"]
    first = run.run_study(args)
    second = run.run_study([*args, "train.lr=0.002"])  # another config: another study
    assert list(first.state) == list(second.state) == ["complete"]
    assert mlflow.active_run() is None
    model = tracking.load_model(second["run id"][0])  # as the README shows: the trained model of a row
    assert isinstance(model, torch.nn.Module) and first["run id"][0] != second["run id"][0]
    # the store the studies were given is not left in the environment, where the next would take it
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert config.tracking_uri(config.load(["study=smoke"])) == "sqlite:///mlflow.db"


def test_pointing_mlflow_at_a_store_leaves_the_environment_as_it_was(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mine.db")
    tracking.use_store("sqlite:///other.db")
    assert mlflow.get_tracking_uri() == "sqlite:///other.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///mine.db"


def test_bad_input_raises_a_config_error_naming_the_key_and_writes_nothing(in_tmp):
    with pytest.raises(ConfigError, match="train.epoch"):
        run.run_study(["study=smoke", *shrink_args(in_tmp), "train.epoch=1"])
    with pytest.raises(TypeError, match=r"\['study=smoke', 'train.epochs=1'\]"):  # not one argument per character
        run.run_study("study=smoke train.epochs=1")
    with pytest.raises(TypeError, match="list of strings"):
        run.main("study=smoke")
    assert list(in_tmp.iterdir()) == []


def test_a_config_changed_in_code_is_checked_as_one_from_the_command_line(tiny_cfg):
    with pytest.raises(ConfigError, match="likelihood.name='bernouli'"):
        train.train(config.apply(tiny_cfg, {"likelihood.name": "bernouli"}))
    with pytest.raises(ConfigError, match="train.epochs=0"):
        stacked.train_stacked([tiny_cfg, config.apply(tiny_cfg, {"train.epochs": 0})])


def test_a_run_of_the_callers_own_left_active_is_named_and_nothing_is_written(in_tmp):
    mlflow.set_tracking_uri(f"sqlite:///{in_tmp / 'mine.db'}")
    with mlflow.start_run() as mine, pytest.raises(ConfigError, match=f"an MLflow run \\({mine.info.run_id}\\) is active"):
        run.run_study(["study=smoke", *shrink_args(in_tmp)])
    assert sorted(p.name for p in in_tmp.iterdir()) == ["mine.db"]


def test_a_run_id_in_the_environment_is_named_and_nothing_is_written(in_tmp, monkeypatch):
    """`mlflow run` sets $MLFLOW_RUN_ID, which MLflow's start_run would resume instead of making a child run."""
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123abcd")
    with pytest.raises(ConfigError, match=r"\$MLFLOW_RUN_ID='0123abcd' is set .*unset it"):
        run.run_study(["study=smoke", *shrink_args(in_tmp)])
    assert list(in_tmp.iterdir()) == []


def test_after_a_lost_store_the_same_process_resumes_the_study(in_tmp, monkeypatch):
    """A write of the second trial's final metrics fails (a store gone for a moment): the study stops with
    MLflow's error, its run is not left on MLflow's stack of active runs, and running the study again in
    the same process (a notebook's cell run again) marks that trial killed and trains its variant again,
    although the process that claimed it still lives."""
    args = [*seed_study_args(in_tmp), "train.epochs=2"]
    log_batch, runs = SqlAlchemyStore.log_batch, []

    def fails_once(self, run_id, metrics, params, tags):
        if any(m.key == "test_elbo" for m in metrics):
            runs.append(run_id)
            if len(runs) == 2:
                raise MlflowException("database is locked")
        return log_batch(self, run_id, metrics, params, tags)

    monkeypatch.setattr(SqlAlchemyStore, "log_batch", fails_once)
    with pytest.raises(MlflowException, match="database is locked"):
        run.run_study(args)
    assert mlflow.active_run() is None
    table = run.run_study(args)
    assert sorted(table.state) == ["complete"] * len(SEEDS) + ["killed"]
    killed = table[table.state == "killed"]  # and the trial that trained its variant again
    assert killed["trained again by"].item() == table.trial.max()
    assert table["trained again by"].isna().sum() == len(SEEDS)
    assert sorted(table[table.state == "complete"].variant) == [f"name=bernoulli seed={s}" for s in SEEDS]


def test_a_study_runs_in_a_thread_other_than_the_main_one(in_tmp):
    """Where Python has no signal handlers (a notebook or IDE may run code there)."""
    outcome = []

    def study() -> None:
        try:
            outcome.append(run.run_study([*seed_study_args(in_tmp), "train.epochs=1", "study.seeds=[0]"]))
        except BaseException as e:  # noqa: BLE001  shown by the assertion below
            outcome.append(e)

    thread = threading.Thread(target=study)
    thread.start()
    thread.join()
    (table,) = outcome
    assert list(table.state) == ["complete"], table


def test_workers_that_die_before_taking_a_trial_are_named_not_waited_for(in_tmp):
    """A script without `if __name__ == "__main__":` starts spawned workers that fail as they import it."""
    script = in_tmp / "no_guard.py"
    script.write_text(f"from bench import run\nrun.main({[*seed_study_args(in_tmp), 'study.n_workers=2']!r})\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=in_tmp, env=ONE_THREAD_ENV, capture_output=True,
                          text=True, timeout=600, check=False)
    assert ("3 trials of this study were not started: this command's workers ended (exit code 1; their errors "
            "are above) before taking them" in proc.stderr), proc.stderr[-3000:]
    assert "bootstrapping phase" in proc.stderr  # the workers' own error


def test_importing_vaebench_leaves_matplotlibs_backend_as_it_was():
    code = ("import matplotlib; matplotlib.use('svg'); import bench.run, bench.report, bench.figures; "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "svg"


@pytest.mark.parametrize("own", ["models.py", "models/__init__.py", "models/checkpoint.pt"])
def test_a_models_module_of_the_users_folder_is_named_as_hiding_vaebenchs(own, tmp_path):
    """A folder without __init__.py (of checkpoints, say) hides nothing: Python looks past it."""
    (tmp_path / own).parent.mkdir(exist_ok=True)
    (tmp_path / own).write_text("net = None\n")
    proc = subprocess.run([sys.executable, "-c", "import bench.run; from models import likelihoods; print(likelihoods.__file__)"],
                          cwd=tmp_path, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # after the current folder, as sys.path has it
    if own.endswith(".pt"):
        assert proc.returncode == 0 and proc.stdout.strip() == str(ROOT / "models" / "likelihoods.py"), proc.stderr
    else:
        assert proc.returncode == 1
        assert f"vaebench's package 'models' ({ROOT / 'models'}) is hidden by {tmp_path / own}" in proc.stderr


def test_an_installed_wheel_holds_the_studies(tmp_path):
    """`pip install .` (not editable) or from git: the studies come with the code."""
    source = tmp_path / "source"
    for part in ("bench", "models", "studies"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source / part)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("vaebench-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = "import bench; from bench import config; print(config.STUDIES_DIR); print(config.available_studies())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}).stdout.splitlines()
    assert out[0] == str(tmp_path / "site" / "bench" / "studies")  # not a top-level `studies` of site-packages
    assert out[1] == repr(sorted(p.stem for p in (ROOT / "studies").glob("*.yaml")))


@pytest.mark.parametrize("name", likelihoods.NAMES)
def test_the_registry_on_its_own_names_a_wrong_decoder_output(name):
    lik = likelihoods.Likelihood(likelihoods.FAMILIES[name])
    p, d = lik.family.n_params, 6
    flat = torch.zeros(4, p * d)  # an nn.Linear's output, not (B, P, D)
    with pytest.raises(ValueError, match=rf"{name}: raw must have shape \(\.\.\., {p}, D\).*not \(4, {p * d}\)"):
        lik.distribution(flat, shared=torch.zeros(1), x=torch.rand(4, d))
    if lik.family.learned_scale == likelihoods.SHARED:
        with pytest.raises(ValueError, match="needs `shared`"):
            lik.distribution(torch.zeros(4, p, d))
    if lik.family.learned_scale == likelihoods.OPTIMAL:
        with pytest.raises(ValueError, match="needs `x`"):
            lik.distribution(torch.zeros(4, p, d))
    dist = lik.distribution(torch.zeros(4, p, d), shared=torch.zeros(1), x=torch.rand(4, d))
    assert (dist.batch_shape, dist.event_shape) == ((4,), (d,))
