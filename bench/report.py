"""The study report: `python -m bench.report study=NAME [key=value ...]`.

Reads a study's runs from MLflow and its trial states from Optuna, and writes <report_dir>/<study>/:
report.md, report.html (self-contained: plots embedded as data: URIs), tables.csv (every table, as
numbers), tables.tex (the tables, for a paper; needs \\usepackage{booktabs}) and the plots as PNG.

Which study — exactly one of:
  study=NAME [key=value ...]  the study that `python -m bench.run` ran with the same arguments: the same
                              overrides give the same config hash, hence the same Optuna study and
                              MLflow parent run (NAME may be a path to a .yaml file, as for bench.run)
  experiment=NAME             the latest parent run of the MLflow experiment NAME (one per study name)
  run=RUN_ID                  an MLflow parent run (a child run's id selects its parent)
With experiment= or run=, only the overrides that say where to look and write apply: tracking.uri,
study.storage, report_dir; any other key is an error.

Statistics: each metric is the mean over the seeds of the completed trials of a row, with a 95 %
confidence interval mean ± t(0.975, n−1)·s/√n (none for n = 1). Diverged, pruned and failed trials are
counted (n trials, divergence rate) but their metrics do not enter the means.

Exit codes: 0 report written; 2 bad input, or no such study/experiment/run (the message names the
valid choices; nothing is written).

Example: python -m bench.report study=likelihoods
         python -m bench.report experiment=likelihoods tracking.uri=sqlite:///runs/mlflow.db
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import optuna
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from scipy import stats

from bench import config, states, tracking
from bench import study as study_mod
from bench.config import Config, ConfigError
from bench.render import NONE, Blocks, render_html, render_latex, render_markdown
from models import likelihoods

# Per-run numbers of the family table: (column, label). Likelihood-valued ones are listed in
# LIKELIHOOD_VALUED: they mean something only on a comparable measure, and a row on another measure shows
# its test ELBO in a column of its own, OBJECTIVE, never beside a likelihood.
IWAE_GAIN = "IWAE − ELBO, same images"  # the IWAE's images only: the test ELBO column is the whole split
METRICS = [
    ("val_elbo", "val ELBO"), ("test_elbo", "test ELBO"), ("test_recon", "test recon"), ("test_kl", "test KL"),
    ("test_iwae_nll", "IWAE NLL"), ("test_iwae_nll_se", "IWAE s.e."), ("test_iwae_mc_se", "IWAE MC s.e."),
    ("test_iwae_gain", IWAE_GAIN), ("test_bpd", "bits/dim"), ("min_scale", "min scale"), ("active_units", "active units"),
    ("samples_per_s", "samples/s"), ("ms_per_step", "ms/step"),
]
LIKELIHOOD_VALUED = ("val_elbo", "test_elbo", "test_recon", "test_iwae_nll", "test_iwae_nll_se", "test_iwae_mc_se",
                     "test_iwae_gain", "test_bpd")
WHERE_KEYS = ("tracking.uri", "study.storage", "report_dir")  # the overrides experiment= and run= take
OBJECTIVE = "training objective (not a likelihood)"
FACTOR_METRICS = ("test_elbo", "test_iwae_nll", "test_kl", "active_units", "samples_per_s")
# Params that are not factors: the seed is what the statistics run over, the family and the
# binarization are the rows and blocks already, and the rest changes where results go, not what they are.
NOT_FACTORS = ("train.seed", "likelihood.name", "data.binarize", "data.dequantize", "study.", *config.PLACEMENT)


# ---------------------------------------------------------------------------------------------------
# Selecting the study


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
    _require_sqlite("tracking.uri", uri, path)


def _require_sqlite(key: str, url: str, path: Path) -> None:
    """An existing file that SQLite cannot open would fail deep inside MLflow or Optuna: refuse it here."""
    if not tracking.is_sqlite_file(path):
        raise ConfigError(f"{key}={url!r}: {path} is not an SQLite database; pass the {key} that "
                          "`python -m bench.run` used")


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
    mlflow.set_tracking_uri(uri)
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
    if path is not None:
        _require_sqlite("study.storage", url, path)
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


def unfinished_note(data: StudyData) -> str:
    """A warning for a study with trials that have not ended ("" when all have): the tables then cover
    only the trials ended so far. A grid variant counts by its last attempt; one cut short is trained
    again by the next run of the study's command. A search trial cut short is not: the next run draws
    new trials until study.n_trials have ended for good (complete, pruned or diverged)."""
    trials = data.trials if len(data.trials) else data.runs[["trial", "state", "variant"]]
    trials = trials.sort_values("trial")
    cfg = data.selection.cfg
    grid = {study_mod.variant_label(json.loads(study_mod.variant_key(p))) for p in study_mod.variants(cfg)}
    variants = trials[trials.variant.isin(grid)].drop_duplicates("variant", keep="last")
    search = trials[~trials.variant.isin(grid)]
    latest = pd.concat([variants, search])
    running, queued = int((latest.state == "running").sum()), int((latest.state == "waiting").sum())
    ended = int(search.state.isin([states.COMPLETE, states.PRUNED, states.DIVERGED]).sum())
    search_running = int(search.state.isin(["running", "waiting"]).sum())
    counts = {"running": running, "queued": queued,
              "cut short (failed, killed or interrupted)": int(variants.state.isin(states.CUT_SHORT).sum()),
              "search trial(s) still to draw": max(0, cfg.study.n_trials - ended - search_running)
              if cfg.study.search_space else 0}
    if not any(counts.values()):
        return ""
    return ("Not finished: " + ", ".join(f"{n} {what}" for what, n in counts.items() if n) + ". The tables "
            "cover the trials that have ended; re-running the study's command trains the rest (section 4 "
            "lists every trial).")


def _tag(frame: pd.DataFrame, key: str, default: object = "") -> pd.Series:
    col = f"tags.{key}"
    return frame[col].fillna(default) if col in frame else pd.Series(default, index=frame.index)


def _metric(frame: pd.DataFrame, key: str) -> pd.Series:
    col = f"metrics.{key}"
    return pd.to_numeric(frame[col], errors="coerce") if col in frame else pd.Series(np.nan, index=frame.index)


def load(argv: list[str]) -> StudyData:
    """Everything the report needs, read from MLflow and Optuna (raises ConfigError as `select`)."""
    sel = select(argv)
    trials, note = load_trials(sel)
    c = sel.children
    runs = pd.DataFrame({
        "run_id": c.run_id, "trial": pd.to_numeric(_tag(c, "trial_number", np.nan), errors="coerce"),
        "family": _tag(c, "family"), "protocol": _tag(c, "data_protocol"), "dataset": _tag(c, "dataset"),
        "data_source": _tag(c, "data_source"), "measure": _tag(c, "measure"),
        "comparable": _tag(c, "comparable") == "True", "bounded": _tag(c, "bounded") == "True",
        "supremum": pd.to_numeric(_tag(c, "supremum_per_pixel", np.nan), errors="coerce"),
        "seed": pd.to_numeric(c.get("params.train.seed", pd.Series(np.nan, index=c.index)), errors="coerce"),
        "device": _tag(c, "device"), "torch_version": _tag(c, "torch_version"), "git_commit": _tag(c, "git_commit"),
        "variant": _tag(c, "variant"), "start_time": c.start_time, "end_time": c.end_time,
        "state": _tag(c, "state"), "reason": _tag(c, "reason"), "mlflow_status": c.status,
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
    for col in c.columns:
        if col.startswith("params."):
            runs[col] = c[col]

    client, curves, min_scale = MlflowClient(), [], []
    for run_id, family in zip(runs.run_id, runs.family):
        curves += [{"run_id": run_id, "epoch": m.step, "val_elbo": m.value}
                   for m in client.get_metric_history(run_id, "val_elbo")]
        # the smallest scale reached in any epoch (logged, as each epoch's minimum, for learned scales only)
        learned = family in likelihoods.FAMILIES and likelihoods.FAMILIES[family].learned_scale
        scales = [m.value for m in client.get_metric_history(run_id, "min_scale") if math.isfinite(m.value)] \
            if learned else []
        min_scale.append(min(scales) if scales else np.nan)
    runs["min_scale"] = min_scale
    runs = runs.sort_values(["trial", "start_time"]).reset_index(drop=True)
    return StudyData(sel, runs, trials, pd.DataFrame(curves, columns=["run_id", "epoch", "val_elbo"]), note)


# ---------------------------------------------------------------------------------------------------
# Tables (numbers; `display` turns them into text)


def mean_ci(values) -> tuple[float, float, int]:
    """Mean, half-width of the 95 % t-interval (NaN for n < 2) and n of the finite values."""
    x = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return np.nan, np.nan, 0
    if n == 1:
        return float(x[0]), np.nan, 1
    return float(x.mean()), float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)), n


def factors(runs: pd.DataFrame) -> list[str]:
    """Config keys that vary across the runs, other than the seed, family and data protocol."""
    keys = []
    for col in sorted(c for c in runs.columns if c.startswith("params.")):
        key = col[len("params."):]
        if not key.startswith(NOT_FACTORS) and runs[col].fillna(NONE).nunique() > 1:
            keys.append(key)
    return keys


def _factor_values(runs: pd.DataFrame, key: str) -> pd.Series:
    # MLflow params are strings: numbers become numbers so that 2 < 10 when sorting and plotting.
    raw = runs[f"params.{key}"].fillna(NONE).astype(str)
    numbers = pd.to_numeric(raw, errors="coerce")
    return numbers if numbers.notna().all() else raw


def _family_order(name: str) -> int:
    return likelihoods.NAMES.index(name) if name in likelihoods.NAMES else len(likelihoods.NAMES)


def last_attempts(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs less the attempts that were cut short (states.CUT_SHORT) and then tried again: a variant counts
    once, as its last attempt (the trial table still lists every attempt)."""
    retried = runs.sort_values("start_time").duplicated("variant", keep="last") & (runs.variant != "")
    return runs[~(retried & runs.state.isin(states.CUT_SHORT))]


def family_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Table 1: one row per data protocol × family (× factor values), bounded families first.

    Counts cover every finished trial (a variant's last attempt: `last_attempts`); metric columns
    (`<metric>`, `<metric>_ci`, `<metric>_n`) the completed ones only."""
    runs = last_attempts(runs)
    keys = factors(runs)
    df = runs.assign(**{key: _factor_values(runs, key) for key in keys})
    rows = []
    for group, g in df.groupby(["protocol", "family", *keys], sort=False, dropna=False):
        done, finished = g[g.state == states.COMPLETE], g[g.state.isin(states.FINISHED)]
        # the run whose reconstructions stand for the row: the completed one of the lowest seed
        example = g.assign(_late=g.state != states.COMPLETE).sort_values(["_late", "seed"]).iloc[0]
        row = dict(zip(["protocol", "family", *keys], group))
        n_trials, n_diverged = len(finished), int((g.state == states.DIVERGED).sum())
        row.update({
            "bounded": bool(g.bounded.iloc[0]), "measure": g.measure.iloc[0], "comparable": bool(g.comparable.iloc[0]),
            "supremum": g.supremum.iloc[0], "n_trials": n_trials, "n_complete": len(done), "n_diverged": n_diverged,
            "n_pruned": int((g.state == states.PRUNED).sum()),
            "n_failed": int(g.state.isin(states.CUT_SHORT).sum()),
            "divergence_rate": n_diverged / n_trials if n_trials else np.nan,
            "iwae_k": g.iwae_k.max(),
            "example_run": example.run_id, "example_state": example.state,
        })
        for key, _ in METRICS:
            row[key], row[f"{key}_ci"], row[f"{key}_n"] = mean_ci(done[key])
        rows.append(row)
    table = pd.DataFrame(rows)
    table["_order"] = table.family.map(_family_order)
    table = table.sort_values(["protocol", "bounded", "_order", *keys], ascending=[True, False, *[True] * (1 + len(keys))])
    return table.drop(columns="_order").reset_index(drop=True)


def factor_columns(table: pd.DataFrame) -> list[str]:
    """The factor columns of a table: dotted config keys (no other column name has a dot)."""
    return [c for c in table.columns if "." in c and not c.endswith(("_ci", "_n"))]


def measure_table(family: pd.DataFrame) -> pd.DataFrame:
    """Table 2: bounded vs unbounded, with the measure of every number and what each row may be compared
    with. Likelihood columns are kept only for comparable rows; the others' ELBO is a training objective."""
    keys = factor_columns(family)
    t = family[["protocol", "measure", "comparable", "bounded", "family", *keys, "supremum", "iwae_k", "n_complete",
                "n_trials", "divergence_rate", "test_elbo", "test_elbo_ci", "test_iwae_nll", "test_iwae_nll_ci",
                "test_iwae_gain", "test_iwae_gain_ci", "test_bpd", "test_bpd_ci"]].copy()
    t = likelihoods_where_comparable(t)
    t["scale"] = [likelihoods.comparable_scale(m, c) for m, c in zip(t.measure, t.comparable)]
    # rows on other data (a data.* factor: another dataset, split or subset) share no number either
    data_keys = [k for k in keys if k.startswith("data.")]
    t["data"] = [", ".join(f"{k}={_value(r[k])}" for k in data_keys) for _, r in t.iterrows()]
    t["compare_with"] = [
        ", ".join(sorted(set(t.family[(t.protocol == p) & (t.data == d) & (t.scale == s)]) - {f}))
        or "(no other family here)" if s else "nothing: not a likelihood of the data"
        for p, d, s, f in zip(t.protocol, t.data, t.scale, t.family)]
    t["_order"] = t.family.map(_family_order)
    t = t.sort_values(["protocol", "comparable", "scale", "bounded", "_order"],
                      ascending=[True, False, True, False, True])
    return t.drop(columns="_order").reset_index(drop=True)


def likelihoods_where_comparable(table: pd.DataFrame) -> pd.DataFrame:
    """The table with its likelihood-valued numbers (LIKELIHOOD_VALUED) kept only on rows whose measure is
    a likelihood of the data; another row's test ELBO goes to training_objective(_ci) instead, as the
    report's text shows it (for tables.csv, whose readers must not find them beside likelihoods)."""
    t = table.copy()
    if "test_elbo" in t:
        t["training_objective"] = t.test_elbo.where(~t.comparable)
        t["training_objective_ci"] = t.test_elbo_ci.where(~t.comparable)
    for col in (c for key in LIKELIHOOD_VALUED for c in (key, f"{key}_ci")):
        if col in t:
            t[col] = t[col].where(t.comparable)
    return t


def factor_tables(family: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Table 3: for each factor, the main metrics against it, per protocol × family (× other factors)."""
    keys = factor_columns(family)
    metric_cols = [c for m in FACTOR_METRICS for c in (m, f"{m}_ci", f"{m}_n")]
    out = {}
    for key in keys:
        others = [k for k in keys if k != key]
        t = family[["protocol", "family", *others, key, "measure", "comparable", "n_trials", "n_complete",
                    *metric_cols]]
        t = t.assign(_order=t.family.map(_family_order)).sort_values(["protocol", "_order", *others, key])
        out[key] = t.drop(columns="_order").reset_index(drop=True)
    return out


def trial_table(data: StudyData) -> pd.DataFrame:
    """Every trial: its run, variant and state, with the reason of those that did not complete. Optuna
    trials without a run (never started, or lost before the run was created) are listed too."""
    runs = data.runs[["trial", "run_id", "family", "protocol", "seed", "variant", "state", "reason"]]
    orphans = data.trials[~data.trials.run_id.isin(runs.run_id)]
    orphans = orphans.assign(family="", protocol="", seed=np.nan)[runs.columns]
    table = pd.concat([runs, orphans], ignore_index=True) if len(orphans) else runs
    return table.sort_values("trial").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------
# Display: numbers → text


def _fmt(mean: float, ci: float = np.nan) -> str:
    """mean ± half-width, with the decimals the interval supports (two significant digits of it)."""
    if not np.isfinite(mean):
        return NONE
    if ci == 0:  # seeds that all agree: an interval of width 0, not one seed
        return f"{_fmt(mean)} ± 0"
    if not np.isfinite(ci):  # one seed: whole numbers as such, else five significant digits
        if float(mean).is_integer():
            return f"{int(mean)}"
        return f"{mean:.{min(6, max(0, 4 - math.floor(math.log10(abs(mean)))))}f}"  # never in e-notation
    digits = min(6, max(0, 1 - math.floor(math.log10(ci))))
    return f"{mean:.{digits}f} ± {ci:.{digits}f}"


def _value(v: object) -> str:
    return f"{v:g}" if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else str(v)


def _iwae_label(table: pd.DataFrame) -> str:
    ks = table.iwae_k.dropna().unique() if "iwae_k" in table else []
    return f"IWAE-{int(ks[0])} NLL" if len(ks) == 1 else "IWAE-k NLL"


def _metric_text(r: pd.Series, key: str) -> str:
    """mean ± 95 % CI of a metric; likelihood-valued ones only on a comparable measure."""
    return _fmt(r[key], r[f"{key}_ci"]) if r.comparable or key not in LIKELIHOOD_VALUED else NONE


def _objective_text(r: pd.Series) -> str:
    """A row's test ELBO when it is not a likelihood of the data (a training objective), else —."""
    return NONE if r.comparable else _fmt(r.test_elbo, r.test_elbo_ci)


def display_family(table: pd.DataFrame) -> pd.DataFrame:
    """Table 1 as text: mean ± 95 % CI. A row whose numbers are not likelihoods of the data (a density at
    discrete values, a σ fitted to each image) shows its test ELBO as a training objective only."""
    labels = dict(METRICS, test_iwae_nll=_iwae_label(table))
    rows = []
    for _, r in table.iterrows():
        row = {"": "bounded" if r.bounded else "unbounded", "family": r.family}
        row.update({k: _value(r[k]) for k in factor_columns(table)})
        row.update({"trials": r.n_trials, "complete": r.n_complete, "diverged": r.n_diverged,
                    "divergence": f"{r.divergence_rate:.0%}" if np.isfinite(r.divergence_rate) else NONE,
                    "sup/pixel": f"{r.supremum:.4g}" if r.bounded and np.isfinite(r.supremum) else "∞"})
        row.update({labels[key]: _metric_text(r, key) for key, _ in METRICS})
        if not table.comparable.all():
            row[OBJECTIVE] = _objective_text(r)
        rows.append(row)
    return pd.DataFrame(rows)


def display_measure(table: pd.DataFrame) -> pd.DataFrame:
    iwae = _iwae_label(table)
    rows = []
    for _, r in table.iterrows():
        row = {"measure (nats per image)": r.measure, "comparable": "yes" if r.comparable else "no",
               "": "bounded" if r.bounded else "unbounded", "family": r.family}
        row.update({k: _value(r[k]) for k in factor_columns(table)})
        row.update({
            "sup/pixel": f"{r.supremum:.4g}" if r.bounded and np.isfinite(r.supremum) else "∞",
            "test ELBO": _fmt(r.test_elbo, r.test_elbo_ci), iwae: _fmt(r.test_iwae_nll, r.test_iwae_nll_ci),
            IWAE_GAIN: _fmt(r.test_iwae_gain, r.test_iwae_gain_ci),
            "bits/dim": _fmt(r.test_bpd, r.test_bpd_ci),
            OBJECTIVE: _fmt(r.training_objective, r.training_objective_ci),
            "divergence": f"{r.divergence_rate:.0%}" if np.isfinite(r.divergence_rate) else NONE,
            "complete/trials": f"{r.n_complete}/{r.n_trials}", "may be compared with": r.compare_with})
        rows.append(row)
    return pd.DataFrame(rows)


def display_factor(table: pd.DataFrame) -> pd.DataFrame:
    labels = dict(METRICS, test_iwae_nll="IWAE NLL")
    rows = []
    for _, r in table.iterrows():
        row = {"protocol": r.protocol, "family": r.family}
        row.update({k: _value(r[k]) for k in factor_columns(table)})
        row["n"] = f"{r.n_complete}/{r.n_trials}"
        row.update({labels[key]: _metric_text(r, key) for key in FACTOR_METRICS})
        if not table.comparable.all():
            row[OBJECTIVE] = _objective_text(r)
        rows.append(row)
    return pd.DataFrame(rows)


def display_trials(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "trial": [NONE if pd.isna(t) else str(int(t)) for t in table.trial], "run id": table.run_id.fillna(NONE),
        "family": table.family, "protocol": table.protocol,
        "seed": [NONE if pd.isna(s) else str(int(s)) for s in table.seed],
        "variant": table.variant, "state": table.state, "reason": table.reason.fillna("")})


# ---------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)


def _row_label(row: pd.Series, keys: list[str]) -> str:
    short = study_mod.short_keys(keys)
    return " ".join([row.family, *(f"{short[k]}={_value(row[k])}" for k in keys)])


def _color(family: str):
    return plt.get_cmap("tab10")(_family_order(family) % 10)


def _figure(n_panels: int, width: float = 5.0, height: float = 3.6, most_per_row: int = 4):
    """A figure of n_panels panels, at most most_per_row a row; returns it and its n_panels axes."""
    cols = min(n_panels, most_per_row)
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[n_panels:]:
        ax.remove()
    return fig, list(axes.flat[:n_panels])


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(runs: pd.DataFrame, curves: pd.DataFrame, path: Path) -> Path:
    """Validation ELBO per epoch, one line per run, one panel per protocol, and a panel of their own for
    the runs whose ELBO is not a likelihood of the data (training objectives); bounded families solid,
    unbounded dashed; × marks where a diverged run stopped."""
    panels = sorted({(p, not c) for p, c in zip(runs.protocol, runs.comparable)})
    fig, axes = _figure(len(panels))
    for ax, (protocol, objective) in zip(axes, panels):
        seen = set()
        for _, run in runs[(runs.protocol == protocol) & (runs.comparable != objective)].iterrows():
            c = curves[curves.run_id == run.run_id].sort_values("epoch")
            if c.empty:
                continue
            label = None if run.family in seen else run.family
            seen.add(run.family)
            ax.plot(c.epoch, c.val_elbo, "-" if run.bounded else "--", marker=".", color=_color(run.family),
                    label=label)
            if run.state == states.DIVERGED:
                ax.plot(c.epoch.iloc[-1], c.val_elbo.iloc[-1], "x", color=_color(run.family), markersize=9)
        title, what = ((f"{protocol}: not likelihoods", "training objective") if objective else
                       (protocol, "validation ELBO"))
        ax.set(title=title, xlabel="epoch", ylabel=f"{what} (nats per image)")
        ax.legend(fontsize=7, title="solid: bounded, dashed: unbounded", title_fontsize=7)
    return _save(fig, path)


def plot_reconstructions(family: pd.DataFrame, path: Path) -> Path | None:
    """Each row's reconstructions.png (test inputs above their reconstructions) side by side, one line
    of panels per protocol."""
    client, protocols = MlflowClient(), sorted(family.protocol.unique())
    width = max((family.protocol == p).sum() for p in protocols)
    fig, axes = plt.subplots(len(protocols), width, figsize=(3.2 * width, 1.8 * len(protocols)), squeeze=False,
                             layout="constrained")
    found = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, protocol in enumerate(protocols):
            block = family[family.protocol == protocol].reset_index(drop=True)
            for j in range(width):
                ax = axes[i, j]
                ax.axis("off")
                if j >= len(block):
                    continue
                r = block.iloc[j]
                try:
                    with mock.patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
                        local = client.download_artifacts(r.example_run, "reconstructions.png", tmp)
                except (MlflowException, OSError):
                    continue  # figures off (eval.figures=false), or the run died before logging them
                ax.imshow(plt.imread(local), cmap="gray", interpolation="nearest")
                state = "" if r.example_state == states.COMPLETE else f" ({r.example_state})"
                ax.set_title(f"{_row_label(r, factor_columns(family))}{state}\n{protocol}", fontsize=8)
                found += 1
    if not found:
        plt.close(fig)
        return None
    return _save(fig, path)


def plot_throughput(family: pd.DataFrame, path: Path) -> Path:
    """Training samples/s per row (mean ± 95 % CI over completed seeds)."""
    t = family[np.isfinite(family.samples_per_s)]
    labels = [f"{_row_label(r, factor_columns(family))} ({r.protocol})" for _, r in t.iterrows()]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(t) + 1.2), layout="constrained")
    y = np.arange(len(t))
    ax.barh(y, t.samples_per_s, xerr=t.samples_per_s_ci.fillna(0), color=[_color(f) for f in t.family])
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(left=0)
    ax.set(xlabel="training samples/s (mean ± 95 % CI over completed seeds)", title="throughput")
    return _save(fig, path)


def plot_factor(table: pd.DataFrame, key: str, path: Path) -> Path:
    """The main metrics against one factor: a line per protocol × family (× other factors)."""
    others = [k for k in factor_columns(table) if k != key]
    numeric = pd.api.types.is_numeric_dtype(table[key])
    values = sorted(table[key].unique()) if numeric else list(dict.fromkeys(table[key]))
    # (panel title, metric, rows): likelihoods only where they are likelihoods of the data, one panel per
    # protocol and scale, so that no axis holds two measures
    scale = pd.Series([likelihoods.comparable_scale(m, c) for m, c in zip(table.measure, table.comparable)],
                      index=table.index)
    measures = sorted({(p, s) for p, s, c in zip(table.protocol, scale, table.comparable) if c})
    panels = []
    for m in FACTOR_METRICS:
        if m not in LIKELIHOOD_VALUED:
            panels.append((dict(METRICS)[m], m, table))
            continue
        panels += [(f"{dict(METRICS)[m]}\n{p}: {s}", m, table[table.comparable & (table.protocol == p) & (scale == s)])
                   for p, s in measures]
    if not table.comparable.all():
        panels.append((OBJECTIVE, "test_elbo", table[~table.comparable]))
    fig, axes = _figure(len(panels), width=3.6, height=3.8)
    for ax, (title, metric, rows) in zip(axes, panels):
        for group, g in rows.groupby(["protocol", "family", *others], sort=False):
            x = g[key] if numeric else g[key].map(values.index)
            label = " ".join(str(v) for v in group[1:]) + f" ({group[0]})"
            ax.errorbar(x, g[metric], yerr=g[f"{metric}_ci"].fillna(0), marker="o", capsize=3,
                        linestyle="-" if g.comparable.all() else ":", color=_color(group[1]), label=label)
        if numeric and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")  # β 0.25 … 4, latent 2 … 50
        ax.set_xticks(values if numeric else range(len(values)), [_value(v) for v in values], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel(key)
        ax.set_title(title, fontsize=8)
    legend = {}  # label -> line, over all panels: the likelihood panels lack the objectives' lines
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# The report: blocks of prose, tables and plots, rendered to Markdown, HTML and LaTeX

# The prose of section 2, from ../shared/notes/science.md ("Which numbers share a measure").
COMPARABILITY_INTRO = (
    "Every log-likelihood number is in nats per image on the measure of its row (the run's tag \"measure\"). "
    "Two rows may be compared only when they share a measure that is a probability of the data "
    "(tag \"comparable\"):")
COMPARABILITY = [
    ("pmf of binarized pixels — the Bernoulli gives log P(x) ≤ 0 on x ∈ {0,1}^D; such rows are comparable "
     "with each other."),
    ("pmf of 8-bit pixels — the discretized logistic gives log P(k) of the pixel values k ∈ {0..255} exactly. "
     "A density on [0,1] trained and evaluated on uniformly dequantized data y = (k+u)/256 gives "
     "E_u[log p(y)] − D·log 256 ≤ log P(k) (Theis, van den Oord & Bethge 2016): a lower bound on the same "
     "8-bit pmf, reported on that scale. Both may be compared; the bound can only understate the density's "
     "likelihood."),
    ("Not comparable — a density evaluated at binary values, or at raw 8-bit values k/255 without "
     "dequantization, is not a likelihood of the data: it can be made arbitrarily large by spiking on the "
     "discrete values (a learned scale σ → 0). Nor is the σ-VAE's Gaussian with σ² the image's own mean "
     "squared error (gaussian_optimal): σ is fitted to the image it scores, and that maximum over σ "
     "integrates to ∞ over images, so the dequantization bound above does not hold for it. Such an ELBO is "
     "reported only as a training objective, in a column and plot panel of its own, never beside a "
     "likelihood; it has no IWAE NLL and no bits/dim."),
]
BOUNDEDNESS = (
    "Bounded: the family's log p(x|z) per pixel has a finite supremum (sup/pixel: 0 for a pmf, "
    "−½·log(2πσ²) for a Gaussian and −log(2b) for a Laplace with fixed or floored scale; the family's own, "
    "so for a density on [0,1] before the −log 256 per pixel of the 8-bit scale). Unbounded families can "
    "raise it without limit, which is how their runs diverge. As in section 1, the test ELBO is over the "
    "whole test split and the IWAE NLL over its first eval.iwae_examples images; \"IWAE − ELBO, same images\" "
    "compares the two bounds.")


def _protocol_sentences(measure: pd.DataFrame) -> list[str]:
    out = []
    for protocol, block in measure.groupby("protocol", sort=True):
        parts = []
        for (data, scale), g in block[block.comparable].groupby(["data", "scale"], sort=False):
            names = list(dict.fromkeys(g.family))
            on = f" of {data}" if data else ""
            parts.append(f"{', '.join(names)} share the {scale}{on} and may be compared" if len(names) > 1
                         else f"{names[0]} is the only family on the {scale}{on}")
        bad = block[~block.comparable]
        for family, name in dict.fromkeys(zip(bad.family, bad.measure)):
            parts.append(f"{family} may be compared with nothing: {name}")
        out.append(f"{protocol}: " + "; ".join(parts) + ".")
    return out


def _provenance(data: StudyData) -> pd.DataFrame:
    sel, runs = data.selection, data.runs
    p = sel.parent

    def joined(values) -> str:
        return ", ".join(sorted({str(v) for v in values if str(v) not in ("", "nan")})) or NONE

    fields = {
        "study (MLflow experiment)": sel.name, "selected by": sel.how, "Optuna study": sel.optuna_study,
        "config hash": p.get("tags.config_hash", NONE), "description": p.get("tags.mlflow.note.content", ""),
        "parent run": p.run_id, "MLflow store": config.tracking_uri(sel.cfg), "trial states": data.optuna_note,
        "git commit": joined([p.get("tags.git_commit", ""), *runs.git_commit]),
        "torch": joined(runs.torch_version), "device": joined(runs.device), "datasets": joined(runs.dataset),
        "runs": f"{len(runs)} ({', '.join(f'{n} {s}' for s, n in runs.state.value_counts().items())})",
        "first run started": str(runs.start_time.min())[:19], "last run ended": str(runs.end_time.max())[:19],
        "report generated": data.generated,
    }
    return pd.DataFrame({"": list(fields), "value": [NONE if pd.isna(v) else str(v) for v in fields.values()]})


# An 8-bit pmf (the discretized logistic) is evaluated at the pixel values themselves in a dequantized
# protocol too: its block compares it with the densities on the 8-bit scale.
DEQUANTIZED_PROTOCOL = {"True": "densities see (k+u)/256, u ~ U(0,1); 8-bit pmfs see the pixel values k"}


def _protocols(runs: pd.DataFrame) -> pd.DataFrame:
    def param(key: str) -> pd.Series:
        return runs.get(f"params.{key}", pd.Series(NONE, index=runs.index)).fillna(NONE)

    binarize = param("data.binarize")
    t = pd.DataFrame({"protocol": runs.protocol, "dataset": runs.dataset, "binarization": binarize,
                      "dequantization": param("data.dequantize").replace(DEQUANTIZED_PROTOCOL)
                      .where(binarize == "none", "n/a (binary pixels)"),
                      "data source and split": runs.data_source})
    return t.drop_duplicates().sort_values("protocol").reset_index(drop=True)


STATISTICS = (
    "Each metric is the mean over the seeds of the row's completed trials ± the half-width of a 95 % "
    "confidence interval, mean ± t(0.975, n−1)·s/√n (no interval when n = 1). Diverged, pruned and failed "
    "trials are counted (trials, divergence = diverged/trials) but do not enter the means; a trial cut short "
    "(failed, killed, interrupted) and then run again counts once, as its last attempt. Section 4 lists every "
    "attempt with its reason.")
FAMILY_COLUMNS = (
    "One block per data protocol; bounded families first. ELBO, reconstruction (E_q log p(x|z)) and IWAE NLL "
    "in nats per image on the row's measure (section 2); IWAE s.e. is the standard error of the test-set "
    "mean over datapoints, IWAE MC s.e. the Monte-Carlo standard error of that mean from the k importance "
    "samples (delta method), each averaged over seeds; bits/dim from the IWAE NLL. The test ELBO and "
    "reconstruction are over the whole test split, the IWAE numbers over its first eval.iwae_examples images "
    "(a run param; all when 0): compare them through \"IWAE − ELBO, same images\", the IWAE bound's gain "
    "over the ELBO of its own images and samples (≥ 0 for every image), not through the two columns, whose "
    "images differ. min scale is the "
    "smallest learned scale reached in training (— for families without a learned scale). A row whose "
    "numbers are not likelihoods of the data (section 2) shows only its test ELBO, as a training "
    "objective.")
NO_FACTORS = ("No config key other than the seed, the likelihood family and the data protocol varies across "
              "this study's runs: there are no factor tables.")
CURVES = ("Validation ELBO per epoch, one line per run: bounded families solid, unbounded dashed, × where a "
          "diverged run stopped; runs whose ELBO is not a likelihood of the data in panels of their own.")

def _families_section(family: pd.DataFrame) -> Blocks:
    blocks: Blocks = [("h2", "1. Results per likelihood family"), ("p", FAMILY_COLUMNS)]
    for protocol, block in family.groupby("protocol", sort=True):
        blocks += [("h3", f"Protocol {protocol}"),
                   ("table", (f"Per family, protocol {protocol}", display_family(block)))]
    return blocks


def _measure_section(measure: pd.DataFrame) -> Blocks:
    return [("h2", "2. Bounded vs unbounded: which numbers may be compared"), ("p", COMPARABILITY_INTRO),
            ("ul", COMPARABILITY), ("p", BOUNDEDNESS),
            ("table", ("Bounded vs unbounded, with the measure of every number", display_measure(measure))),
            ("p", "In this study:"), ("ul", _protocol_sentences(measure))]


def _factors_section(by_factor: dict[str, pd.DataFrame], folder: Path) -> Blocks:
    blocks: Blocks = [("h2", "3. Factor studies")]
    if not by_factor:
        blocks.append(("p", NO_FACTORS))
    for key, table in by_factor.items():
        plot = plot_factor(table, key, folder / f"factor_{_safe(key)}.png")
        blocks += [("h3", f"Factor {key}"), ("table", (f"Main metrics against {key}", display_factor(table))),
                   ("img", (f"main metrics against {key}", plot))]
    return blocks


def _plots_section(data: StudyData, family: pd.DataFrame, folder: Path) -> Blocks:
    blocks: Blocks = [
        ("h2", "Plots"),
        ("img", ("validation ELBO per epoch", plot_curves(data.runs, data.curves, folder / "val_elbo.png"))),
        ("p", CURVES)]
    recon = plot_reconstructions(family, folder / "reconstructions.png")
    if recon:
        blocks += [("img", ("reconstructions", recon)),
                   ("p", "Test inputs (top) and their reconstructions, one seed per family and protocol.")]
    else:
        blocks.append(("p", "No reconstructions.png artifacts (the study ran with eval.figures=false)."))
    blocks.append(("img", ("throughput", plot_throughput(family, folder / "throughput.png"))))
    return blocks


def _provenance_section(data: StudyData, trials: pd.DataFrame) -> Blocks:
    problems = trials[trials.state != states.COMPLETE]
    return [
        ("h2", "4. Provenance"), ("table", ("Study", _provenance(data))),
        ("table", ("Data protocols", _protocols(data.runs))), ("h3", "Trials that did not complete"),
        ("table", ("Failed, pruned, diverged and unfinished trials, with their reasons", display_trials(problems)))
        if len(problems) else ("p", "Every trial completed."),
        ("h3", "All trials and their MLflow runs"), ("table", ("Trials and runs", display_trials(trials)))]


def build(data: StudyData, folder: Path) -> tuple[Blocks, dict[str, pd.DataFrame]]:
    """The report's blocks and its numeric tables (for tables.csv); writes the plots into `folder`."""
    sel = data.selection
    family = family_table(data.runs)
    measure = measure_table(family)
    by_factor = factor_tables(family)
    trials = trial_table(data)
    description = str(sel.parent.get("tags.mlflow.note.content", "") or "").strip() or "(no description)"
    blocks: Blocks = [
        ("h1", f"vaebench report: {sel.name}"), ("p", description),
        *([("p", note)] if (note := unfinished_note(data)) else []),
        ("p", f"Optuna study {sel.optuna_study}, {len(data.runs)} runs; generated {data.generated}. {STATISTICS}"),
        *_families_section(family), *_measure_section(measure), *_factors_section(by_factor, folder),
        *_plots_section(data, family, folder), *_provenance_section(data, trials)]
    tables = {"1 family": likelihoods_where_comparable(family), "2 measure": measure,
              **{f"3 factor {k}": likelihoods_where_comparable(t).assign(factor=k) for k, t in by_factor.items()},
              "4 trials": trials}
    return blocks, tables


def _safe(name: str) -> str:
    """A file name from run data: no path separators, no leading dot."""
    return re.sub(r"[^\w-]+", "_", name).strip("_") or "study"


def write(data: StudyData, folder: Path | None = None) -> Path:
    """Writes the report into `folder` (default <report_dir>/<study>/) and returns the folder."""
    folder = folder or Path(data.selection.cfg.report_dir) / _safe(data.selection.name)
    folder.mkdir(parents=True, exist_ok=True)
    # Labels come from run data: no $…$ mathtext, so a `$` in a param cannot break a plot.
    with plt.rc_context({"text.parse_math": False}):
        blocks, tables = build(data, folder)
    title = f"vaebench report: {data.selection.name}"
    for name, text in (("report.md", render_markdown(blocks)), ("report.html", render_html(blocks, title)),
                       ("tables.tex", render_latex(blocks))):
        (folder / name).write_text(text, encoding="utf-8")
    pd.concat([t.assign(table=name) for name, t in tables.items()], ignore_index=True).to_csv(
        folder / "tables.csv", index=False)
    return folder


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip(), f"\nstudies: {', '.join(config.available_studies())}")
        return 0
    try:
        data = load(argv)
        report_dir = data.selection.cfg.report_dir
        config.check_writable("report_dir", report_dir, Path(report_dir) / _safe(data.selection.name), create=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        folder = write(data)
    except OSError as e:  # a report_dir the checks let through (e.g. under /proc as root), or a full disk
        print(f"error: report_dir={report_dir!r}: cannot write the report ({e})", file=sys.stderr)
        return 2
    print(f"report of {data.selection.optuna_study} ({len(data.runs)} runs): {folder / 'report.html'}, "
          f"report.md, tables.csv, tables.tex")
    return 0


if __name__ == "__main__":
    sys.exit(main())
