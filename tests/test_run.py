"""The study runner end to end: `python -m bench.run study=NAME` on offline data, MLflow and Optuna in
tmp_path."""

from __future__ import annotations

import fcntl
import io
import math
import os
import pty
import re
import shutil
import struct
import sys
import termios
import threading
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.utils.async_logging.async_logging_queue import AsyncLoggingQueue
from optuna.trial import TrialState

from bench import config, report, report_data, run, study, tracking, train
from models import likelihoods
from tests.conftest import shrink_args

# Every study file must be listed here, with what a shrunk run of it must show (the coverage test
# below fails when a study in studies/ is missing from this list).
STUDIES = {
    "smoke": 4, "likelihoods": 16, "beta": 10, "latent": 10, "samples": 6, "aevb": 3, "manifold": 1,
}


def test_every_study_file_is_covered():
    assert sorted(STUDIES) == config.available_studies()


@pytest.mark.parametrize("setting", ["likelihood.min_scale=0.001", "likelihood.scale=0.1"])
def test_every_runs_config_yaml_loads_and_names_its_own_variant(tmp_path, setting):
    """A study-wide setting that some of its families read (and a joining worker's study.worker=true) left
    in a run's config.yaml made `bench.run study=config.yaml` and `load_model` refuse it (exit 2) for the
    runs whose family does not read it."""
    cfg = config.load(["study=likelihoods", setting, "study.worker=true"])
    key, value = setting.split("=")
    for params in study.variants(cfg):
        trial = config.apply(cfg, params)
        saved_path = tmp_path / "config.yaml"
        saved_path.write_text(config.to_yaml(config.one_variant(trial)))
        saved = config.load([f"study={saved_path}"])  # as bench.run and tracking.load_model read it
        assert study.variants(saved) == [{"train.seed": trial.train.seed}]
        assert (saved.study.worker, saved.likelihood.name, saved.data) == (False, trial.likelihood.name, trial.data)
        reads = key.split(".")[1] in likelihoods.FAMILIES[trial.likelihood.name].reads
        assert getattr(saved.likelihood, key.split(".")[1]) == (float(value) if reads else config.LIKELIHOOD_DEFAULTS[key])


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_every_study_file_is_valid_as_written(name):
    # the shrunk runs below override what a file sets (data, epochs, seeds, evaluation): each file must be
    # accepted as a user runs it, too
    cfg = config.load([f"study={name}"])
    assert cfg.study.name == name and len(study.variants(cfg)) >= 1


def test_the_likelihoods_study_runs_every_registered_family():
    cfg = config.load(["study=likelihoods"])
    assert {v["likelihood.name"] for v in study.variants(cfg)} == set(likelihoods.NAMES)


def test_every_study_file_starts_with_its_command():
    for name in config.available_studies():
        first = (config.STUDIES_DIR / f"{name}.yaml").read_text().splitlines()[0]
        assert first == f"# python -m bench.run study={name}"


def _runs(tmp_path: Path, experiment: str):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=[experiment])


def _optuna(tmp_path: Path, args: list[str]) -> optuna.Study:
    cfg = config.load(args)
    return optuna.load_study(study_name=study.study_name(cfg), storage=f"sqlite:///{tmp_path / 'optuna.db'}")


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_study_runs_shrunk(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [f"study={name}", *shrink_args(tmp_path)]
    assert run.main([*args, "report=true"]) == 0
    runs = _runs(tmp_path, name)
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(children) == STUDIES[name]
    trials = _optuna(tmp_path, args).get_trials()
    assert len(trials) == STUDIES[name]
    # every trial ended for good, and its run keeps the state
    assert {t.user_attrs["status"] for t in trials} <= {"complete", "diverged"}
    assert set(children["tags.state"]) <= {"complete", "diverged"}
    intro = f"Optuna study {study.study_name(config.load(args))}, {config.counted(STUDIES[name], 'run')}; generated"
    assert intro in (tmp_path / "reports" / name / "report.md").read_text(encoding="utf-8")  # "1 run" (manifold)
    # only an unbounded family can run away: every bounded one completes
    bounded = children[children["tags.bounded"] == "True"]
    assert len(bounded) and (bounded["tags.state"] == "complete").all(), bounded[["tags.family", "tags.reason"]]
    # the printed summary never shows a training objective beside a likelihood
    table = run.summary(config.load(args)).set_index("trial")
    for t in trials:
        row = table.loc[t.number]
        likelihood = children.set_index("tags.trial_number").loc[str(t.number), "tags.comparable"] == "True"
        assert t.user_attrs["comparable"] == likelihood
        shown, hidden = ("val ELBO", "objective") if likelihood else ("objective", "val ELBO")
        assert row[shown] == pytest.approx(t.user_attrs["val_elbo"], nan_ok=True)
        assert hidden not in row or pd.isna(row[hidden])
        # and says which scale a likelihood is on, the run's tag
        scale = children.set_index("tags.trial_number").loc[str(t.number), "tags.comparable_scale"]
        assert row.get("on", "") == (scale if likelihood else "")
    # and the command wrote its report, with the figure the study is about
    written = {p.name for p in (tmp_path / "reports" / name).iterdir()}
    assert {"report.md", "report.html", "tables.csv", "tables.tex", "reconstructions.png"} <= written
    assert ("manifold.png" in written) == (children["params.model.latent_dim"] == "2").any()  # manifold, latent


def test_settings_that_leave_the_results_as_they_are_keep_the_study():
    # a changed hash would start a new study, training every finished variant again
    base = config.config_hash(config.load(["study=smoke"]))
    same = ["report=false", "report_dir=elsewhere", "tracking.uri=sqlite:///other.db", "study.storage=sqlite:///o.db",
            "study.n_workers=2", "train.device=cpu", "eval.chunk=100", "data.download=false", "study.description=x"]
    assert {extra: config.config_hash(config.load(["study=smoke", extra])) for extra in same} == dict.fromkeys(same, base)
    for changed in ["train.epochs=3", "eval.iwae_k=7", "data.root=elsewhere", "study.seeds=[0,1]"]:
        assert config.config_hash(config.load(["study=smoke", changed])) != base, changed


# Each shipped study's name as this vaebench gives it. A study is found again by the hash in its name: one
# that changes for the same science (a new config key, even at a default that changes nothing) makes every
# user's next command train their studies again from nothing, and `bench.report` miss their runs.
SHIPPED_STUDY_NAMES = {"aevb": "aevb-26956365", "beta": "beta-4b5d31b1", "latent": "latent-b6ea16d9",
                       "likelihoods": "likelihoods-d525d91f", "manifold": "manifold-393a9324",
                       "samples": "samples-7f52e572", "smoke": "smoke-0b97daea"}


def test_the_shipped_studies_keep_their_names_across_versions():
    assert {name: study.study_name(config.load([f"study={name}"])) for name in config.available_studies()} == \
        SHIPPED_STUDY_NAMES, ("a study's hash changed: if its science did not, make config.config_hash leave it as it was "
                              "(e.g. a new key left out while at a default that changes nothing); else tell users")


def test_smoke_study_logs_everything_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # system metrics on, as by default (the shrunk configs turn them off): each run starts MLflow's monitor
    args = ["study=smoke", *shrink_args(tmp_path), "train.epochs=2", "model.latent_dim=2", "tracking.system_metrics=true"]
    monitors = []
    start_monitor = SystemMetricsMonitor.start
    monkeypatch.setattr(SystemMetricsMonitor, "start", lambda self: monitors.append(self) or start_monitor(self))
    monkeypatch.delenv("MLFLOW_ENABLE_ASYNC_LOGGING", raising=False)  # a user's setting would route system metrics there
    queues = []  # MLflow's asynchronous logging: ending a run that used it waits ~1 s for its queue thread's poll
    activate = AsyncLoggingQueue.activate
    monkeypatch.setattr(AsyncLoggingQueue, "activate", lambda queue: queues.append(queue) or activate(queue))
    assert run.main(args) == 0
    assert queues == []  # the epochs went through EpochLog's own writer thread
    # the printed config's likelihood.name and data.binarize are not what runs: the grids set them
    assert "(not the values above): data.binarize, likelihood.name, train.seed" in capsys.readouterr().out
    runs = _runs(tmp_path, "smoke")
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(parents) == 1 and parents["status"].item() == "FINISHED"
    assert not (tmp_path / "reports").exists()  # report=false (the shrunk configs')
    # whether and where the report is written is no part of the study: the same hash, the same study
    assert config.config_hash(config.load([*args, "report=true", "report_dir=elsewhere"])) == \
        config.config_hash(config.load(args))
    assert (children["tags.mlflow.parentRunId"] == parents["run_id"].item()).all()
    assert len(children) == 4 and (children["status"] == "FINISHED").all()
    for column in ["metrics.train_elbo", "metrics.val_elbo", "metrics.train_kl", "metrics.train_objective",
                   "metrics.samples_per_s", "metrics.ms_per_step", "metrics.peak_memory_mb",
                   "metrics.test_elbo", "metrics.test_iwae_nll", "metrics.test_iwae_nll_se", "metrics.test_bpd",
                   "metrics.anomaly_kl_noise", "metrics.active_units", "params.likelihood.name",
                   "params.train.lr", "tags.family", "tags.bounded", "tags.measure", "tags.data_protocol",
                   "tags.device", "tags.torch_version", "tags.git_commit", "tags.trial_number"]:
        assert children[column].notna().all(), column
    assert sorted(m._run_id for m in monitors) == sorted(children.run_id)  # (a trial this short logs none)
    assert children["tags.git_commit"].str.fullmatch(r"[0-9a-f]{40}(-dirty)?").all()  # -dirty: edited code
    # the 8-bit pmf and the densities' dequantized bounds: two measures, one scale to compare them on
    scale = children.set_index("tags.family")["tags.comparable_scale"].to_dict()
    assert scale == {"bernoulli": "pmf of binarized pixels", "gaussian": "pmf of 8-bit pixels",
                     "laplace": "pmf of 8-bit pixels", "discretized_logistic": "pmf of 8-bit pixels"}
    client = MlflowClient()
    child = children.iloc[0]
    # one point per epoch, at its number: the report's curves and MLflow's chart are drawn against it
    assert sorted(m.step for m in client.get_metric_history(child.run_id, "val_elbo")) == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(child.run_id)}
    assert {"config.yaml", "reconstructions.png", "samples.png", "manifold.png", "elbo_curve.png",
            "model_state_dict.pt"} <= artifacts
    # its config.yaml is a study of that one variant: bench.run with it trains that run again
    saved = config.load([f"study={client.download_artifacts(child.run_id, 'config.yaml', str(tmp_path))}"])
    assert study.variants(saved) == [{"train.seed": 0}]
    assert (saved.likelihood.name, saved.data.binarize) == (child["params.likelihood.name"], child["params.data.binarize"])

    trials = _optuna(tmp_path, args).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == set(children["run_id"])
    assert {t.params["likelihood.name"] for t in trials} == {"bernoulli", "gaussian", "laplace",
                                                             "discretized_logistic"}

    # the console's samples/s are the report's: each run's median epoch
    by_run = report_data.load(args).runs.set_index("run_id").samples_per_s
    summary = run.summary(config.load(args)).set_index("trial")["samples/s (median epoch)"]
    assert [summary[t.number] for t in trials] == pytest.approx([by_run[t.user_attrs["mlflow_run_id"]] for t in trials])

    # the same command again: nothing new, and the study's parent run keeps its end time
    assert run.main(args) == 0
    assert len(_runs(tmp_path, "smoke")) == len(runs)
    parent = _runs(tmp_path, "smoke").set_index("run_id").loc[parents["run_id"].item()]
    assert (parent.status, parent.end_time) == ("FINISHED", parents["end_time"].item())
    assert len(_optuna(tmp_path, args).get_trials()) == 4
    # a parent left FAILED (workers that died after the last trial) with every trial done: FINISHED now
    client.set_terminated(parents["run_id"].item(), "FAILED")
    assert run.main(args) == 0
    assert client.get_run(parents["run_id"].item()).info.status == "FINISHED"


def test_a_summary_of_training_objectives_only_shows_no_likelihood_columns(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "objective.yaml"  # a density at binary values: no likelihood of the data
    path.write_text("data:\n  binarize: static\nlikelihood:\n  name: laplace\n")
    args = [f"study={path}", *shrink_args(tmp_path)]
    assert run.main(args) == 0
    table = run.summary(config.load(args))
    assert "objective" in table and "val ELBO" not in table and "on" not in table
    assert "None" not in capsys.readouterr().out


def test_changed_config_makes_a_new_study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["study=smoke", *shrink_args(tmp_path)]
    a = study.study_name(config.load(base))
    b = study.study_name(config.load([*base, "train.lr=0.01"]))
    assert a != b and a.startswith("smoke-")
    # where results go does not change the study
    assert a == study.study_name(config.load([*base, "study.n_workers=2"]))


def test_variant_labels_shorten_keys_only_where_unambiguous():
    params = {"data.name": "digits", "likelihood.name": "bernoulli", "data.seed": 1, "train.seed": 0,
              "train.beta": 2.0}
    assert study.variant_label(params) == \
        "data.name=digits likelihood.name=bernoulli data.seed=1 train.seed=0 beta=2.0"
    assert study.variant_label({"likelihood.name": "bernoulli", "train.seed": 0}) == "name=bernoulli seed=0"


def test_diverging_variant_is_recorded_and_the_study_goes_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "diverge.yaml"
    path.write_text(
        "study:\n  grids:\n    - likelihood.name: [gaussian_learned, bernoulli]\n"
        "data:\n  binarize: static\n"
    )
    args = [f"study={path}", *shrink_args(tmp_path), "data.limit=0", "train.epochs=25"]
    assert run.main(args) == 0
    children = _runs(tmp_path, "diverge")
    children = children[children["tags.mlflow.parentRunId"].notna()].set_index("tags.family")
    assert children.loc["gaussian_learned", "tags.state"] == "diverged"
    assert children.loc["gaussian_learned", "status"] == "FAILED"
    assert "unbounded" in children.loc["gaussian_learned", "tags.reason"]
    assert children.loc["bernoulli", "status"] == "FINISHED"
    trials = {t.params["likelihood.name"]: t for t in _optuna(tmp_path, args).get_trials()}
    assert trials["gaussian_learned"].state == TrialState.FAIL
    assert "collapsed" in trials["gaussian_learned"].user_attrs["reason"]
    assert trials["bernoulli"].state == TrialState.COMPLETE


@pytest.mark.parametrize("storage", ["kept", "lost"])  # lost: the outcomes are taken back from the runs
def test_a_variant_that_diverged_by_the_retired_scale_collapse_rule_is_trained_again(storage, tmp_path, monkeypatch,
                                                                                      capsys):
    """Before 8697eec a learned scale that dipped on dequantized pixels ended the run as diverged, a rule the
    current divergence check does not apply there: a study resumed by this vaebench trains such a variant
    again (the report reads each variant's last attempt), and keeps one on binarized pixels diverged."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "learned.yaml"
    path.write_text("study:\n  grids:\n    - likelihood.name: [gaussian_learned]\n"
                    "      data.binarize: [none, static]\n")
    args = [f"study={path}", *shrink_args(tmp_path)]
    checked = train.divergence
    collapsed = ("learned scale collapsed to 1.00e-06 < 3.91e-05 (train.scale_collapse=0.01 of the pixel quantum "
                 "0.003906): gaussian_learned is unbounded, its log p grows without limit")
    monkeypatch.setattr(train, "divergence", lambda *args: collapsed)  # as vaebench before 8697eec, on any data
    assert run.main(args) == 0
    monkeypatch.setattr(train, "divergence", checked)
    if storage == "lost":
        (tmp_path / "optuna.db").unlink()
    capsys.readouterr()
    assert run.main(args) == 0
    assert ("1 of the 2 variants to run (1 ended as diverged by a rule this vaebench no longer applies: a learned scale that "
            "dipped on dequantized pixels)" + (", 1 taken from their finished MLflow runs" if storage == "lost" else "")
            ) in capsys.readouterr().out
    trials = _optuna(tmp_path, args).get_trials()
    outcomes = [(t.params["data.binarize"], t.user_attrs["status"]) for t in trials]
    assert outcomes == ([("none", "diverged"), ("static", "diverged"), ("none", "complete")] if storage == "kept" else
                        [("none", "complete"), ("static", "diverged")])


def test_pruning_is_median_for_a_search_space_and_off_for_grid_variants(tmp_path):
    grid = config.load(["study=smoke"])
    assert isinstance(study.pruner(grid), optuna.pruners.NopPruner)
    # asked for, on grid variants that share data and measure (smoke's would not)
    lrs = tmp_path / "lrs.yaml"
    lrs.write_text("data:\n  binarize: static\nstudy:\n  grids:\n    - train.lr: [0.001, 0.01]\n")
    assert isinstance(study.pruner(config.load([f"study={lrs}", "study.pruner=median"])).inner,
                      optuna.pruners.MedianPruner)
    one_data = tmp_path / "one_data.yaml"  # a data key with one value: the same data for every variant
    one_data.write_text("study:\n  grids:\n    - data.binarize: [none]\n"
                        "      likelihood.name: [gaussian, laplace, discretized_logistic]\n")
    assert isinstance(study.pruner(config.load([f"study={one_data}", "study.pruner=median"])).inner,
                      optuna.pruners.MedianPruner)


GRID_AND_SEARCH = ("data:\n  binarize: static\nstudy:\n  n_trials: 20\n  grids:\n    - train.beta: [0.5, 1, 2, 4, 8]\n"
                   "  search_space:\n    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")


def _settled(optuna_study: optuna.Study, kind: str, values: list[float], lrs: tuple[float, ...] = ()) -> None:
    """Trials COMPLETE with these values, reported at epochs 1-3: grid variants, or search trials with
    these lrs."""
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    for i, value in enumerate(values):
        params = {"train.lr": lrs[i]} if lrs else {}
        optuna_study.add_trial(optuna.trial.create_trial(
            value=value, params=params, distributions={key: lr for key in params},
            user_attrs={"kind": "search"} if kind == "search" else {}, intermediate_values={1: value, 2: value, 3: value}))


def test_the_search_is_pruned_among_its_own_trials_from_the_second_epoch(tmp_path):
    # Grid variants (other settings, never pruned under auto) counted among the pruner's trials: a search
    # trial was pruned against a median of two search trials and four grid variants, or of grid variants alone
    path = tmp_path / "both.yaml"
    path.write_text(GRID_AND_SEARCH)
    cfg = config.load([f"study={path}"])
    optuna_study = optuna.create_study(direction="maximize", pruner=study.pruner(cfg))
    _settled(optuna_study, "grid", [0.0] * 5)

    def prunes(value: float, epoch: int) -> bool:
        trial = optuna_study.ask()
        trial.set_user_attr("kind", "search")
        trial.report(value, epoch)
        pruned = trial.should_prune()
        optuna_study.tell(trial, state=TrialState.FAIL)
        return pruned

    assert not prunes(-100.0, 2)  # no search trial has finished: nothing to compare with
    _settled(optuna_study, "search", [0.0] * 5)
    assert not prunes(-100.0, 1)  # one epoch says little of a slow starter
    assert prunes(-100.0, 2)


def test_tpe_draws_for_the_search_as_if_the_grid_variants_were_not_there(tmp_path):
    # TPE draws its first 10 trials at random: 10 grid variants among them made it model the search's
    # lr from 3 search trials, and take grid variants (with no lr) among its good trials
    path = tmp_path / "both.yaml"
    path.write_text(GRID_AND_SEARCH)
    cfg = config.load([f"study={path}"])

    def draw(grid_variants: int) -> float:
        optuna_study = optuna.create_study(direction="maximize", sampler=study._sampler(cfg))
        _settled(optuna_study, "grid", [10.0] * grid_variants)
        _settled(optuna_study, "search", [1.0, 2.0, 3.0], (1e-3, 2e-3, 5e-3))
        trial = optuna_study.ask()
        trial.set_user_attr("kind", "search")
        optuna_study.sampler = study._sampler(cfg, 13)
        return study.trial_params(trial, cfg)["train.lr"]

    assert draw(10) == draw(0)


def test_the_readme_search_example_is_a_valid_study(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("A search study, say `my_search.yaml`")[1].split("```yaml\n")[1].split("```")[0]
    (tmp_path / "my_search.yaml").write_text(example)
    cfg = config.load([f"study={tmp_path / 'my_search.yaml'}"])
    assert cfg.study.n_trials == 30 and set(cfg.study.search_space) == {"train.lr", "train.batch_size", "model.hidden"}


def test_under_auto_pruning_only_search_trials_report_and_grid_variants_all_finish(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "mixed.yaml"  # a grid on 8-bit data beside a search on binarized data
    path.write_text("study:\n  n_trials: 1\n  grids:\n    - data.binarize: [none]\n"
                    "      likelihood.name: [discretized_logistic]\n"
                    "  search_space:\n    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
                    "data:\n  binarize: static\n")
    args = [f"study={path}", *shrink_args(tmp_path), "train.epochs=2"]
    assert run.main(args) == 0
    trials = {t.user_attrs.get("kind", "grid"): t for t in _optuna(tmp_path, args).get_trials()}
    assert trials["grid"].intermediate_values == {} and trials["grid"].state == TrialState.COMPLETE
    assert set(trials["search"].intermediate_values) == {1, 2}
    path = tmp_path / "search.yaml"
    path.write_text("study:\n  n_trials: 2\n  search_space:\n    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    assert isinstance(study.pruner(config.load([f"study={path}"])).inner, optuna.pruners.MedianPruner)


def test_a_pruned_trial_keeps_its_last_validation_elbo(tmp_path, monkeypatch, capsys):
    # it was recorded as NaN: the command's summary printed "—" where the report showed its value
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "lrs.yaml"
    path.write_text("data:\n  binarize: static\nstudy:\n  grids:\n    - train.lr: [0.001]\n")
    args = [f"study={path}", *shrink_args(tmp_path), "train.epochs=3", "study.pruner=median"]
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    assert run.main(args) == 0
    (trial,) = _optuna(tmp_path, args).get_trials()
    assert trial.state == TrialState.PRUNED
    run_id = trial.user_attrs["mlflow_run_id"]
    logged = MlflowClient().get_metric_history(run_id, "val_elbo")
    assert [m.step for m in logged] == [1] and trial.user_attrs["val_elbo"] == pytest.approx(logged[0].value)
    assert re.search(rf" pruned +{logged[0].value:.2f} ", capsys.readouterr().out)  # the command's summary
    run_ = MlflowClient().get_run(run_id)  # in the MLflow UI, not a run that went the distance
    assert (run_.info.status, run_.data.tags["state"]) == ("KILLED", "pruned")


def test_search_space_runs_tpe_trials(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "search.yaml"
    path.write_text("study:\n  n_trials: 3\n  search_space:\n    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
                    "    model.hidden: {kind: categorical, choices: [[32], [16, 8]]}\n"
                    "data:\n  binarize: static\n")
    args = [f"study={path}", *shrink_args(tmp_path)]
    assert run.main(args) == 0
    assert ": 3 search trials to run\n" in capsys.readouterr().out
    trials = _optuna(tmp_path, args).get_trials()
    assert len(trials) == 3 and all(1e-4 <= t.params["train.lr"] <= 1e-2 for t in trials)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # a list choice reaches the config as a list: the run's model has those layers
    children = _runs(tmp_path, config.load(args).study.name).dropna(subset=["tags.trial_number"])
    assert len(children) == 3 and set(children["params.model.hidden"]) <= {"[32]", "[16, 8]"}
    # more trials continue the same search: its 3 trials are kept, 1 more runs
    assert run.main([*args, "study.n_trials=4"]) == 0
    more = _optuna(tmp_path, args).get_trials()
    assert len(more) == 4 and [t.params for t in more[:3]] == [t.params for t in trials]
    assert len({t.params["train.lr"] for t in more}) == 4  # a new point: not the first trial's again


def test_help_lists_studies_and_keys(capsys):
    assert run.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "likelihoods" in out and "train.n_samples" in out and "gaussian_learned" in out
    # every key with its default and what it means, from the comment beside its field
    keys = out.split("keys and defaults:\n")[1].strip().splitlines()
    assert len(keys) == len(config.flatten(config.to_dict(config.Config())))
    assert all("  # " in line for line in keys), [line for line in keys if "  # " not in line]
    assert "  train.beta = 1.0  # weight of the KL in the training objective" in keys
    # each family with what it is, from the registry
    assert "  bernoulli: Bernoulli(logits): the pmf of binary pixels" in out
    assert all(f"  {name}: " in out for name in likelihoods.NAMES)


def _written() -> None:
    """Returns once EpochLog's writer thread has written every batch it was given (it takes them in order)."""
    tracking._EPOCH_WRITER.submit(lambda: None).result()


def test_epoch_log_sends_the_first_epoch_at_once_and_every_epoch_with_its_step(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("epochs")).info.run_id
    epoch_log = tracking.EpochLog(run_id, every_s=3600)

    def history() -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run_id, "val_elbo")]

    for epoch in range(1, 6):
        epoch_log(epoch, {"epoch": epoch, "val_elbo": -100.0 + epoch})
    _written()
    assert history() == [(1, -99.0)]  # the rest wait for the interval or the run's end
    epoch_log.wait()
    assert history() == [(e, -100.0 + e) for e in range(1, 6)]
    assert "epoch" not in client.get_run(run_id).data.metrics


def test_infinite_metrics_are_stored_as_nan_not_as_the_largest_float(tmp_path):
    # MLflow would store ±∞ as ±1.8e308: a finite number that a report would average and plot
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("inf")).info.run_id
    epoch_log = tracking.EpochLog(run_id)
    epoch_log(1, {"epoch": 1, "val_elbo": -math.inf, "max_log_p_per_pixel": math.inf, "train_kl": 2.5})
    with mlflow.start_run(run_id):
        tracking.finish_child(None, config.load([]), {"test_iwae_gain": math.inf, "test_kl": 3.0}, "diverged",
                              "non-finite val_elbo", epoch_log)
    metrics = client.get_run(run_id).data.metrics
    assert math.isnan(metrics["val_elbo"]) and math.isnan(metrics["max_log_p_per_pixel"])
    assert math.isnan(metrics["test_iwae_gain"])
    assert metrics["train_kl"] == 2.5 and metrics["test_kl"] == 3.0


def test_epoch_log_keeps_one_batch_in_flight_and_sends_the_epochs_behind_it_together(tmp_path, monkeypatch):
    """A slow store (or a server retrying) gets the next epochs in one batch once the last is written, not
    a queue of batches."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    written, batches = threading.Event(), []

    def slow(client, run_id, metrics, synchronous):
        written.wait(30)
        batches.append([m.step for m in metrics])

    monkeypatch.setattr(MlflowClient, "log_batch", slow)
    epoch_log = tracking.EpochLog("run", every_s=0)  # would send every epoch
    for epoch in range(1, 6):
        epoch_log(epoch, {"val_elbo": float(epoch)})
    written.set()
    epoch_log.wait()
    assert batches == [[1], [2, 3, 4, 5]]


def test_epoch_log_stops_sending_after_a_failed_write_and_reports_it_as_a_tracking_error(tmp_path, monkeypatch):
    """After a failed batch nothing more is sent (a store that stops answering would otherwise get every
    later batch, each retried in full, before the process could exit); `wait` raises MlflowException,
    which the runner reports as a tracking failure (exit 1), whatever the writer hit."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    batches = []

    def refused(client, run_id, metrics, synchronous):
        batches.append([m.step for m in metrics])
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(MlflowClient, "log_batch", refused)
    epoch_log = tracking.EpochLog("run", every_s=0)
    epoch_log(1, {"val_elbo": 1.0})
    _written()
    for epoch in range(2, 5):
        epoch_log(epoch, {"val_elbo": float(epoch)})
    with pytest.raises(MlflowException, match="ConnectionRefusedError: connection refused"):
        epoch_log.wait()
    assert batches == [[1]]


def test_the_report_is_written_once_the_runs_are_kept_and_a_joining_worker_leaves_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["study=smoke", *shrink_args(tmp_path), "report=true"]
    folder = tmp_path / "reports" / "smoke"

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "write", disk_full)
        assert run.main(args) == 1  # every trial ended, but the report the command promises is missing
    err = capsys.readouterr().err
    assert "cannot write the report (" in err and "the study's runs are kept" in err
    children = _runs(tmp_path, "smoke").query("`tags.mlflow.parentRunId`.notna()")
    assert len(children) == 4 and (children["tags.state"] == "complete").all()
    assert not folder.exists()
    # a bug in the report, too, is named after the finished study, not a traceback
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "write", lambda *_args, **_kwargs: 1 / 0)
        assert run.main(args) == 1
    assert "error: the report failed (ZeroDivisionError: division by zero)" in capsys.readouterr().err
    # the same command again trains nothing and writes the report
    assert run.main(args) == 0
    assert len(_runs(tmp_path, "smoke").query("`tags.mlflow.parentRunId`.notna()")) == 4
    assert (folder / "report.html").is_file() and "## Summary: which likelihood" in (folder / "report.md").read_text()
    # a worker joining the study (from another machine) trains, and leaves the report to the study's command
    shutil.rmtree(folder)
    assert run.main([*args, "study.worker=true"]) == 0
    assert not folder.exists()


def test_a_search_trial_cut_short_is_not_reported_as_a_variant_left_untrained(tmp_path):
    # the next command draws a new search trial in its place: only a grid variant's last trial counts
    path = tmp_path / "mixed.yaml"
    path.write_text("study:\n  n_trials: 1\n  grids:\n    - likelihood.name: [bernoulli]\n"
                    "  search_space:\n    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\ndata:\n  binarize: static\n")
    cfg = config.load([f"study={path}"])
    optuna_study = optuna.create_study()
    grid = study.variants(cfg)[0]
    for variant, status in ((grid, "interrupted"), ({"train.lr": 0.001, "train.seed": 0}, "killed")):
        optuna_study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={
            study.VARIANT: study.variant_key(variant), study.STATUS: status}))
    assert study.cut_short(optuna_study, cfg) == ["trial 0 interrupted"]


def test_artifacts_go_beside_the_sqlite_store_not_into_the_current_folder(tmp_path, monkeypatch):
    """The experiment's artifact folder is fixed when it is made: in the folder the command ran from, the
    models would be lost with it, or left behind when the study's folder is moved."""
    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = ["study=smoke", *shrink_args(store), "study.grids=[{likelihood.name: [bernoulli]}]", "data.binarize=static"]
    assert run.main(args) == 0
    assert list(elsewhere.iterdir()) == []
    (child,) = _runs(store, "smoke").dropna(subset=["tags.trial_number"]).run_id
    assert any((store / "mlartifacts").rglob(f"{child}/artifacts/*"))


def _lr_search(tmp_path: Path, n_trials: int) -> Path:
    """A study that only searches the learning rate."""
    path = tmp_path / "search.yaml"
    path.write_text(f"study:\n  n_trials: {n_trials}\n  grids: []\n  search_space:\n"
                    "    train.lr: {low: 1.0e-4, high: 1.0e-2}\n")
    return path


def test_a_point_a_search_draws_twice_is_two_trials_not_an_attempt_trained_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load([f"study={_lr_search(tmp_path, n_trials=2)}", *shrink_args(tmp_path)])
    optuna_study = optuna.create_study(study_name=study.study_name(cfg), storage=study.storage_url(cfg))
    for state, status, value in ((TrialState.FAIL, "killed", None), (TrialState.COMPLETE, "complete", -90.0)):
        optuna_study.add_trial(optuna.trial.create_trial(  # the same point twice, as TPE may draw it
            state=state, value=value, user_attrs={study.KIND: "search", study.STATUS: status,
                                                  study.VARIANT: study.variant_key({"train.lr": 0.001})}))
    table = run.summary(cfg)
    assert list(table.state) == ["killed", "complete"] and table["trained again by"].isna().all()


def test_search_trials_cut_short_are_drawn_again(tmp_path):
    """After a Ctrl-C, a resumed search still trains study.n_trials trials that ended; one counted as
    done would let the command exit 0 with fewer than asked."""
    cfg = config.load([f"study={_lr_search(tmp_path, n_trials=4)}"])
    optuna_study = optuna.create_study(direction="maximize")
    ended = [(TrialState.COMPLETE, "complete"), (TrialState.FAIL, "diverged"), (TrialState.FAIL, "interrupted"),
             (TrialState.FAIL, "killed"), (TrialState.FAIL, "failed")]
    for state, status in ended:
        optuna_study.add_trial(optuna.trial.create_trial(
            state=state, value=-90.0 if state == TrialState.COMPLETE else None,
            user_attrs={study.KIND: "search", study.STATUS: status}))
    assert study.search_trials_left(optuna_study, cfg) == 2  # 4 less the complete and the diverged one



class _Terminal(io.StringIO):
    """What is written, as a string; a pseudo-terminal of `columns` behind it, which tqdm asks for its width."""

    def __init__(self, columns: int):
        super().__init__()
        self.pty = pty.openpty()
        fcntl.ioctl(self.pty[1], termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.pty[1]

    def close(self) -> None:
        for fd in self.pty:
            os.close(fd)
        super().close()


@pytest.mark.parametrize("stderr", ["terminal", "log file", "terminal of no width"])
def test_progress_bars_on_a_terminal_and_lines_in_a_log_file(stderr, tmp_path, monkeypatch, request):
    """In a log file (nohup, a scheduler's job log) each bar update would be a line of escape codes; on a
    terminal of no width (`docker run -t` without one) tqdm draws nothing."""
    monkeypatch.chdir(tmp_path)
    err = {"terminal": lambda: _Terminal(100), "log file": io.StringIO, "terminal of no width": lambda: _Terminal(0)}
    stream = err[stderr]()
    request.addfinalizer(stream.close)
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(study._ProgressLines, "EVERY_S", 0)  # a line every epoch and IWAE batch, not a minute
    assert run.main(["study=smoke", *shrink_args(tmp_path), "train.epochs=2"]) == 0
    text = sys.stderr.getvalue()
    lines = re.findall(r"^\d\d:\d\d:\d\d worker 0: trial (\d) [^:]+: (.+)$", text, re.MULTILINE)
    if stderr == "terminal":
        assert "epoch/s" in text and "trial/s" in text and not lines
        return
    assert "epoch/s" not in text and "\x1b" not in text and "\r" not in text
    for n, queued in zip("0123", ["3 more variants", "2 more variants", "1 more variant", "0 more variants"]):
        said = [what for number, what in lines if number == n]
        took = "" if n == "0" else r"; its complete trials took \d+ s on average"
        assert re.fullmatch(rf"training 2 epochs \({queued} to start{took}\)", said[0]), said
        assert re.fullmatch(r"epoch 1/2, val ELBO -[\d.]+, about \d+ s left of training", said[1]), said
        assert re.fullmatch(r"epoch 2/2, val ELBO -[\d.]+", said[2]) and said[3].startswith("test IWAE-8 on ")
        assert re.fullmatch(r"complete, val ELBO -[\d.]+, after \d+ s", said[-1]), said


@pytest.mark.parametrize("done, total, seconds, said", [
    (1, 4, 10, "about 30 s left"), (3, 63, 12, "about 4 min left"), (1, 61, 120, "about 2.0 h left"),
    (10, 11, 0.5, "about 1 s left"), (0, 4, 10, ""), (4, 4, 10, ""),  # nothing timed yet; nothing left
])
def test_a_log_says_how_long_a_trial_has_left(done, total, seconds, said, monkeypatch):
    """At the rate so far, as a progress bar shows it: a log's reader knows when to look again."""
    monkeypatch.setattr(study.time, "monotonic", lambda: 1000.0 + seconds)
    assert study._ProgressLines.left(done, total, since=1000.0) == said


def test_the_mean_time_of_a_trial_leaves_out_runs_recorded_as_trials_afterwards():
    """A run's outcome recorded as a trial after it ended (the Optuna store was lost) took no time there."""
    optuna_study = optuna.create_study(direction="maximize")
    optuna_study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=-90.0))
    optuna_study.enqueue_trial({})
    assert study._left(optuna_study, config.load([])) == "1 more variant to start"


def test_a_log_says_why_a_trial_diverged_or_failed(tmp_path, monkeypatch, capsys):
    """Where the progress is lines (a job's log), a trial's last line gives the reason and, for a divergence,
    the epoch; a trial that failed leaves its traceback, which its one-line reason in MLflow lacks."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ends.yaml"  # gaussian_learned's σ (near 1 at the start) is below 2 in epoch 1
    path.write_text("study:\n  grids:\n    - likelihood.name: [bernoulli, gaussian_learned]\n"
                    "data:\n  binarize: static\ntrain:\n  scale_collapse: 2.0\n")
    real_train = study.train

    def bernoulli_fails(cfg, *args):
        if cfg.likelihood.name == "bernoulli":
            raise RuntimeError("a bug in a likelihood")
        return real_train(cfg, *args)

    monkeypatch.setattr(study, "train", bernoulli_fails)
    assert run.main([f"study={path}", *shrink_args(tmp_path), "train.epochs=2"]) == 1
    err = capsys.readouterr().err
    assert "in other processes" not in err  # its own trial failed, not a joining worker's
    assert re.search(r"^\d\d:\d\d:\d\d worker 0: trial 0 name=bernoulli seed=0: failed \(RuntimeError: a bug in a "
                     r"likelihood\), after \d+ s$", err, re.MULTILINE), err
    assert re.search(r"trial 0 name=bernoulli seed=0 failed:\nTraceback \(most recent call last\):\n(.+\n)+"
                     r"RuntimeError: a bug in a likelihood\n", err), err
    assert re.search(r"trial 1 name=gaussian_learned seed=0: test IWAE-8 on 20 images \(of the model as it diverged\)$",
                     err, re.MULTILINE), err
    assert re.search(r"trial 1 name=gaussian_learned seed=0: diverged in epoch 1/2 \(learned scale collapsed to "
                     r"\S+ < \S+ \(train\.scale_collapse=2 .+\), val objective \(not a likelihood\) -?[\d.]+, after \d+ s$",
                     err, re.MULTILINE), err
