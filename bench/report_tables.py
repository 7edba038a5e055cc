"""The report's tables, as numbers (one row per data protocol × family × factor values; mean and 95 %
confidence interval over seeds), and their text for display."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from bench import config, states
from bench.render import NONE
from bench.report_data import IWAE_GAIN, LIKELIHOOD_VALUED, METRICS, StudyData, grid_labels
from models import likelihoods

OBJECTIVE = "training objective (not a likelihood)"
BOUNDED = "log p(x|z)"  # bounded or unbounded
# Table 3's metrics: the IWAE's gain over the ELBO of its own images beside the two, which are over
# different images (the whole test split, its first eval.iwae_examples); the plots leave out the s.e.
FACTOR_METRICS = ("test_elbo", "test_recon", "test_iwae_nll", "test_iwae_mc_se", "test_iwae_gain", "test_kl", "active_units",
                  "samples_per_s")
FACTOR_PLOTS = ("test_elbo", "test_iwae_nll", "test_iwae_gain", "test_kl", "active_units", "samples_per_s")
# Params that are not factors: the seed is what the statistics run over, the family and the
# binarization are the rows and blocks already, and the rest changes where results go or how they are
# computed, not what they are (a resumed study may hold runs with other values of these).
NOT_FACTORS = ("train.seed", "likelihood.name", "data.binarize", "data.dequantize", "study.", *config.PLACEMENT,
               *config.HOW)


# ---------------------------------------------------------------------------------------------------
# Tables (numbers; the display_* and format_value functions turn them into text)


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


# Param sections that say what a run is (the others: the study's own keys and where results go)
WHAT_RUNS = ("data.", "model.", "likelihood.", "train.", "eval.")
VARIES = "varies (see the tables)"


def configuration(runs: pd.DataFrame) -> pd.DataFrame:
    """Every config key of what the runs are (WHAT_RUNS) with its value, the same in all runs, or VARIES:
    what the numbers depend on, in the report itself."""
    rows = []
    for col in sorted(c for c in runs.columns if c.startswith("params.") and c[len("params."):].startswith(WHAT_RUNS)):
        values = runs[col].fillna(NONE).astype(str).unique()
        rows.append({"key": col[len("params."):], "value": values[0] if len(values) == 1 else VARIES})
    return pd.DataFrame(rows, columns=["key", "value"])


def factor_values(runs: pd.DataFrame, key: str) -> pd.Series:
    # MLflow params are strings: numbers become numbers so that 2 < 10 when sorting and plotting.
    raw = runs[f"params.{key}"].fillna(NONE).astype(str)
    numbers = pd.to_numeric(raw, errors="coerce")
    return numbers if numbers.notna().all() else raw


def family_order(name: str) -> int:
    return likelihoods.NAMES.index(name) if name in likelihoods.NAMES else len(likelihoods.NAMES)


def last_attempts(runs: pd.DataFrame) -> pd.DataFrame:
    """Each variant's last attempt: a variant counts once (the trial table still lists every attempt). The
    earlier ones were cut short (states.CUT_SHORT) and tried again, or trained again after the Optuna
    storage was lost (before bench.study took finished runs back): counted twice, one seed reads as two."""
    retried = runs.sort_values("start_time").duplicated("variant", keep="last") & (runs.variant != "")
    return runs[~retried]


def _rows(runs: pd.DataFrame):
    """The factors, and the runs (each variant's last attempt) grouped as the rows of table 1:
    (protocol, family, *factor values) -> their runs."""
    runs = last_attempts(runs)
    keys = factors(runs)
    df = runs.assign(**{key: factor_values(runs, key) for key in keys})
    return keys, df.groupby(["protocol", "family", *keys], sort=False, dropna=False)


def family_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Table 1: one row per data protocol × family (× factor values), bounded families first.

    Counts cover every finished trial (a variant's last attempt: `last_attempts`); metric columns
    (`<metric>`, `<metric>_ci`, `<metric>_n`) the completed ones only."""
    keys, groups = _rows(runs)
    rows = []
    for group, g in groups:
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
    table["_order"] = table.family.map(family_order)
    table = table.sort_values(["protocol", "bounded", "_order", *keys], ascending=[True, False, *[True] * (1 + len(keys))])
    return table.drop(columns="_order").reset_index(drop=True)


def factor_columns(table: pd.DataFrame) -> list[str]:
    """The factor columns of a table: dotted config keys (no other column name has a dot)."""
    return [c for c in table.columns if "." in c and not c.endswith(("_ci", "_n"))]


# Rows that differ in these keys share no number even on one scale: other data (another dataset, split or
# subset), or another IWAE estimate (another k is another bound, other examples other images)
SAME_NUMBERS_KEYS = ("data.", "eval.iwae_")


def _with_scale(table: pd.DataFrame) -> pd.DataFrame:
    """The table with the scale its rows' numbers are on ("" when none: not a likelihood of the data) and
    their `setting`: the values of its SAME_NUMBERS_KEYS factors ("" when there are none)."""
    keys = [k for k in factor_columns(table) if k.startswith(SAME_NUMBERS_KEYS)]
    return table.assign(
        scale=[likelihoods.comparable_scale(m, c) for m, c in zip(table.measure, table.comparable)],
        setting=[", ".join(f"{k}={format_value(r[k])}" for k in keys) for _, r in table.iterrows()])


def varied_here(rows: pd.DataFrame, keys: list[str]) -> list[str]:
    """The factor keys whose values differ across these rows (of one measure: e.g. β, L, latent size)."""
    return [k for k in keys if rows[k].nunique(dropna=False) > 1]


def _compare_with(rows: pd.DataFrame, family: str, keys: list[str]) -> str:
    """What a row of `family` may be compared with: the other families on its scale and setting (`rows`),
    and its own family's rows at other values of the factors that vary among them."""
    varied = varied_here(rows[rows.family == family], keys)
    others = sorted(set(rows.family) - {family}) + ([f"{family} at other {', '.join(varied)}"] if varied else [])
    return ", ".join(others) or "(no other row here)"


def measure_table(family: pd.DataFrame) -> pd.DataFrame:
    """Table 2: bounded vs unbounded, with the measure of every number and what each row may be compared
    with. Likelihood columns are kept only for comparable rows; the others' ELBO is a training objective."""
    keys = factor_columns(family)
    t = family[["protocol", "measure", "comparable", "bounded", "family", *keys, "supremum", "iwae_k", "n_complete",
                "n_trials", "divergence_rate", "test_elbo", "test_elbo_ci", "test_iwae_nll", "test_iwae_nll_ci",
                "test_iwae_gain", "test_iwae_gain_ci", "test_bpd", "test_bpd_ci"]].copy()
    t = _with_scale(likelihoods_where_comparable(t))
    t["compare_with"] = [_compare_with(t[(t.protocol == p) & (t.setting == d) & (t.scale == s)], f, keys)
                         if s else "nothing: not a likelihood of the data"
                         for p, d, s, f in zip(t.protocol, t.setting, t.scale, t.family)]
    t["_order"] = t.family.map(family_order)
    t = t.sort_values(["protocol", "comparable", "scale", "bounded", "_order"],
                      ascending=[True, False, True, False, True])
    return t.drop(columns="_order").reset_index(drop=True)


def welch_ci(a, b) -> tuple[float, float]:
    """Mean of b − mean of a and the half-width of its 95 % Welch interval, t(0.975, ν)·√(s_a²/n_a + s_b²/n_b)
    with the Welch–Satterthwaite ν (Welch 1947); NaN half-width unless both have n ≥ 2."""
    a, b = (np.asarray(x, dtype=float) for x in (a, b))
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    diff = float(b.mean() - a.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, np.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:  # every seed of both rows agrees: the seeds leave no doubt about the difference
        return diff, 0.0
    nu = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return diff, float(stats.t.ppf(0.975, nu) * math.sqrt(va + vb))


# The summary ranks by the IWAE-k NLL: the tightest of the bounds on each model's −log p(x) the runs log.
RANK_BY = "test_iwae_nll"


def rankable(table: pd.DataFrame) -> pd.Series:
    """The rows of table 1 the summary can rank: a likelihood of the data with a completed run's IWAE NLL."""
    return table.comparable & np.isfinite(table[RANK_BY])


def searched_keys(runs: pd.DataFrame) -> list[str]:
    """The config keys the runs' study searched: MLflow has its study.search_space flattened, one param
    per dimension's field (params.study.search_space.<key>.kind, …)."""
    prefix, suffix = "params.study.search_space.", ".kind"
    return sorted(c[len(prefix):-len(suffix)] for c in runs.columns
                  if c.startswith(prefix) and c.endswith(suffix) and runs[c].notna().any())


def ranking_table(runs: pd.DataFrame, family: pd.DataFrame) -> pd.DataFrame:
    """The summary's table: within each protocol, comparable scale and setting (see `_with_scale`), the rows
    of table 1 (`family`, of these runs) with a completed run and an IWAE NLL, ranked by it (lower is
    better). In a search study each family's searched configurations are one choice: only the one with
    the highest mean validation ELBO is ranked, so that the ranking never selects on the test set.
    `behind` is a row's mean NLL minus the first row's, with its 95 % Welch interval over the two rows'
    seeds (`behind_ci`); `speed_ratio` its samples/s over the block's fastest row's."""
    keys, groups = _rows(runs)
    row_keys = ["protocol", "family", *keys]
    completed = {group: g.loc[g.state == states.COMPLETE, RANK_BY].to_numpy() for group, g in groups}
    searched = [k for k in keys if k in searched_keys(runs)]
    t = _with_scale(family[rankable(family)])
    if searched:
        choice = ["protocol", "setting", "scale", "family", *(k for k in keys if k not in searched)]
        t = t.sort_values("val_elbo", ascending=False, kind="stable").groupby(choice, dropna=False).head(1)
    blocks = []
    for _, block in t.groupby(["protocol", "setting", "scale"], sort=True):
        block = block.sort_values(RANK_BY, kind="stable").reset_index(drop=True)
        best = completed[tuple(block.loc[0, row_keys])]
        behind = [(0.0, np.nan)] + [welch_ci(best, completed[tuple(r)])
                                    for r in block[row_keys].iloc[1:].itertuples(index=False)]
        blocks.append(block.assign(
            rank=range(1, len(block) + 1), behind=[d for d, _ in behind], behind_ci=[h for _, h in behind],
            speed_ratio=block.samples_per_s / block.samples_per_s.max()))
    columns = ["protocol", "setting", "scale", "rank", "family", *keys, "bounded", "measure", "comparable", "iwae_k",
               "n_complete", "n_trials", "n_diverged", RANK_BY, f"{RANK_BY}_ci", "behind", "behind_ci", "test_bpd",
               "test_bpd_ci", "val_elbo", "samples_per_s", "samples_per_s_ci", "speed_ratio"]
    return pd.concat(blocks, ignore_index=True)[columns] if blocks else pd.DataFrame(columns=columns)


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
        t = family[["protocol", "family", *others, key, "measure", "comparable", "iwae_k", "n_trials", "n_complete",
                    *metric_cols]]
        t = t.assign(_order=t.family.map(family_order)).sort_values(["protocol", "_order", *others, key])
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


SEARCH_COLUMNS = ["trial", "run_id", "state", "val_elbo"]  # then the sampled values


def sampled_keys(search: pd.DataFrame) -> list[str]:
    """The keys whose sampled values a search_table holds."""
    return [c for c in search.columns if c not in SEARCH_COLUMNS]


def search_table(data: StudyData) -> pd.DataFrame:
    """A search's trials (not the grid's variants): completed ones first, best first by their validation
    ELBO at the last epoch (TPE's objective), then the others by trial number (a pruned trial's ELBO is at
    the epoch it was stopped). trial, run_id, state, val_elbo, and the sampled values; empty without a search."""
    keys = searched_keys(data.runs)
    runs = data.runs[~data.runs.variant.isin(grid_labels(data.selection.cfg))]
    if not keys or runs.empty:
        return pd.DataFrame(columns=[*SEARCH_COLUMNS, *keys])
    table = runs.rename(columns={f"params.{k}": k for k in keys})[[*SEARCH_COLUMNS, *keys]]
    order = table.assign(unfinished=table.state != states.COMPLETE, value=-table.val_elbo.where(
        table.state == states.COMPLETE))
    return table.loc[order.sort_values(["unfinished", "value", "trial"], na_position="last").index].reset_index(
        drop=True)


# ---------------------------------------------------------------------------------------------------
# Display: numbers → text


def format_mean(mean: float, ci: float = np.nan) -> str:
    """mean ± half-width, with the decimals the interval supports (two significant digits of it)."""
    if not np.isfinite(mean):
        return NONE
    if ci == 0:  # seeds that all agree: an interval of width 0, not one seed
        return f"{format_mean(mean)} ± 0"
    if not np.isfinite(ci):  # one seed: whole numbers as such, else five significant digits
        if float(mean).is_integer():
            return f"{int(mean)}"
        return f"{mean:.{min(6, max(0, 4 - math.floor(math.log10(abs(mean)))))}f}"  # never in e-notation
    digits = min(6, max(0, 1 - math.floor(math.log10(ci))))
    return f"{mean:.{digits}f} ± {ci:.{digits}f}"


def format_value(v: object) -> str:
    return f"{v:g}" if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else str(v)


def _iwae_label(table: pd.DataFrame) -> str:
    ks = table.iwae_k.dropna().unique() if "iwae_k" in table else []
    return f"IWAE-{int(ks[0])} NLL" if len(ks) == 1 else "IWAE-k NLL"


def mean_text(r: pd.Series, key: str) -> str:
    """mean ± 95 % CI of a metric over the row's completed runs, with "(n of m runs)" where only n of them
    have it: runs of an older vaebench lack the metrics added since (test_iwae_ess), and a NaN one (the
    IWAE's s.e. from one importance sample) is left out."""
    text = format_mean(r[key], r[f"{key}_ci"])
    n = r.get(f"{key}_n", r.n_complete)
    return f"{text} ({int(n)} of {int(r.n_complete)} runs)" if text != NONE and n < r.n_complete else text


def _metric_text(r: pd.Series, key: str) -> str:
    """mean ± 95 % CI of a metric; likelihood-valued ones only on a comparable measure."""
    return mean_text(r, key) if r.comparable or key not in LIKELIHOOD_VALUED else NONE


def _objective_text(r: pd.Series) -> str:
    """A row's test ELBO when it is not a likelihood of the data (a training objective), else —."""
    return NONE if r.comparable else mean_text(r, "test_elbo")


def display_family(table: pd.DataFrame) -> pd.DataFrame:
    """Table 1 as text: mean ± 95 % CI. A row whose numbers are not likelihoods of the data (a density at
    discrete values, a σ fitted to each image) shows its test ELBO as a training objective only."""
    labels = dict(METRICS, test_iwae_nll=_iwae_label(table))
    rows = []
    for _, r in table.iterrows():
        row = {"family": r.family, BOUNDED: "bounded" if r.bounded else "unbounded",
               "sup/pixel": f"{r.supremum:.4g}" if r.bounded and np.isfinite(r.supremum) else "∞"}
        row.update({k: format_value(r[k]) for k in factor_columns(table)})
        if not table.comparable.all():  # in view beside the family: such a row's only number
            row[OBJECTIVE] = _objective_text(r)
        row.update({labels[key]: _metric_text(r, key) for key, _ in METRICS})
        row.update({"trials": r.n_trials, "complete": r.n_complete, "diverged": r.n_diverged,
                    "divergence": f"{r.divergence_rate:.0%}" if np.isfinite(r.divergence_rate) else NONE})
        rows.append(row)
    return pd.DataFrame(rows)


def display_measure(table: pd.DataFrame) -> pd.DataFrame:
    iwae = _iwae_label(table)
    rows = []
    for _, r in table.iterrows():
        row = {"measure (nats per image)": r.measure, "comparable": "yes" if r.comparable else "no",
               BOUNDED: "bounded" if r.bounded else "unbounded", "family": r.family}
        row.update({k: format_value(r[k]) for k in factor_columns(table)})
        row.update({
            "sup/pixel": f"{r.supremum:.4g}" if r.bounded and np.isfinite(r.supremum) else "∞",
            "test ELBO": mean_text(r, "test_elbo"), iwae: mean_text(r, "test_iwae_nll"),
            IWAE_GAIN: mean_text(r, "test_iwae_gain"),
            "bits/dim": mean_text(r, "test_bpd"),
            OBJECTIVE: format_mean(r.training_objective, r.training_objective_ci),
            "divergence": f"{r.divergence_rate:.0%}" if np.isfinite(r.divergence_rate) else NONE,
            "complete/trials": f"{r.n_complete}/{r.n_trials}", "may be compared with": r.compare_with})
        rows.append(row)
    return pd.DataFrame(rows)


def display_factor(table: pd.DataFrame) -> pd.DataFrame:
    labels = dict(METRICS, test_iwae_nll=_iwae_label(table))
    rows = []
    for _, r in table.iterrows():
        row = {"protocol": r.protocol, "family": r.family}
        row.update({k: format_value(r[k]) for k in factor_columns(table)})
        row["n"] = f"{r.n_complete}/{r.n_trials}"
        row.update({labels[key]: _metric_text(r, key) for key in FACTOR_METRICS})
        if not table.comparable.all():
            row[OBJECTIVE] = _objective_text(r)
        rows.append(row)
    return pd.DataFrame(rows)


NOT_TOLD_APART = "no: within the seeds' noise"
NO_INTERVAL = "— (fewer than 2 completed seeds)"


def behind_text(r: pd.Series) -> tuple[str, str]:
    """A ranked row's distance from the first (mean ± 95 % Welch interval) and whether it is clearly behind."""
    if r["rank"] == 1:
        return NONE, NONE
    if not np.isfinite(r.behind_ci):
        return format_mean(r.behind), NO_INTERVAL
    return format_mean(r.behind, r.behind_ci), "yes" if r.behind - r.behind_ci > 0 else NOT_TOLD_APART


def speed_text(ratio: float) -> str:
    """A row's speed over the fastest's, to two significant figures: a slow row's 0.014 would read 0.0 at
    one decimal."""
    return f"{ratio:#.2g}×" if np.isfinite(ratio) else NONE


def display_ranking(table: pd.DataFrame) -> pd.DataFrame:
    """One block of the ranking table as text."""
    rows = []
    for _, r in table.iterrows():
        distance, clearly = behind_text(r)
        row = {"rank": r["rank"], "family": r.family, BOUNDED: "bounded" if r.bounded else "unbounded"}
        row.update({k: format_value(r[k]) for k in factor_columns(table)})
        row.update({_iwae_label(table): mean_text(r, "test_iwae_nll"),
                    "bound": "IWAE + dequantization" if r.measure != r.scale else "IWAE",
                    "behind the first": distance, "clearly behind": clearly,
                    "bits/dim": mean_text(r, "test_bpd"), "complete/trials": f"{r.n_complete}/{r.n_trials}",
                    "samples/s": mean_text(r, "samples_per_s"),
                    "speed vs fastest": speed_text(r.speed_ratio)})
        rows.append(row)
    return pd.DataFrame(rows)


def sampled_value(v: object) -> str:
    """A sampled value as MLflow holds it (text): whole numbers as they are, others to 3 significant digits."""
    try:
        number = float(v)
    except (TypeError, ValueError):
        return str(v)
    return str(v) if number.is_integer() else f"{number:.3g}"


def display_search(table: pd.DataFrame) -> pd.DataFrame:
    keys = sampled_keys(table)
    return pd.DataFrame({
        "trial": [str(int(t)) for t in table.trial], "state": table.state,
        "val ELBO": [format_mean(v) if np.isfinite(v) else NONE for v in table.val_elbo],
        **{k: [sampled_value(v) for v in table[k]] for k in keys}, "run id": table.run_id})


def display_trials(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "trial": [NONE if pd.isna(t) else str(int(t)) for t in table.trial], "run id": table.run_id.fillna(NONE),
        "family": table.family, "protocol": table.protocol,
        "seed": [NONE if pd.isna(s) else str(int(s)) for s in table.seed],
        "variant": table.variant, "state": table.state, "reason": table.reason.fillna("")})
