"""The report's plots (matplotlib Figures, not pyplot, whose backend a notebook's import would change):
validation curves, reconstructions and latent manifolds, throughput, factor studies, a search's history."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from unittest import mock

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bench import states
from bench import study as study_mod
from bench.report_data import LIKELIHOOD_VALUED, METRICS
from bench.report_tables import (
    FACTOR_PLOTS,
    OBJECTIVE,
    factor_columns,
    factor_values,
    family_order,
    format_value,
)
from models import likelihoods

NATS = ("test_elbo", "test_iwae_nll", "test_iwae_gain", "test_kl")  # FACTOR_PLOTS in nats per image
NOT_NEGATIVE = ("test_kl", "test_iwae_gain", "active_units", "samples_per_s")


def _row_label(row: pd.Series, keys: list[str]) -> str:
    short = study_mod.short_keys(keys)
    return " ".join([row.family, *(f"{short[k]}={format_value(row[k])}" for k in keys)])


# Each family's colour (Okabe & Ito's colour-blind-safe set, its yellow, faint on white, for Tol's wine) and
# marker: families are told apart by both, also in grey scale or with a colour-vision deficiency
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#882255", "#999999")
MARKERS = "osD^vP*Xh"
LEGEND_SIZE = 9  # points: at most 2 panels a row, shown about as wide as drawn, a legend stays readable


UNKNOWN_FAMILY = ("#BBBBBB", "+")  # a family this vaebench's registry lacks (runs of another version)


def _color(family: str) -> str:
    order = family_order(family)
    return PALETTE[order] if order < len(PALETTE) else UNKNOWN_FAMILY[0]


def _marker(family: str) -> str:
    order = family_order(family)
    return MARKERS[order] if order < len(MARKERS) else UNKNOWN_FAMILY[1]


def _figure(n_panels: int, width: float = 5.0, height: float = 3.6, most_per_row: int = 4):
    """A figure of n_panels panels, at most most_per_row a row; returns it and its n_panels axes."""
    cols = min(n_panels, most_per_row)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.remove()
    return fig, list(axes.flat[:n_panels])


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def plot_curves(runs: pd.DataFrame, curves: pd.DataFrame, keys: list[str], path: Path) -> Path:
    """Validation ELBO per epoch, one line per run, one panel per protocol, and a panel of their own for
    the runs whose ELBO is not a likelihood of the data (training objectives); bounded families solid,
    unbounded dashed; × marks a diverged run's last finite value. A line's colour and label are its
    family's, with its values of the grid factors `keys` when there are any (in their order: 2 < 10)."""
    short = study_mod.short_keys(keys)
    keyed = runs.assign(family_order=runs.family.map(family_order), **{k: factor_values(runs, k) for k in keys})
    labels = [" ".join([r.family, *(f"{short[k]}={format_value(r[k])}" for k in keys)]) for _, r in keyed.iterrows()]
    order = list(dict.fromkeys(pd.Series(labels, index=keyed.index)[keyed.sort_values(["family_order", *keys]).index]))

    def color(i: int, label: str):  # no two alike up to nine lines, then a sequence
        if not keys:
            return _color(label.split()[0])
        return PALETTE[i] if len(order) <= len(PALETTE) else matplotlib.colormaps["viridis"](0.9 * i / (len(order) - 1))

    colors = {label: color(i, label) for i, label in enumerate(order)}
    panels = sorted({(p, not c) for p, c in zip(runs.protocol, runs.comparable)})
    last_epoch = int(curves.epoch.max()) if len(curves) else 1
    columns = 2 if max(map(len, order)) <= 24 else 1  # a legend no wider than its panel, in the figure
    fig, axes = _figure(len(panels), height=3.8 + 0.3 * math.ceil(len(order) / columns), most_per_row=2)
    fig.get_layout_engine().set(h_pad=0.1)  # the layout places a legend below its panel a pixel past the edge
    for ax, (protocol, objective) in zip(axes, panels):
        seen = set()
        for label, (_, run) in zip(labels, runs.iterrows()):
            if run.protocol != protocol or run.comparable == objective:
                continue
            c = curves[curves.run_id == run.run_id].sort_values("epoch")
            c = c[np.isfinite(c.val_elbo)]
            if c.empty:
                continue
            ax.plot(c.epoch, c.val_elbo, "-" if run.bounded else "--", marker=_marker(run.family), markersize=4,
                    markevery=max(1, len(c) // 10), color=colors[label], label=None if label in seen else label)
            seen.add(label)
            if run.state == states.DIVERGED:
                ax.plot(c.epoch.iloc[-1], c.val_elbo.iloc[-1], "x", color=colors[label], markersize=9)
        title, what = ((f"{protocol}: not likelihoods", "training objective") if objective else
                       (protocol, "validation ELBO"))
        ax.set(title=title, xlabel="epoch", ylabel=f"{what} (nats per image)")
        if last_epoch <= 10:  # each epoch ticked: MaxNLocator puts one run's single epoch among 0.95, 0.96 …
            ax.set_xticks(range(1, last_epoch + 1))
            ax.set_xlim(0.5, last_epoch + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no tick at 1.5
        if seen:  # a panel whose runs have no finite value has no line to name; below it, so as to hide none
            ax.legend(fontsize=LEGEND_SIZE, title="solid: bounded, dashed: unbounded", title_fontsize=LEGEND_SIZE,
                      ncol=columns, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return _save(fig, path)


def plot_artifacts(family: pd.DataFrame, artifact: str, path: Path, height: float = 1.8,
                   per_line: int = 5) -> Path | None:
    """Each row's `artifact` figure (reconstructions.png: test inputs above their reconstructions;
    manifold.png) of one of its runs side by side, per protocol in lines of at most `per_line` panels (a
    wider figure is shrunk to the page, its titles past reading); None when no run logged it."""
    client, protocols = MlflowClient(), sorted(family.protocol.unique())
    counts = [(family.protocol == p).sum() for p in protocols]
    width = min(max(counts), per_line)
    lines = [math.ceil(n / width) for n in counts]  # per protocol
    fig = Figure(figsize=(3.2 * width, height * sum(lines)), layout="constrained")
    axes = fig.subplots(sum(lines), width, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    found = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, protocol in enumerate(protocols):
            block = family[family.protocol == protocol].reset_index(drop=True)
            for j, r in block.iterrows():
                ax = axes[sum(lines[:i]) + j // width, j % width]
                try:
                    with mock.patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
                        local = client.download_artifacts(r.example_run, artifact, tmp)
                except (MlflowException, OSError):
                    continue  # figures off (eval.figures=false), none of its kind, or the run died before logging it
                ax.imshow(imread(local), cmap="gray", interpolation="nearest")
                state = "" if r.example_state == states.COMPLETE else f" ({r.example_state})"
                ax.set_title(f"{_row_label(r, factor_columns(family))}{state}\n{protocol}", fontsize=LEGEND_SIZE)
                found += 1
    if not found:
        return None
    return _save(fig, path)


def plot_throughput(family: pd.DataFrame, path: Path) -> Path:
    """Training samples/s per row (each run's median epoch; mean ± 95 % CI over completed seeds)."""
    t = family[np.isfinite(family.samples_per_s)]
    labels = [f"{_row_label(r, factor_columns(family))} ({r.protocol})" for _, r in t.iterrows()]
    fig = Figure(figsize=(8, 0.4 * len(t) + 1.2), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(t))
    ax.barh(y, t.samples_per_s, xerr=t.samples_per_s_ci.fillna(0), color=[_color(f) for f in t.family])
    ax.set_yticks(y, labels, fontsize=LEGEND_SIZE)
    ax.invert_yaxis()
    ax.set_xlim(left=0)
    # two lines: on one, the label is wider than the axes that it is centred under, past the figure's edge
    ax.set(xlabel="training samples/s (each run's median epoch;\nmean ± 95 % CI over completed seeds)",
           title="throughput")
    return _save(fig, path)


def plot_factor(table: pd.DataFrame, key: str, path: Path, sampled: bool = False) -> Path:
    """The main metrics against one factor: a line per protocol × family (× other factors). A factor a
    search `sampled` gets the axis' own ticks: one per sampled value would overlap."""
    others = [k for k in factor_columns(table) if k != key]
    numeric = pd.api.types.is_numeric_dtype(table[key])
    values = sorted(table[key].unique()) if numeric else list(dict.fromkeys(table[key]))
    # (panel title, metric, rows): likelihoods only where they are likelihoods of the data, one panel per
    # protocol and scale, so that no axis holds two measures
    scale = pd.Series([likelihoods.comparable_scale(m, c) for m, c in zip(table.measure, table.comparable)],
                      index=table.index)
    measures = sorted({(p, s) for p, s, c in zip(table.protocol, scale, table.comparable) if c})
    panels = []
    for m in FACTOR_PLOTS:
        name = dict(METRICS)[m] + (" (nats)" if m in NATS else "")
        if m not in LIKELIHOOD_VALUED:
            panels.append((name, m, table))
            continue
        panels += [(f"{name}\n{p}: {s}", m, table[table.comparable & (table.protocol == p) & (scale == s)])
                   for p, s in measures]
    if not table.comparable.all():
        panels.append((OBJECTIVE, "test_elbo", table[~table.comparable]))
    fig, axes = _figure(len(panels), width=3.6, height=3.8)
    for ax, (title, metric, rows) in zip(axes, panels):
        for group, g in rows.groupby(["protocol", "family", *others], sort=False):
            x = g[key] if numeric else g[key].map(values.index)
            label = " ".join(str(v) for v in group[1:]) + f" ({group[0]})"
            ci = g[f"{metric}_ci"].fillna(0)
            # a t-interval of a quantity that cannot be negative stops at 0
            below = np.minimum(ci, g[metric].clip(lower=0)) if metric in NOT_NEGATIVE else ci
            ax.errorbar(x, g[metric], yerr=[below, ci], marker=_marker(group[1]), capsize=3,
                        linestyle="-" if g.comparable.all() else ":", color=_color(group[1]), label=label)
        if numeric and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")  # β 0.25 … 4, latent 2 … 50
        if sampled and numeric:  # 1, 2 and 5 of each decade: a range of one decade gets more than one tick
            if ax.get_xscale() == "log":
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        else:
            ax.set_xticks(values if numeric else range(len(values)), [format_value(v) for v in values], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel(key)
        ax.set_title(title, fontsize=LEGEND_SIZE)
    legend = {}  # label -> line, over all panels: the likelihood panels lack the objectives' lines
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=LEGEND_SIZE)
    return _save(fig, path)


def plot_search_history(table: pd.DataFrame, path: Path) -> Path:
    """A search's validation ELBO per trial (search_table's rows): completed trials as dots with the best
    so far as a line, the others (pruned: at the epoch they were stopped) as grey crosses."""
    fig, (ax,) = _figure(1, width=6.0, height=3.6)
    done = table[table.state == states.COMPLETE].sort_values("trial")
    rest = table[(table.state != states.COMPLETE) & np.isfinite(table.val_elbo)]
    ax.plot(done.trial, done.val_elbo, "o", color="tab:blue", label="completed trial")
    ax.step(done.trial, done.val_elbo.cummax(), where="post", color="tab:blue", alpha=0.6, label="best so far")
    if len(rest):
        ax.plot(rest.trial, rest.val_elbo, "x", color="grey", label="not completed (at its last epoch)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("validation ELBO (nats)")
    ax.legend(fontsize=LEGEND_SIZE)
    return _save(fig, path)

