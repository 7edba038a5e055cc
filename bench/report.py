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

Exit codes: 0 report written; 1 it could not be written (a full disk: the report folder is left as it
was, not half rewritten); 2 bad input, or no such study/experiment/run (the message names the valid
choices; nothing is written).

Example: python -m bench.report study=likelihoods
         python -m bench.report experiment=likelihoods tracking.uri=sqlite:///runs/mlflow.db
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
import tempfile
from pathlib import Path

import matplotlib
import pandas as pd
from mlflow.exceptions import MlflowException

import bench
from bench import config, states
from bench.config import ConfigError
from bench.render import NONE, Blocks, render_html, render_latex, render_markdown
from bench.report_data import StudyData, load, unfinished_note
from bench.report_plots import plot_artifacts, plot_curves, plot_factor, plot_search_history, plot_throughput
from bench.report_tables import (
    NO_INTERVAL,
    NOT_TOLD_APART,
    VARIES,
    behind_text,
    configuration,
    display_factor,
    display_family,
    display_measure,
    display_ranking,
    display_search,
    display_trials,
    factor_columns,
    factor_tables,
    family_table,
    format_mean,
    format_value,
    likelihoods_where_comparable,
    measure_table,
    rankable,
    ranking_table,
    sampled_keys,
    sampled_value,
    search_table,
    searched_keys,
    trial_table,
    varied_here,
)
from models import likelihoods

# Stages, one module each: select and load the study (report_data), its tables (report_tables), its plots
# (report_plots), the blocks rendered (render); this module writes the prose around them and the files.

# The prose of section 2 (the README's "Which numbers share a measure").
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
    "so for a density on [0,1] before the −log 256 per pixel of the 8-bit scale). An unbounded family can "
    "raise it without limit at a fixed x: on binary or raw 8-bit values its objective can then run away, "
    "which is how its runs diverge. On dequantized 8-bit data it cannot: averaged over the noise u, no "
    "density's log-likelihood exceeds D·log 256, so on the 8-bit scale its objective is at most "
    "log P(k) ≤ 0 (the dequantization bound above). As in section 1, the test ELBO is over the whole "
    "test split and the IWAE NLL over its first eval.iwae_examples images; \"IWAE − ELBO, same images\" "
    "compares the two bounds.")


def _protocol_sentences(measure: pd.DataFrame) -> list[str]:
    keys = factor_columns(measure)
    out = []
    for protocol, block in measure.groupby("protocol", sort=True):
        parts = []
        for (setting, scale), g in block[block.comparable].groupby(["setting", "scale"], sort=False):
            names, varied = list(dict.fromkeys(g.family)), ", ".join(varied_here(g, keys))
            on = f" ({setting})" if setting else ""
            if len(names) > 1:
                parts.append(f"{', '.join(names)} share the {scale}{on} and may be compared"
                             + (f" (at every {varied})" if varied else ""))
            elif varied:
                parts.append(f"{names[0]}'s rows at different {varied} share the {scale}{on} and may be compared")
            else:
                parts.append(f"{names[0]} is the only family on the {scale}{on}")
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
    return pd.DataFrame({"field": list(fields), "value": [NONE if pd.isna(v) else config.redact(str(v))
                                                     for v in fields.values()]})


# An 8-bit pmf (the discretized logistic) is evaluated at the pixel values themselves in a dequantized
# protocol too: its block compares it with the densities on the 8-bit scale.
DEQUANTIZED_PROTOCOL = {"True": "densities see (k+u)/256, u ~ U(0,1); 8-bit pmfs see the pixel values k",
                        "False": "none: densities see k/255; 8-bit pmfs see the pixel values k"}


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
    "confidence interval, mean ± t(0.975, n−1)·s/√n (no interval when n = 1; with few seeds it is wide, and "
    "for a number with a floor, such as the KL (0) or an ESS (1), it may reach below that floor: it bounds "
    "the mean's uncertainty, not the values). Diverged, pruned and failed "
    "trials are counted (trials, divergence = diverged/trials) but do not enter the means; a trial cut short "
    "(failed, killed, interrupted) and then run again counts once, as its last attempt. Section 4 lists every "
    "attempt with its reason. ELBOs are higher-is-better; NLLs, bits/dim and KL lower-is-better. — marks a "
    "number a row does not have: not a likelihood of the data (section 2), no completed run, no interval (one "
    "seed), no learned scale, or the first row's distance from itself.")
FAMILY_COLUMNS = (
    "One block per data protocol; bounded families first. ELBO, reconstruction (E_q log p(x|z)) and IWAE NLL "
    "in nats per image on the row's measure (section 2); bits/dim from the IWAE NLL. IWAE s.e. is the "
    "standard error of the test-set mean over datapoints (how far other test images could move it: every row "
    "has the same images, so for the distance between two rows see the summary's interval); IWAE MC s.e. the "
    "Monte-Carlo standard error of that mean from the k importance samples; both averaged over seeds. The "
    "MC s.e. is a delta-method estimate from one draw of k weights per image: it understates the Monte-Carlo "
    "spread when the weights are heavy-tailed, as a likelihood over many pixels can make them; per image it "
    "is √(1/ESS − 1/k), below 1 nat, with ESS the weights' effective sample size (Σw)²/Σw², from 1 to k: "
    "IWAE ESS is its median over the images, averaged over seeds; near 1, the MC s.e. says little. The test ELBO "
    "and reconstruction are over the whole test split, the IWAE numbers over its first eval.iwae_examples "
    "images (a run param; all when 0): compare them through \"IWAE − ELBO, same images\", the IWAE bound's "
    "gain over the ELBO of its own images and samples (≥ 0 for every image), not through the two columns, "
    "whose images differ. val ELBO is the last epoch's on the validation split. active units counts the "
    "latent units whose posterior mean varies across test images, Cov_x(E_q[z]) > 0.01 (Burda et al. 2016). "
    "min scale is the smallest learned scale reached in training (— for families without a learned scale). "
    "A row whose numbers are not likelihoods of the data (section 2) shows only its test ELBO, as a training "
    "objective on a scale of its own: it compares with no other row.")
FACTOR_COLUMNS = (
    "Each config key the study varies, against the main metrics, per protocol and family (mean ± 95 % CI over "
    "seeds, as in section 1). As there, the test ELBO is over the whole test split and the IWAE over its first "
    "eval.iwae_examples images: \"IWAE − ELBO, same images\" compares the two bounds; likelihood-valued "
    "numbers only where they are likelihoods of the data.")
BETA_OBJECTIVE = (
    "Runs with train.beta ≠ 1 maximise recon − β·KL (Higgins et al. 2017), not the ELBO. Every figure here is "
    "the trained model's ELBO (β = 1), the one number all runs share: the β = 1 runs are scored on what they "
    "maximised, the others not. The test recon and test KL columns show what β trades.")
MANIFOLD = ("The decoder's mean image on a grid of z at the prior's quantiles 0.05 … 0.95 in both latent units "
            "(Kingma & Welling 2014, fig. 4), one seed per family and protocol.")
THROUGHPUT = (
    "Training samples/s per row: each run's median over its epochs after the first (its one epoch when it "
    "ran one; an epoch's images over "
    "its wall clock: the batches' data transform, which on dynamically binarized data draws every pixel "
    "afresh, and the steps), mean ± 95 % CI over seeds; ms/step in the tables is the step alone. Runs that "
    "share a machine with other work see its load: for what a step costs, measured in paired rounds, see "
    "the speed benchmark (README, Speed).")
NO_FACTORS = ("No config key other than the seed, the likelihood family and the data protocol varies across "
              "this study's runs: there are no factor tables.")
IN_NATS = "ELBO, recon, KL, IWAE: nats per image"  # in table captions, which travel without the prose
CURVES = ("Validation ELBO per epoch, one line per run: bounded families solid, unbounded dashed, × at a "
          "diverged run's last finite value; runs whose ELBO is not a likelihood of the data in panels of their own.")

SUMMARY = (
    "Per data protocol, the {rows} whose numbers are likelihoods of the same data (section 2), ranked by "
    "their IWAE NLL in nats per image, lower is better (mean ± 95 % CI over seeds). Each such number "
    "estimates an upper bound on its model's negative log-likelihood: the IWAE bound, and for a density on "
    "dequantized 8-bit pixels the dequantization bound too (column bound), which can only overstate its "
    "8-bit NLL; this ranks the bounds. \"behind the first\" is a row's distance from the first row ± the "
    "half-width of a 95 % Welch interval over the two rows' seeds, on the same test images (the test images' "
    "own sampling error, IWAE s.e. in section 1, is not in it); \"clearly behind\" where that interval lies "
    "above 0. Every row is compared with the first, with no correction for the number of comparisons. A "
    "row is ranked on its completed runs: complete/trials says how many it lost (section 4 gives the "
    "reasons). samples/s is the training speed on the machine that ran the study, as in the throughput "
    "plot, and \"speed vs fastest\" the ratio of its mean to the block's fastest row's: read it with the "
    "intervals of samples/s (for what a step costs, see the speed benchmark). Blocks are never compared "
    "with each other: their numbers are on different measures. A uniform pmf over a pixel's values scores 1 "
    "bit/dim on binarized pixels and 8 on 8-bit ones: a bound above that does not show that its model does "
    "better than no model.")
NOTHING_RANKED = "Nothing here is ranked: no row has a completed run with an IWAE NLL on a likelihood of the data."
SEARCH_TRIALS = ("TPE maximises a trial's validation ELBO at its last epoch; a pruned trial's is at the epoch it was "
                 "stopped, so it is listed after the completed ones, not ranked with them. Diverged trials are "
                 "recorded as failed, which TPE does not learn from.")
SEARCH_HISTORY = ("Validation ELBO (nats per image) per search trial: completed trials as dots, the best so far "
                  "as a line, trials that did not complete as grey crosses at their last epoch.")
SEARCHED = ("A search study ({keys}): of each family's searched configurations, only the one with the highest "
            "mean validation ELBO is ranked, so that the choice is never made on the test set; section 3 lists "
            "them all.")


def _row_name(r: pd.Series, keys: list[str]) -> str:
    factors = ", ".join(f"{k}={format_value(r[k])}" for k in keys)
    return f"{r.family} ({factors})" if factors else r.family


def _lead(block: pd.DataFrame, keys: list[str]) -> str:
    """The block's answer in a sentence: the first row, and whether the next one is told apart from it."""
    first = block.iloc[0]
    lost = f", on {first.n_complete} of {first.n_trials} trials" if first.n_complete < first.n_trials else ""
    lead = (f"Lowest IWAE NLL: {_row_name(first, keys)}, {format_mean(first.test_iwae_nll, first.test_iwae_nll_ci)} "
            f"nats ({format_mean(first.test_bpd, first.test_bpd_ci)} bits/dim{lost})")
    if len(block) == 1:
        return lead + "; nothing else here is on this scale."
    second = block.iloc[1]
    distance, clearly = behind_text(second)
    verdict = {"yes": "clearly behind", NOT_TOLD_APART: "behind, within the seeds' noise: the two are not told apart",
               NO_INTERVAL: "behind (no interval: fewer than 2 completed seeds)"}[clearly]
    return f"{lead}; the next, {_row_name(second, keys)}, is {distance} nats {verdict}."


def _worse_than_uniform(block: pd.DataFrame, keys: list[str], scale: str) -> str:
    """Names the block's rows that score more bits/dim than a uniform pmf over the pixel values ("" when none)."""
    uniform = likelihoods.UNIFORM_BITS_PER_DIM.get(scale)
    worse = block[block.test_bpd > uniform] if uniform else block.iloc[:0]
    if worse.empty:
        return ""

    def named(r) -> str:  # a dequantized density's bound is not the 8-bit pmf itself, which its measure tells
        bound = ", a dequantization bound" if r.measure != r.scale else ""
        return f"{_row_name(r, keys)} ({format_mean(r.test_bpd, r.test_bpd_ci)} bits/dim{bound})"

    bounds = (" A dequantization bound can overstate the 8-bit NLL: the bound is above, the model may not be."
              if (worse.measure != worse.scale).any() else "")
    return (f" Mean bits/dim above the {uniform:g} of a uniform pmf over the pixel values: "
            f"{', '.join(named(r) for _, r in worse.iterrows())}.{bounds}")


def _not_ranked(rows: pd.DataFrame, keys: list[str]) -> str:
    """Why a protocol's other rows have no rank: not a likelihood of the data, no completed run, or no IWAE
    NLL logged."""
    by_reason: dict[str, list[str]] = {}
    for _, r in rows.iterrows():
        why = [] if r.comparable else ["not a likelihood of the data"]
        if r.n_complete == 0:
            why.append("diverged in every trial" if r.n_diverged == r.n_trials > 0 else "no completed run")
        elif r.comparable:
            why.append("no IWAE NLL logged")
        by_reason.setdefault(" and ".join(why), []).append(
            f"{_row_name(r, keys)} ({r.n_complete}/{r.n_trials} complete)" if r.n_complete == 0 else _row_name(r, keys))
    return "Not ranked — " + "; ".join(f"{why}: {', '.join(names)}" for why, names in by_reason.items()) + "."


def _summary_section(family: pd.DataFrame, ranking: pd.DataFrame, searched: list[str]) -> Blocks:
    keys = factor_columns(family)
    rows_are = "configurations (family and factor values)" if keys else "families"
    blocks: Blocks = [("h2", "Summary: which likelihood, and what it costs"), ("p", SUMMARY.format(rows=rows_are)),
                      *([("p", SEARCHED.format(keys=", ".join(searched)))] if searched else [])]
    for protocol, rows in family.groupby("protocol", sort=True):
        ranked = ranking[ranking.protocol == protocol]
        for (setting, scale), block in ranked.groupby(["setting", "scale"], sort=True):
            title = f"{protocol}: {scale}" + (f" ({setting})" if setting else "")
            blocks += [("h3", title), ("p", _lead(block, keys) + _worse_than_uniform(block, keys, scale)),
                       ("table", (f"Ranking, {title} (nats per image)", display_ranking(block)))]
        if ranked.empty:
            blocks += [("h3", protocol), ("p", NOTHING_RANKED)]
        rest = rows[~rankable(rows)]  # a search's unselected configurations are not listed
        if len(rest):
            blocks.append(("p", _not_ranked(rest, keys)))
    return blocks


def _families_section(family: pd.DataFrame) -> Blocks:
    blocks: Blocks = [("h2", "1. Results per likelihood family"), ("p", FAMILY_COLUMNS)]
    for protocol, block in family.groupby("protocol", sort=True):
        blocks += [("h3", f"Protocol {protocol}"),
                   ("table", (f"Per family, protocol {protocol} ({IN_NATS})", display_family(block)))]
    return blocks


def _measure_section(measure: pd.DataFrame) -> Blocks:
    return [("h2", "2. Bounded vs unbounded: which numbers may be compared"), ("p", COMPARABILITY_INTRO),
            ("ul", COMPARABILITY), ("p", BOUNDEDNESS),
            ("table", ("Bounded vs unbounded, with the measure of every number", display_measure(measure))),
            ("p", "In this study:"), ("ul", _protocol_sentences(measure))]


def _factors_section(by_factor: dict[str, pd.DataFrame], searched: list[str], folder: Path) -> Blocks:
    blocks: Blocks = [("h2", "3. Factor studies")]
    if not by_factor:
        blocks.append(("p", NO_FACTORS))
    else:
        blocks.append(("p", FACTOR_COLUMNS))
    if "train.beta" in by_factor:
        blocks.append(("p", BETA_OBJECTIVE))
    for key, table in by_factor.items():
        plot = plot_factor(table, key, folder / f"factor_{safe_name(key)}.png", sampled=key in searched)
        blocks += [("h3", f"Factor {key}"), ("table", (f"Main metrics against {key} ({IN_NATS})", display_factor(table))),
                   ("img", ((f"Line plots of the main metrics against {key}, one panel per metric (per measure for "
                            "likelihoods), one line per protocol and family, with 95 % CI error bars"), plot,
                            f"Main metrics against {key}: mean ± 95 % CI over seeds, as in the table above."))]
    return blocks


def _search_section(search: pd.DataFrame, folder: Path) -> Blocks:
    """A search's trials, best first, with the best trial in a sentence and the search's history."""
    if search.empty:
        return []
    keys = sampled_keys(search)
    counts = search.state.value_counts()
    tally = ", ".join(f"{n} {state}" for state, n in counts.items())
    best = search.iloc[0]
    lead = (f"Best search trial: trial {int(best.trial)} ({', '.join(f'{k}={sampled_value(best[k])}' for k in keys)}), "
            f"validation ELBO {format_mean(best.val_elbo)} nats (run {best.run_id}). "
            if best.state == states.COMPLETE else "No search trial has completed. ")
    drawn = search.val_elbo.abs() < float("inf")  # not NaN, not ±∞
    return [("h3", "Search"),
            ("p", lead + f"Of {len(search)} search trials: {tally}. {SEARCH_TRIALS}"),
            ("table", ("Search trials, completed ones best first", display_search(search))),
            ("img", (("Scatter plot of each search trial's validation ELBO against its trial number, the best so far "
                     "as a step line"), plot_search_history(search, folder / "search_history.png"), SEARCH_HISTORY))
            if drawn.any() else ("p", "No search trial has a finite validation ELBO to plot.")]


def _plots_section(data: StudyData, family: pd.DataFrame, folder: Path) -> Blocks:
    # a search's sampled values would give each trial a legend entry of its own
    grid_factors = [k for k in factor_columns(family) if k not in searched_keys(data.runs)]
    blocks: Blocks = [
        ("h2", "Plots"),
        ("img", (("Line plots of validation ELBO (nats per image) against epoch, one panel per data protocol, one "
                 "line per run"), plot_curves(data.runs, data.curves, grid_factors, folder / "val_elbo.png"),
                 CURVES + _undrawn(data)))]
    recon = plot_artifacts(family, "reconstructions.png", folder / "reconstructions.png")
    if recon:
        blocks.append(("img", ("Test images above their reconstructions, one panel per family and protocol", recon,
                               "Test inputs (top) and their reconstructions, one seed per family and protocol.")))
    else:
        blocks.append(("p", "No reconstructions.png artifacts (the study ran with eval.figures=false)."))
    manifold = plot_artifacts(family, "manifold.png", folder / "manifold.png", height=3.2)
    if manifold:  # runs with a 2-d latent space
        blocks.append(("img", ("Images decoded from a grid of 2-d latent values, one panel per family and protocol",
                               manifold, MANIFOLD)))
    blocks.append(("img", ("Bar chart of training samples/s per family and protocol, with 95 % CI error bars",
                           plot_throughput(family, folder / "throughput.png"), THROUGHPUT)))
    return blocks


def _undrawn(data: StudyData) -> str:
    """Names the runs that the curves leave out: those with no finite validation ELBO ("" when none)."""
    finite = set(data.curves.run_id[data.curves.val_elbo.abs() < float("inf")])  # not NaN, not ±∞
    gone = data.runs[~data.runs.run_id.isin(finite)]
    if gone.empty:
        return ""
    names = ", ".join(f"{r.family} (trial {r.trial:.0f}, {r.state})" for _, r in gone.iterrows())
    return f" Not drawn, with no finite validation ELBO: {names}."


def _trained(setting: pd.DataFrame, runs: pd.DataFrame) -> str:
    """One sentence on what every run trained (a key that differs across runs says so)."""
    value = dict(zip(setting.key, setting.value))

    def v(key: str) -> str:
        return "(varied)" if value.get(key) == VARIES else value.get(key, NONE)

    limit = "" if v("data.limit") in ("0", NONE) else f", at most {v('data.limit')} images per split"
    used = runs.iwae_images.dropna().unique()  # fewer than eval.iwae_examples where a test split is smaller
    if len(used) == 1:
        examples = f"{'all' if v('eval.iwae_examples') == '0' else 'the first'} {int(used[0])}"
    else:
        examples = "all" if v("eval.iwae_examples") == "0" else f"at most the first {v('eval.iwae_examples')}"
    return (f"Each run: an MLP VAE with hidden layers {v('model.hidden')} and {v('model.latent_dim')} latent "
            f"units, trained {v('train.epochs')} epoch{'' if v('train.epochs') == '1' else 's'} in batches of {v('train.batch_size')} (Adam, lr "
            f"{v('train.lr')}, β {v('train.beta')}, L = {v('train.n_samples')} sample{'' if v('train.n_samples') == '1' else 's'} of z per image) on "
            f"{v('data.name')}{limit}; IWAE with k = {v('eval.iwae_k')} on {examples} test images. Section 4 "
            "lists every setting." + (ONE_EPOCH if v("train.epochs") == "1" else ""))


ONE_EPOCH = (" With one epoch a run, samples/s and speed vs fastest include the start of training (its first "
             "steps, the memory it takes): they say little about what a step costs.")
CONFIGURATION = ("Configuration of the runs (their MLflow params, as set: the splits the data gave are under Data "
                 "protocols; the keys the study varies say so)")


def _provenance_section(data: StudyData, trials: pd.DataFrame, setting: pd.DataFrame) -> Blocks:
    problems = trials[trials.state != states.COMPLETE]
    return [
        ("h2", "4. Provenance"), ("table", ("Study", _provenance(data))),
        ("table", (CONFIGURATION, setting)),
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
    ranking = ranking_table(data.runs, family)
    searched = [k for k in searched_keys(data.runs) if k in factor_columns(family)]
    trials = trial_table(data)
    search = search_table(data)
    setting = configuration(data.runs)
    description = str(sel.parent.get("tags.mlflow.note.content", "") or "").strip() or "(no description)"
    blocks: Blocks = [
        ("h1", f"vaebench report: {sel.name}"), ("p", description),
        *([("p", note)] if (note := unfinished_note(data)) else []),
        ("p", f"Optuna study {sel.optuna_study}, {config.counted(len(data.runs), 'run')}; generated {data.generated}. {STATISTICS}"),
        ("p", _trained(setting, data.runs)), *_summary_section(family, ranking, searched),
        *_families_section(family), *_measure_section(measure), *_factors_section(by_factor, searched, folder),
        *_search_section(search, folder),
        *_plots_section(data, family, folder), *_provenance_section(data, trials, setting)]
    tables = {"0 ranking": ranking, "1 family": likelihoods_where_comparable(family), "2 measure": measure,
              **{f"3 factor {k}": likelihoods_where_comparable(t).assign(factor=k) for k, t in by_factor.items()},
              **({"3 search": search} if len(search) else {}), "4 trials": trials}
    return blocks, tables


def safe_name(name: str) -> str:
    """A file name from run data: no path separators, no leading dot."""
    return re.sub(r"[^\w-]+", "_", name).strip("_") or "study"


# the names of a report's files, whichever figures it has: one report replaces another's whole
REPORT_FILE = re.compile(r"report\.(md|html)|tables\.(tex|csv)|(val_elbo|reconstructions|manifold|throughput"
                         r"|search_history|factor_[\w-]+)\.png")


def write(data: StudyData, folder: Path | None = None) -> Path:
    """Writes the report into `folder` (default <report_dir>/<study>/) and returns the folder. Every file
    is written into a temporary folder beside it first and moved in once all are: a write that fails (a
    full disk) leaves the folder as it was, not a truncated report.html beside a new report.md. With them,
    under a lock of the folder, the figures of an earlier report that this one has not go (a manifold.png
    of another config's report stayed beside it); files of other names stay."""
    folder = folder or Path(data.selection.cfg.report_dir) / safe_name(data.selection.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
        new = Path(tmp)
        # Labels come from run data: no $…$ mathtext, so a `$` in a param cannot break a plot.
        with matplotlib.rc_context({"text.parse_math": False}):
            blocks, tables = build(data, new)
        title = f"vaebench report: {data.selection.name}"
        for name, text in (("report.md", render_markdown(blocks)), ("report.html", render_html(blocks, title)),
                           ("tables.tex", render_latex(blocks))):
            (new / name).write_text(text, encoding="utf-8")
        # convert_dtypes: counts stay whole (3, not 3.0) where the tables' missing values made them floats
        pd.concat([t.assign(table=name) for name, t in tables.items()], ignore_index=True).convert_dtypes().to_csv(
            new / "tables.csv", index=False)
        folder.mkdir(exist_ok=True)
        written = {path.name for path in new.iterdir()}
        lock = os.open(folder, os.O_RDONLY)
        try:  # another report of this study's name moving its files in at once would mix the two
            fcntl.flock(lock, fcntl.LOCK_EX)
            for path in new.iterdir():
                os.replace(path, folder / path.name)  # a rename: no write that can fail half-way
            for path in folder.iterdir():  # a figure of the report before (another config's) that this one has not
                if path.name not in written and REPORT_FILE.fullmatch(path.name) and path.is_file():
                    path.unlink()
        finally:
            os.close(lock)  # and the lock with it
    return folder


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip(), f"\nstudies: {', '.join(config.available_studies())}")
        return 0
    try:
        data = load(argv)
        report_dir = data.selection.cfg.report_dir
        config.check_writable("report_dir", report_dir, Path(report_dir) / safe_name(data.selection.name), create=True)
    except ConfigError as e:
        print(f"error: {config.redact(str(e))}", file=sys.stderr)
        return 2
    except MlflowException as e:  # a tracking server gone while the runs are read
        print(f"error: MLflow tracking failed ({config.first_line(e)}); no report written", file=sys.stderr)
        return 1
    replaced = _study_reported_in(Path(report_dir) / safe_name(data.selection.name))
    try:
        folder = write(data)
    except MlflowException as e:  # gone while the figures are fetched
        print(f"error: MLflow tracking failed ({config.first_line(e)}); the report folder is as it was", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, or a report_dir the checks let through (e.g. under /proc as root)
        print(f"error: report_dir={report_dir!r}: cannot write the report ({e}); the folder is as it was",
              file=sys.stderr)
        return 1
    print(f"report of {data.selection.optuna_study} ({config.counted(len(data.runs), 'run')}): {folder / 'report.html'}, "
          f"report.md, tables.csv, tables.tex")
    if replaced not in (None, data.selection.optuna_study):  # a study's configs share its report folder
        print(f"it replaces the report of {replaced} there, another config of study {data.selection.name}: give "
              "each its own report_dir to keep both")
    return 0


def _study_reported_in(folder: Path) -> str | None:
    """The Optuna study whose report a folder holds (its intro names it), if any."""
    try:
        found = re.search(r"^Optuna study (\S+), ", (folder / "report.md").read_text(encoding="utf-8"), re.MULTILINE)
    except (OSError, UnicodeDecodeError):
        return None
    return found.group(1) if found else None


if __name__ == "__main__":
    bench.command_starts()
    sys.exit(main())
