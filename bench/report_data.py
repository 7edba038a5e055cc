"""The study a report is of (`select`) and everything read about it (`load`): its MLflow runs, with their
params, tags, metrics and validation curves, and its Optuna trials. Reads only: nothing is created in the
stores. bench/report.py turns this into the report."""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bench import config, states, tracking
from bench import study as study_mod
from bench.config import Config, ConfigError
from models import likelihoods

# Per-run numbers of the family table: (column, label). Likelihood-valued ones are listed in
# LIKELIHOOD_VALUED: they mean something only on a comparable measure, and a row on another measure shows
# its test ELBO in a column of its own, OBJECTIVE, never beside a likelihood.
IWAE_GAIN = "IWAE − ELBO, same images"  # the IWAE's images only: the test ELBO column is the whole split
METRICS = [
    ("val_elbo", "val ELBO"), ("test_elbo", "test ELBO"), ("test_recon", "test recon"), ("test_kl", "test KL"),
    ("test_iwae_nll", "IWAE NLL"), ("test_iwae_nll_se", "IWAE s.e."), ("test_iwae_mc_se", "IWAE MC s.e."),
    ("test_iwae_ess", "IWAE ESS"), ("test_iwae_gain", IWAE_GAIN), ("test_bpd", "bits/dim"), ("min_scale", "min scale"),
    ("active_units", "active units"),
    ("samples_per_s", "samples/s"), ("ms_per_step", "ms/step"),
]
LIKELIHOOD_VALUED = ("val_elbo", "test_elbo", "test_recon", "test_iwae_nll", "test_iwae_nll_se", "test_iwae_mc_se",
                     "test_iwae_gain", "test_bpd")
# Per-epoch speed metrics, read as each run's median epoch (tracking.run_median_epoch), not the last's
SPEED = ("samples_per_s", "ms_per_step")
WHERE_KEYS = ("tracking.uri", "study.storage", "report_dir")  # the overrides experiment= and run= take


@dataclass
class Selection:
    cfg: Config  # where the stores are (tracking.uri, study.storage) and where to write (report_dir)
    name: str  # the MLflow experiment = the study name; the report folder
    optuna_study: str  # `<study>-<config hash>`
    parent: pd.Series  # the parent run (a row of mlflow.search_runs)
    children: pd.DataFrame  # its child runs, one per trial
    how: str  # how it was selected, for the provenance


def _check_store(uri: str) -> None:
    # An SQLite URI that does not exist would be created empty by MLflow: refuse instead.
    path = tracking.sqlite_path(uri)
    if path is None:
        tracking.check_reachable(uri)
        return
    if not path.is_file():
        raise ConfigError(f"no MLflow store at {path} (tracking.uri={uri!r}); run `python -m bench.run "
                          "study=NAME` first, or pass the tracking.uri it used")
    # an empty file, or another program's database
    if tracking.SCHEMA_TABLE["MLflow"] not in _require_sqlite("tracking.uri", uri, path):
        raise ConfigError(f"no MLflow store at {path} (tracking.uri={uri!r}: an SQLite database without "
                          "MLflow's tables); run `python -m bench.run study=NAME` first, or pass the tracking.uri it used")


def _require_sqlite(key: str, url: str, path: Path) -> set[str]:
    """The tables of an SQLite store; a file that SQLite cannot open would fail deep inside MLflow or
    Optuna: refused here."""
    if not tracking.is_sqlite_file(path):
        raise ConfigError(f"{key}={url!r}: {path} is not an SQLite database; pass the {key} that "
                          "`python -m bench.run` used")
    try:
        return tracking.sqlite_tables(path)
    except sqlite3.DatabaseError as e:  # damaged past its header, or locked by a writer for seconds
        raise ConfigError(f"{key}={url!r}: {path} cannot be read as an SQLite database ({e})") from None


def _parents(frame: pd.DataFrame) -> pd.DataFrame:
    col = f"tags.{tracking.STUDY_TAG}"
    return frame[frame[col].notna()] if col in frame else frame.iloc[:0]


def _all_parents(client: MlflowClient) -> pd.DataFrame:
    """Every study's parent run in the store, with its experiment's name."""
    frame = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{tracking.STUDY_TAG}` LIKE '%'")
    names = {e.experiment_id: e.name for e in client.search_experiments()}
    return frame.assign(experiment=frame.get("experiment_id", pd.Series(dtype=str)).map(names))


def _parent_list(parents: pd.DataFrame) -> str:
    tag = f"tags.{tracking.STUDY_TAG}"
    return "; ".join(f"run={r} ({s})" for r, s in zip(parents.run_id, parents[tag])) if len(parents) else "none"


def select(argv: list[str]) -> Selection:
    """The study named on the command line; raises ConfigError (naming the valid choices) when it does
    not exist. Reads only: nothing is created in the stores."""
    given = [a.split("=", 1) for a in argv if a.startswith(("experiment=", "run="))]
    picks = dict(given)
    rest = [a for a in argv if not a.startswith(("experiment=", "run="))]
    by_study = any(a.startswith("study=") for a in rest)
    if len(given) + by_study != 1:
        raise ConfigError("choose the study with exactly one of study=NAME (valid choices: "
                          f"{', '.join(config.available_studies())}), experiment=NAME or run=RUN_ID; see --help")
    cfg = config.load(rest)
    ignored = [a for a in rest if not by_study and a.split("=", 1)[0] not in WHERE_KEYS]
    if ignored:  # the run's own params decide what it was: an override here would silently change nothing
        raise ConfigError(f"{ignored[0]!r} does not apply with experiment= or run=, which take the study as it "
                          f"ran; only {', '.join(WHERE_KEYS)} (where to look and write) do. To pick a study by "
                          "its overrides, pass study=NAME with the same key=value arguments as to bench.run")
    uri = config.tracking_uri(cfg)
    _check_store(uri)
    tracking.use_store(uri)
    client = MlflowClient()
    every = _all_parents(client)
    names = sorted(set(every.experiment.dropna()))  # the experiments that hold a study
    if "run" in picks:
        try:
            run = client.get_run(picks["run"])
        except MlflowException:
            raise ConfigError(f"no run {picks['run']!r} in {uri}; valid parent runs: {_parent_list(every)}") from None
        parent_id = run.data.tags.get("mlflow.parentRunId", run.info.run_id)
        experiment = client.get_experiment(run.info.experiment_id)
    else:
        name = picks.get("experiment") or cfg.study.name
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise ConfigError(f"no MLflow experiment {name!r} in {uri} (no run of that study yet); valid "
                              f"choices: {', '.join(names) or 'none'}")
    frame = mlflow.search_runs([experiment.experiment_id])
    parents = _parents(frame)
    if by_study:
        wanted = study_mod.study_name(cfg)
        found = parents[parents[f"tags.{tracking.STUDY_TAG}"] == wanted]
        how = f"study={cfg.study.name} with config hash {config.config_hash(cfg)}"
        if found.empty:
            raise ConfigError(f"no run of {wanted!r} in experiment {experiment.name!r}: pass the same key=value "
                              f"overrides as to bench.run (they set the config hash), or select one of its "
                              f"parent runs: {_parent_list(parents)}")
    elif "run" in picks:
        found, how = parents[parents.run_id == parent_id], f"run={picks['run']}"
        if found.empty:
            raise ConfigError(f"run {picks['run']!r} is not a study's run; valid parent runs: {_parent_list(parents)}")
    else:
        found = parents.sort_values("start_time", ascending=False)
        how = f"experiment={experiment.name}: the latest of {len(found)} parent runs"
        if found.empty:
            raise ConfigError(f"experiment {experiment.name!r} holds no study's parent run; valid choices: "
                              f"{', '.join(names)}")
    parent = found.iloc[0]
    parent_col = "tags.mlflow.parentRunId"
    children = frame[frame[parent_col] == parent.run_id] if parent_col in frame else frame.iloc[:0]
    if children.empty:
        raise ConfigError(f"parent run {parent.run_id} of {experiment.name!r} has no trial runs yet; "
                          f"other parent runs: {_parent_list(parents)}")
    return Selection(cfg, experiment.name, parent[f"tags.{tracking.STUDY_TAG}"], parent, children, how)


# ---------------------------------------------------------------------------------------------------
# Reading the runs


@dataclass
class StudyData:
    selection: Selection
    runs: pd.DataFrame  # one row per child run (see load)
    trials: pd.DataFrame  # one row per Optuna trial: trial, state, reason, run_id, variant
    curves: pd.DataFrame  # run_id, epoch, val_elbo
    optuna_note: str  # where the trial states came from
    generated: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def load_trials(sel: Selection) -> tuple[pd.DataFrame, str]:
    """The Optuna trials of the study, or none (with the reason) when its storage is not there: the
    MLflow runs carry the same states as tags, so the report can do without."""
    columns = ["trial", "state", "reason", "run_id", "variant"]
    url = study_mod.storage_url(sel.cfg)
    path = tracking.sqlite_path(url)
    if path is not None and not path.is_file():  # load_study would create an empty file
        return pd.DataFrame(columns=columns), f"no Optuna storage at {path}: trial states from the MLflow runs"
    if path is not None and tracking.SCHEMA_TABLE["Optuna"] not in _require_sqlite("study.storage", url, path):
        return pd.DataFrame(columns=columns), f"no Optuna storage in {path}: trial states from the MLflow runs"
    try:
        trials = optuna.load_study(study_name=sel.optuna_study, storage=url).get_trials(deepcopy=False)
    except KeyError:
        return pd.DataFrame(columns=columns), f"no Optuna study {sel.optuna_study!r} in {url}: trial states from MLflow"
    rows = [{"trial": t.number, "state": t.user_attrs.get(study_mod.STATUS, t.state.name.lower()),
             "reason": t.user_attrs.get(study_mod.REASON, ""), "run_id": t.user_attrs.get(study_mod.RUN_ID),
             "variant": study_mod.variant_label(json.loads(t.user_attrs[study_mod.VARIANT]))
             if study_mod.VARIANT in t.user_attrs else ""} for t in trials]
    for row, t in zip(rows, trials):
        if t.state != optuna.trial.TrialState.RUNNING or study_mod.worker_alive(t):
            continue
        ended = tracking.ended_run(row["run_id"]) if row["run_id"] else None
        if ended is not None:  # its worker died while recording the run's outcome, which the next run keeps
            row["state"], row["reason"] = ended[:2]
        else:
            row["state"], row["reason"] = states.KILLED, (
                f"its worker {t.user_attrs.get(study_mod.OWNER, '')} is gone (the next `python -m bench.run` of "
                "this study marks the trial killed and trains the variant again)")
    return pd.DataFrame(rows, columns=columns), f"Optuna study {sel.optuna_study!r} in {url}"


def grid_labels(cfg: Config) -> set[str]:
    """The labels of the study's grid variants (a run's `variant` tag): any other run is a search trial's."""
    return {study_mod.variant_label(json.loads(study_mod.variant_key(p))) for p in study_mod.variants(cfg)}


def unfinished_note(data: StudyData) -> str:
    """A warning for a study with trials that have not ended ("" when all have): the tables then cover
    only the trials ended so far. A grid variant counts by its last attempt; one cut short is trained
    again by the next run of the study's command. A search trial cut short is not: the next run draws
    new trials until study.n_trials have ended for good (complete, pruned or diverged)."""
    trials = data.trials if len(data.trials) else data.runs[["trial", "state", "variant"]]
    trials = trials.sort_values("trial")
    cfg = data.selection.cfg
    grid = grid_labels(cfg)
    variants = trials[trials.variant.isin(grid)].drop_duplicates("variant", keep="last")
    search = trials[~trials.variant.isin(grid)]
    latest = pd.concat([variants, search])
    running, queued = int((latest.state == "running").sum()), int((latest.state == "waiting").sum())
    ended = int(search.state.isin(states.SETTLED).sum())
    search_running = int(search.state.isin(["running", "waiting"]).sum())
    counts = {"running": running, "queued": queued,
              "cut short (failed, killed or interrupted)": int(variants.state.isin(states.CUT_SHORT).sum()),
              "search trial(s) still to draw": max(0, cfg.study.n_trials - ended - search_running)}
    if not any(counts.values()):
        return ""
    return ("Not finished: " + ", ".join(f"{n} {what}" for what, n in counts.items() if n) + ". The tables "
            "cover the trials that have ended; re-running the study's command trains the rest (section 4 "
            "lists every trial).")


def _tag(frame: pd.DataFrame, key: str, default: object = "") -> pd.Series:
    col = f"tags.{key}"
    return frame[col].fillna(default) if col in frame else pd.Series(default, index=frame.index)


def _metric(frame: pd.DataFrame, key: str) -> pd.Series:
    """A metric of each run; NaN where MLflow holds ±1.8e308, its stand-in for ±∞ (logged by vaebench before
    810c92e, which logs NaN): a finite number that would enter the means and print 309 digits."""
    col = f"metrics.{key}"
    if col not in frame:
        return pd.Series(np.nan, index=frame.index)
    values = pd.to_numeric(frame[col], errors="coerce")
    return values.where(values.abs() < 1e308)


def load(argv: list[str]) -> StudyData:
    """Everything the report needs, read from MLflow and Optuna (raises ConfigError as `select`)."""
    sel = select(argv)
    trials, note = load_trials(sel)
    c = sel.children
    runs = pd.DataFrame({
        "run_id": c.run_id, "trial": pd.to_numeric(_tag(c, tracking.TRIAL_TAG, np.nan), errors="coerce"),
        "family": _tag(c, "family"), "protocol": _tag(c, "data_protocol"), "dataset": _tag(c, "dataset"),
        "data_source": _tag(c, "data_source"), "measure": _tag(c, "measure"),
        "comparable": _tag(c, tracking.COMPARABLE_TAG) == "True", "bounded": _tag(c, "bounded") == "True",
        "supremum": pd.to_numeric(_tag(c, "supremum_per_pixel", np.nan), errors="coerce"),
        "seed": pd.to_numeric(c.get("params.train.seed", pd.Series(np.nan, index=c.index)), errors="coerce"),
        "device": _tag(c, "device"), "torch_version": _tag(c, "torch_version"), "git_commit": _tag(c, "git_commit"),
        "variant": _tag(c, tracking.VARIANT_TAG), "start_time": c.start_time, "end_time": c.end_time,
        "state": _tag(c, tracking.STATE_TAG), "reason": _tag(c, tracking.REASON_TAG), "mlflow_status": c.status,
    })
    # Optuna's status is the trial's final word (a killed worker's trial is failed there first).
    by_run = trials.dropna(subset=["run_id"]).set_index("run_id")
    optuna_state = runs.run_id.map(by_run.state).astype(object).fillna("")
    optuna_reason = runs.run_id.map(by_run.reason).astype(object).fillna("")
    runs["state"] = optuna_state.where(optuna_state != "", runs.state)
    runs["state"] = runs.state.where(runs.state != "", runs.mlflow_status.str.lower())
    runs["reason"] = runs.reason.where(runs.reason != "", optuna_reason)
    for key, _ in METRICS:
        runs[key] = _metric(c, key)
    runs["iwae_k"] = _metric(c, "iwae_k")
    runs["iwae_images"] = _metric(c, "iwae_images")
    for col in c.columns:
        if col.startswith("params."):
            runs[col] = c[col]

    client, curves, min_scale = MlflowClient(), [], []
    speed: dict[str, list[float]] = {key: [] for key in SPEED}
    for run_id, family in zip(runs.run_id, runs.family):
        curves += [{"run_id": run_id, "epoch": m.step, "val_elbo": m.value}
                   for m in client.get_metric_history(run_id, "val_elbo")]
        # the smallest scale reached in any epoch (logged, as each epoch's minimum, for learned scales only)
        learned = family in likelihoods.FAMILIES and likelihoods.FAMILIES[family].learned_scale
        scales = [m.value for m in client.get_metric_history(run_id, "min_scale") if math.isfinite(m.value)] \
            if learned else []
        min_scale.append(min(scales) if scales else np.nan)
        for key in SPEED:
            speed[key].append(tracking.run_median_epoch(run_id, key))
    runs["min_scale"] = min_scale
    runs = runs.assign(**speed)
    runs = runs.sort_values(["trial", "start_time"]).reset_index(drop=True)
    return StudyData(sel, runs, trials, pd.DataFrame(curves, columns=["run_id", "epoch", "val_elbo"]), note)
