"""The report: `python -m bench.report study=NAME` on a small real study read back from MLflow and Optuna
in a temporary folder — 4 families under two data protocols, 2 seeds each, one family made to diverge."""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image
from scipy import stats

from bench import config, render, report, report_data, report_plots, report_tables, run, states, study
from models import likelihoods
from tests.conftest import shrink_args

# gaussian_learned diverges honestly but fast: on binarized data its σ collapses without limit, and
# train.scale_collapse: 2 declares the run diverged as soon as σ < 2 (σ starts near 1), in epoch 1.
# laplace on binarized data completes, but as a density at binary values it is a training objective only.
STUDY = """\
study:
  description: "report test"
  seeds: [0, 1]
  grids:
    - data.binarize: [static]
      likelihood.name: [bernoulli, laplace, gaussian_learned]
    - data.binarize: [none]
      likelihood.name: [gaussian, discretized_logistic]
model:
  hidden: [32]
  latent_dim: 4
train:
  scale_collapse: 2.0
"""
ROWS = {("binarized-static", "bernoulli"): (2, 2, 0), ("binarized-static", "laplace"): (2, 2, 0),
        ("binarized-static", "gaussian_learned"): (2, 0, 2),
        ("8bit-dequantized", "gaussian"): (2, 2, 0), ("8bit-dequantized", "discretized_logistic"): (2, 2, 0)}
SCRIPT = "<script>alert(1)</script>"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND"]  # offline: it looked up Google's hosts regardless


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """The study, run once for the module, and its report."""
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "rep.yaml").write_text(STUDY)
    args = [f"study={tmp / 'rep.yaml'}", *shrink_args(tmp), "study.seeds=[0,1]", "train.epochs=2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        assert run.main(args) == 0
        assert report.main(args) == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["rep"])
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    return SimpleNamespace(tmp=tmp, args=args, folder=tmp / "reports" / "rep", children=children,
                           parent=runs[runs["tags.mlflow.parentRunId"].isna()].run_id.item())


def _is_png(data: bytes) -> bool:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.format == "PNG" and image.width > 0 and image.height > 0


def test_report_writes_every_file(done):
    names = {p.name for p in done.folder.iterdir()}
    assert {"report.md", "report.html", "tables.csv", "tables.tex", "val_elbo.png", "reconstructions.png",
            "throughput.png"} <= names
    for png in done.folder.glob("*.png"):
        assert _is_png(png.read_bytes()), png
        assert report.REPORT_FILE.fullmatch(png.name), png  # else the next report would leave it, stale
    md = (done.folder / "report.md").read_text(encoding="utf-8")
    for heading in ("1. Results per likelihood family", "2. Bounded vs unbounded", "3. Factor studies",
                    "4. Provenance"):
        assert heading in md
    assert "![Line plots of validation ELBO (nats per image) against epoch, one panel per data protocol, one line " \
        "per run](val_elbo.png)" in md
    # what the numbers depend on, in the report itself (the shrunk study: 2 epochs, 200 images)
    assert ("Each run: an MLP VAE with hidden layers [32] and 4 latent units, trained 2 epochs in batches of "
            "128 (Adam, lr 0.001, β 1.0, L = 1 sample of z per image) on digits, at most 200 images per split; "
            "IWAE with k = 8 on the first 20 test images.") in md
    setting = report_tables.configuration(report_data.load(done.args).runs).set_index("key").value
    assert (setting["train.epochs"], setting["model.latent_dim"], setting["data.limit"]) == ("2", "4", "200")
    assert setting["likelihood.name"] == setting["data.binarize"] == setting["train.seed"] == report_tables.VARIES
    assert not any(key.startswith(("study.", "tracking.", "report_dir")) for key in setting.index)
    tex = (done.folder / "tables.tex").read_text(encoding="utf-8")
    assert tex.count(r"\begin{tabular}") >= 5 and r"discretized\_logistic" in tex
    csv = pd.read_csv(done.folder / "tables.csv")
    assert {"1 family", "2 measure", "4 trials"} <= set(csv.table)


def test_one_row_per_family_and_protocol_with_its_counts(done):
    table = report_tables.family_table(report_data.load(done.args).runs)
    assert len(table) == len(ROWS)
    for (protocol, family), (n_trials, n_complete, n_diverged) in ROWS.items():
        row = table[(table.protocol == protocol) & (table.family == family)].iloc[0]
        assert (row.n_trials, row.n_complete, row.n_diverged) == (n_trials, n_complete, n_diverged), family
        assert row.divergence_rate == n_diverged / n_trials
        # the grouping is the registry's (no min_scale floor here)
        assert row.bounded == likelihoods.get(family).bounded
    # bounded families come first in each protocol's block
    for _, block in table.groupby("protocol"):
        assert list(block.bounded) == sorted(block.bounded, reverse=True)


def test_diverged_trials_are_counted_not_dropped(done):
    table = report_tables.family_table(report_data.load(done.args).runs)
    row = table[table.family == "gaussian_learned"].iloc[0]
    assert row.n_trials == 2 and row.n_diverged == 2 and row.divergence_rate == 1.0
    assert row.test_elbo_n == 0 and math.isnan(row.test_elbo)  # their metrics do not enter the means
    shown = report_tables.display_family(table).set_index("family").loc["gaussian_learned"]
    assert list(shown[[report_tables.BOUNDED, "trials", "complete", "diverged", "divergence"]]) == ["unbounded", 2, 0, 2, "100%"]
    md = (done.folder / "report.md").read_text(encoding="utf-8")
    failed = md.split("### Trials that did not complete")[1].split("###")[0]
    assert failed.count("gaussian_learned") >= 2 and "collapsed" in failed


def _hand_ci(values) -> tuple[float, float]:
    x = np.asarray(values, dtype=float)
    return x.mean(), stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))


def test_confidence_intervals_equal_a_hand_computation(done):
    table = report_tables.family_table(report_data.load(done.args).runs).set_index("family")
    complete = done.children[done.children["tags.state"] == "complete"]
    client = MlflowClient()
    for family, runs in complete.groupby("tags.family"):
        assert table.loc[family, "test_elbo_n"] == len(runs) == 2
        # an NLL and bits/dim only where log p(x|z) is a likelihood of the data (MLflow has no other)
        nll = (("test_iwae_nll", "test_iwae_mc_se", "test_iwae_gain", "test_bpd") if table.loc[family, "comparable"]
               else ())
        if not nll:
            assert not runs.filter(like="metrics.test_iwae_nll").notna().any().any()
            assert runs["metrics.test_iwae_objective"].notna().all()
        for metric in ("val_elbo", "test_elbo", "test_iwae_ess", *nll):  # ESS: of the weights, on any measure
            mean, half = _hand_ci(runs[f"metrics.{metric}"])
            assert table.loc[family, metric] == pytest.approx(mean, rel=1e-9), (family, metric)
            assert table.loc[family, f"{metric}_ci"] == pytest.approx(half, rel=1e-9), (family, metric)
        for metric in ("samples_per_s", "ms_per_step"):  # each run's median epoch after the first
            medians = [np.median([m.value for m in sorted(client.get_metric_history(r, metric), key=lambda m: m.step)][1:])
                       for r in runs.run_id]
            mean, half = _hand_ci(medians)
            assert table.loc[family, metric] == pytest.approx(mean, rel=1e-9), (family, metric)
            assert table.loc[family, f"{metric}_ci"] == pytest.approx(half, rel=1e-9), (family, metric)
    # the smallest learned scale: the minimum over each run's epochs, then mean ± CI over seeds
    runs = complete[complete["tags.family"] == "discretized_logistic"]
    lowest = [min(m.value for m in client.get_metric_history(r, "min_scale")) for r in runs.run_id]
    mean, half = _hand_ci(lowest)
    assert table.loc["discretized_logistic", "min_scale"] == pytest.approx(mean)
    assert table.loc["discretized_logistic", "min_scale_ci"] == pytest.approx(half)
    assert math.isnan(table.loc["bernoulli", "min_scale"])  # no learned scale: shown as —
    # n = 1: a mean, no interval
    mean, half, n = report_tables.mean_ci([3.0, float("nan")])
    assert (mean, n) == (3.0, 1) and math.isnan(half)


def test_bounded_vs_unbounded_table_states_every_measure(done):
    measure = report_tables.measure_table(report_tables.family_table(report_data.load(done.args).runs)).set_index("family")
    assert measure.loc["gaussian", "measure"] == "pmf of 8-bit pixels (dequantized lower bound)"
    assert measure.loc["gaussian", "compare_with"] == "discretized_logistic"  # the same 8-bit scale
    assert measure.loc["discretized_logistic", "compare_with"] == "gaussian"
    assert not measure.loc["gaussian_learned", "comparable"]
    assert measure.loc["gaussian_learned", "compare_with"].startswith("nothing")
    assert math.isnan(measure.loc["gaussian_learned", "test_iwae_nll"])  # never beside a likelihood
    md = (done.folder / "report.md").read_text(encoding="utf-8")
    section = md.split("## 2. Bounded vs unbounded")[1].split("## 3.")[0]
    for words in ("pmf of binarized pixels", "lower bound on the same 8-bit pmf", "not a likelihood of the data",
                  "8bit-dequantized: gaussian, discretized_logistic share the pmf of 8-bit pixels"):
        assert words in section


def test_a_training_objective_is_never_shown_beside_a_likelihood(done):
    table = report_tables.family_table(report_data.load(done.args).runs)
    shown = report_tables.display_family(table).set_index("family")
    objective, likelihood = shown.loc["laplace"], shown.loc["bernoulli"]  # both on binarized pixels
    for column in ("val ELBO", "test ELBO", "test recon", report_tables._iwae_label(table), "IWAE s.e.", "IWAE MC s.e.",
                   report_data.IWAE_GAIN, "bits/dim"):
        assert objective[column] == report.NONE and likelihood[column] != report.NONE, column
    assert objective[report_tables.OBJECTIVE] != report.NONE and likelihood[report_tables.OBJECTIVE] == report.NONE
    assert objective["test KL"] != report.NONE  # a KL is a KL on any measure
    assert objective["IWAE ESS"] != report.NONE and likelihood["IWAE ESS"] != report.NONE  # so is an ESS
    assert math.isnan(table.set_index("family").loc["laplace", "test_bpd"])  # never logged for it
    likelihoods_only = report_tables.display_family(table[table.protocol == "8bit-dequantized"])
    assert report_tables.OBJECTIVE not in likelihoods_only.columns  # no column of dashes
    # the curves: binarized likelihoods, binarized objectives and 8-bit likelihoods, 5-inch panels, 2 a row
    assert Image.open(done.folder / "val_elbo.png").width == 2 * 5 * 100
    md = (done.folder / "report.md").read_text(encoding="utf-8")
    assert "laplace may be compared with nothing: density at binary values" in md
    # tables.csv too: the objective in its own column, no likelihood-valued number on that row
    csv = pd.read_csv(done.folder / "tables.csv")
    rows = csv[csv.table == "1 family"].set_index("family")
    assert rows.loc["laplace", "training_objective"] == pytest.approx(table.set_index("family").loc["laplace", "test_elbo"])
    assert rows.loc["laplace", list(report_data.LIKELIHOOD_VALUED)].isna().all()
    assert rows.loc["bernoulli", list(report_data.LIKELIHOOD_VALUED)].notna().all()
    assert math.isnan(rows.loc["bernoulli", "training_objective"])


def test_varied_params_become_factor_tables_and_plots(done, tmp_path):
    data = report_data.load(done.args)
    beta = np.where(data.runs["params.train.seed"] == "0", "0.5", "2.0")  # as if train.beta were a grid key
    data.runs["params.train.beta"] = beta
    assert report_tables.factors(data.runs) == ["train.beta"]  # not the seed, family or protocol
    # nor a setting of how runs compute, which a resumed study may have changed (config.HOW)
    for key in config.HOW:
        data.runs[f"params.{key}"] = np.where(data.runs["params.train.seed"] == "0", "x", "y")
    assert report_tables.factors(data.runs) == ["train.beta"]
    table = report_tables.family_table(data.runs)
    assert len(table) == 2 * len(ROWS) and set(table["train.beta"]) == {0.5, 2.0}
    assert list(report_tables.factor_tables(table)) == ["train.beta"]
    # the two bounds over different images, and their gain over the same ones, as in section 1; and what β
    # trades, beside a word on the objective that β ≠ 1 maximises
    shown = report_tables.display_factor(report_tables.factor_tables(table)["train.beta"])
    assert {"test ELBO", "test recon", "test KL", "IWAE-8 NLL", "IWAE MC s.e.", report_data.IWAE_GAIN} <= set(shown.columns)
    blocks = report._factors_section(report_tables.factor_tables(table), [], tmp_path)
    assert ("p", report.BETA_OBJECTIVE) in blocks
    setting = report_tables.configuration(data.runs)
    assert "β (varied), L = 1 sample of z per image" in report._trained(setting, data.runs)
    panels = {}  # each factor panel's title -> its lines' labels, which end with "(protocol)"
    save = report_plots._save

    curves = {}  # the validation curves' panel titles -> their lines' labels
    lowest = {}  # each factor panel's title -> the lowest end of its error bars

    def keep_panels(fig, path):
        kept = panels if path.name.startswith("factor_") else curves if path.name == "val_elbo.png" else {}
        kept.update({ax.get_title(): ax.get_legend_handles_labels()[1] for ax in fig.axes})
        if path.name.startswith("factor_"):
            lowest.update({ax.get_title(): min(np.asarray(s).reshape(-1, 2)[:, 1].min(initial=np.inf)
                                               for c in ax.collections for s in c.get_segments())
                           for ax in fig.axes if ax.collections})
        return save(fig, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report_plots, "_save", keep_panels)
        report.write(data, tmp_path)
    assert _is_png((tmp_path / "factor_train_beta.png").read_bytes())
    # the training objectives' panel holds those rows alone, never a likelihood beside them
    objectives = {label.split()[0] for label in panels[report_plots.OBJECTIVE]}
    assert objectives == set(table.family[~table.comparable.astype(bool)]) and "bernoulli" not in objectives
    # LaTeX captions are escaped, as the cells are: a bare _ (train_beta, eval.iwae_k) stops the compile
    captions = re.findall(r"\\caption\{(.*)\}", (tmp_path / "tables.tex").read_text(encoding="utf-8"))
    assert captions and not [c for c in captions if re.search(r"(?<!\\)[_&%#]", c)], captions
    # a likelihood panel holds one protocol's measure: the Bernoulli's binarized pmf and the 8-bit
    # families never share an axis
    likelihood_panels = {t: labels for t, labels in panels.items() if t.startswith(("test ELBO (nats)", "IWAE NLL (nats)"))}
    assert len(likelihood_panels) == 4, panels  # 2 metrics × 2 protocols
    for title, labels in likelihood_panels.items():
        protocol = title.split("\n")[1].split(":")[0]
        assert labels and all(label.endswith(f"({protocol})") for label in labels), (title, labels)
    assert "### Factor train.beta" in (tmp_path / "report.md").read_text(encoding="utf-8")
    # intervals of what cannot be negative stop at 0 (as wide as the value: they would reach −value)
    wide = table.assign(**{f"{m}_ci": 2 * table[m].abs() for m in report_tables.FACTOR_PLOTS})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report_plots, "_save", keep_panels)
        report_plots.plot_factor(wide, "train.beta", tmp_path / "factor_wide.png")
    assert {"test KL (nats)", "active units", "samples/s"} <= set(lowest)
    assert all(lowest[t] >= 0 for t in ("test KL (nats)", "active units", "samples/s")), lowest
    # the curves of one family at two values of β are told apart
    assert {"bernoulli beta=0.5", "bernoulli beta=2"} <= set(curves["binarized-static"]), curves
    # rows at other β share their family's measure: section 2 says so, not "no other family here"
    measure = report_tables.measure_table(table)
    assert set(measure[measure.family == "bernoulli"].compare_with) == {"bernoulli at other train.beta"}
    assert "bernoulli's rows at different train.beta share the pmf of binarized pixels and may be compared" in \
        " ".join(report._protocol_sentences(measure))


def test_rows_on_other_data_are_not_comparable(done):
    # as if data.name were a grid key: the gaussian's runs on one dataset, the discretized logistic's on another
    data = report_data.load(done.args)
    data.runs["params.data.name"] = np.where(data.runs.family == "gaussian", "fashion_mnist", "digits")
    measure = report_tables.measure_table(report_tables.family_table(data.runs)).set_index("family")
    assert measure.loc["gaussian", "compare_with"] == "(no other row here)"
    assert measure.loc["discretized_logistic", "compare_with"] == "(no other row here)"
    sentences = " ".join(report._protocol_sentences(measure.reset_index()))
    assert "gaussian is the only family on the pmf of 8-bit pixels (data.name=fashion_mnist)" in sentences


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("chromium is not installed; the HTML report test needs it: run tests/setup.sh, or "
                "`apt-get update && apt-get install -y chromium` (Debian)")


def _browse(html_path: Path, tmp: Path, *flags: str) -> str:
    out = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", *flags,
                          html_path.as_uri()], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.tables, self.attrs = [], 0, {}

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))
        if tag == "table":
            self.tables += 1
        if tag == "body":
            self.attrs = dict(attrs)


# Scrolls each table wider than the window to its right end: are its rows' header (the family) and that
# column's header still in view, and is the cell the browser draws at the header's place that header?
_ROW_HEADERS_PROBE = """
const wide = [...document.querySelectorAll('.scroll')].filter(d => d.scrollWidth > d.clientWidth + 10);
document.body.setAttribute('data-row-headers', wide.map(d => {
  const head = d.querySelector('thead th.rowhead');
  d.scrollIntoView({block: 'center'});
  d.scrollLeft = d.scrollWidth;
  const box = d.getBoundingClientRect();
  const seen = [d.querySelector('tbody th[scope=row]'), head].map(c => c.getBoundingClientRect());
  const top = document.elementFromPoint(seen[1].left + 3, seen[1].top + 3);
  return seen.every(r => r.left >= box.left - 1 && r.right <= box.right + 1) && top === head;
}).join(','));
"""


def test_html_report_renders_in_headless_chromium(done, tmp_path):
    # A copy with a probe script that records, after load, whether the browser decoded every image, and
    # whether a wide table's row headers stay in view as it scrolls (at the probe's 800 px window)
    probe = tmp_path / "probe.html"
    probe.write_text((done.folder / "report.html").read_text(encoding="utf-8").replace(
        "</body>", "<script>window.addEventListener('load', () => { document.body.setAttribute('data-images', "
                   "[...document.images].map(i => i.complete && i.naturalWidth > 0).join(','));"
                   f"{_ROW_HEADERS_PROBE}}})</script></body>"),
        encoding="utf-8")
    dom = _browse(probe, tmp_path, "--dump-dom", "--window-size=800,600")
    page = _Images()
    page.feed(dom)
    in_view = page.attrs["data-row-headers"].split(",")
    assert len(in_view) >= 3 and set(in_view) == {"true"}, in_view
    assert page.tables >= 6 and "discretized_logistic" in dom and "Provenance" in dom
    assert len(page.srcs) >= 3
    assert page.attrs["data-images"] == ",".join(["true"] * len(page.srcs))  # no broken image
    for src in page.srcs:
        assert src.startswith("data:image/png;base64,")  # self-contained
        assert _is_png(base64.b64decode(src.split(",", 1)[1]))
    _browse(done.folder / "report.html", tmp_path, f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1280,2400")
    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB"))
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 50  # not blank: text, tables and plots drawn


class _Structure(HTMLParser):
    """Each table's caption, column headers and rows (cells as (tag, attributes, text)); each figure's alt
    text and caption; the page's meta tags."""

    def __init__(self):
        super().__init__()
        self.tables, self.figures, self.metas, self._cell, self._in = [], [], [], None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"caption": "", "head": [], "rows": []})
        elif tag == "caption":
            self._in = "caption"
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("th", "td"):
            self._cell = [tag, attrs, ""]
        elif tag == "img":
            self.figures.append([attrs.get("alt", ""), ""])
        elif tag == "figcaption":
            self._in = "figcaption"
        elif tag == "meta":
            self.metas.append(attrs)

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self.tables[-1]["rows"][-1].append(tuple(self._cell))
            self._cell = None
        elif tag in ("caption", "figcaption"):
            self._in = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[2] += data
        elif self._in == "caption":
            self.tables[-1]["caption"] += data
        elif self._in == "figcaption":
            self.figures[-1][1] += data


def test_html_tables_and_figures_say_what_they_hold_to_a_screen_reader(done):
    page = _Structure()
    page.feed((done.folder / "report.html").read_text(encoding="utf-8"))
    assert {"name": "viewport", "content": "width=device-width, initial-scale=1"} in page.metas
    assert len(page.tables) >= 6
    for table in page.tables:
        header, *rows = table["rows"]
        assert table["caption"] and rows
        assert all(tag == "th" and attrs["scope"] == "col" and text for tag, attrs, text in header)  # none empty
        for row in rows:  # one row header, the family's cell where there is one
            assert [cell[1].get("scope") for cell in row if cell[0] == "th"] == ["row"]
        names = [text for _, _, text in header]
        if "family" in names:
            assert all(row[names.index("family")][0] == "th" for row in rows)
    ranking = next(t for t in page.tables if t["caption"].startswith("Ranking"))
    names = [text for _, _, text in ranking["rows"][0]]
    iwae = next(i for i, n in enumerate(names) if n.startswith("IWAE-"))
    assert all(row[iwae][1].get("class") == "num" for row in ranking["rows"])  # right-aligned, its header too
    assert ranking["rows"][0][names.index("bound")][1].get("class") is None  # text stays left
    assert len(page.figures) >= 3
    for alt, caption in page.figures:  # alt says what the plot is; the caption what to read in it
        assert len(alt.split()) >= 8 and caption and alt != caption and not alt.endswith(".png")
    assert any(caption.startswith(report.CURVES) for _, caption in page.figures)


def test_tables_csv_keeps_counts_whole(done):
    lines = (done.folder / "tables.csv").read_text(encoding="utf-8").splitlines()
    columns = lines[0].split(",")
    counts = [row.split(",")[columns.index("n_complete")] for row in lines[1:]]
    assert counts and all(re.fullmatch(r"\d*", c) for c in counts), counts


def test_run_data_is_escaped(done, tmp_path):
    # A copy of the stores, with markup in a tag, a param and the study description.
    for name in ("mlflow.db", "optuna.db"):
        shutil.copy(done.tmp / name, tmp_path / name)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    child = done.children.run_id.iloc[0]
    client.set_tag(child, "reason", SCRIPT)
    client.log_param(child, "extra.note", SCRIPT)  # varies across runs: becomes a factor, in a table and a plot
    # and Markdown's own markup, newlines and a terminal's escape sequence in the description
    links = "[x](javascript:alert(1)) ![t](http://evil.example/p.png) [r]: http://evil.example"
    client.set_tag(done.parent, "mlflow.note.content", f"{SCRIPT} {links}\n\nsecond line \x1b[31mred")
    assert report.main([f"run={done.parent}", f"tracking.uri={uri}", f"report_dir={tmp_path / 'out'}"]) == 0
    page = (tmp_path / "out" / "rep" / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # description, reason, factor value
    md = (tmp_path / "out" / "rep" / "report.md").read_text(encoding="utf-8")
    assert SCRIPT not in md and "&lt;script&gt;" in md
    assert not re.search(r"(?<!\\)\][(\[:]", md.split("## ", 1)[0])  # no link, image or reference, each ] escaped
    assert "[x\\](javascript:alert(1))" in md and "\x1b" not in md
    row = next(line for line in md.splitlines() if line.startswith("| description"))
    assert row.endswith("second line  [31mred |")  # the description's newlines no longer end its table row
    assert "\x1b" not in (tmp_path / "out" / "rep" / "tables.tex").read_text(encoding="utf-8")


def test_without_the_optuna_storage_states_come_from_the_mlflow_runs(done, tmp_path):
    shutil.copy(done.tmp / "mlflow.db", tmp_path / "mlflow.db")  # no optuna.db beside it
    data = report_data.load(["experiment=rep", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert data.trials.empty and "no Optuna storage" in data.optuna_note
    table = report_tables.family_table(data.runs).set_index(["protocol", "family"])
    for row, counts in ROWS.items():
        assert tuple(table.loc[row, ["n_trials", "n_complete", "n_diverged"]]) == counts
    assert not (tmp_path / "optuna.db").exists()


def test_study_selected_by_experiment_or_run(done):
    uri = f"tracking.uri=sqlite:///{done.tmp / 'mlflow.db'}"
    expected = study.study_name(config.load(done.args))
    assert report_data.select(["experiment=rep", uri]).optuna_study == expected
    assert report_data.select([f"run={done.parent}", uri]).parent.run_id == done.parent
    child = done.children.run_id.iloc[0]
    assert report_data.select([f"run={child}", uri]).parent.run_id == done.parent  # a child selects its parent


def test_each_config_of_a_study_reports_its_own_runs_and_the_experiment_its_latest(done, tmp_path, monkeypatch):
    """A user who changes one setting and runs the study again: the two configs' runs share the experiment,
    and a report pooling them would mix two configs' means without a word."""
    for name in ("mlflow.db", "optuna.db"):
        shutil.copy(done.tmp / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    again = [f"study={done.tmp / 'rep.yaml'}", *shrink_args(tmp_path), "study.seeds=[0]",
             "study.grids=[{likelihood.name: [bernoulli], data.binarize: [static]}]"]
    assert run.main(again) == 0
    uri = f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"
    latest = report_data.select(["experiment=rep", uri])
    assert latest.optuna_study == study.study_name(config.load(again)) != study.study_name(config.load(done.args))
    assert len(latest.children) == 1
    first = report_data.select([f"run={done.parent}", uri])
    assert sorted(first.children.run_id) == sorted(done.children.run_id)


@pytest.mark.parametrize("selection, needle", [
    ("study=nope", "valid choices: aevb, beta"),
    ("experiment=nope", "valid choices: rep"),
    ("run=0123456789abcdef", "valid parent runs: run="),
    ("the study with train.lr=0.5", "select one of its parent runs: run="),  # another config hash
    ("", "exactly one of study=NAME"),
    ("run=0123456789abcdef run=fedcba9876543210", "exactly one of study=NAME"),  # the last would win
    ("experiment=rep train.lr=0.5", "'train.lr=0.5' does not apply with experiment= or run="),  # else ignored
])
def test_unknown_study_exits_2_naming_the_choices_and_writes_nothing(selection, needle, done, tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in done.tmp.rglob("*"))
    if selection.startswith("the study"):
        args = [*done.args, "train.lr=0.5"]
    else:
        args = selection.split()
        args.append(f"tracking.uri=sqlite:///{done.tmp / 'mlflow.db'}")
    assert report.main([*args, f"report_dir={tmp_path / 'reports'}"]) == 2
    assert needle in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert sorted(p.name for p in done.tmp.rglob("*")) == before


def test_a_report_replaces_the_figures_of_the_report_before_and_keeps_other_files(done, tmp_path):
    """Another config of the same study writes into the same folder: a figure of its report that this one
    has not (a 2-d latent's manifold) would stay beside it, as if it were this study's."""
    folder = tmp_path / "reports" / "rep"
    folder.mkdir(parents=True)
    mine = ("notes.txt", "report.md.orig", "val_elbo.png~")  # not a report's: the user's (an editor's backups)
    for name in ("manifold.png", "factor_model_latent_dim.png", "report.html", *mine):
        (folder / name).write_text("from before")
    assert report.main([*done.args, f"report_dir={tmp_path / 'reports'}"]) == 0
    names = {p.name for p in folder.iterdir()}
    assert "manifold.png" not in names and "factor_model_latent_dim.png" not in names  # this report has neither
    assert all((folder / name).read_text() == "from before" for name in mine)
    assert (folder / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert {"report.md", "report.html", "tables.tex", "tables.csv", "val_elbo.png"} <= names


def test_a_report_says_which_other_configs_report_it_replaces(done, tmp_path, capsys):
    args = [f"run={done.parent}", f"tracking.uri=sqlite:///{done.tmp / 'mlflow.db'}", f"report_dir={tmp_path}"]
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.md").write_text("# vaebench report: rep\n\nOptuna study rep-00000000, 3 runs; ...\n")
    assert report.main(args) == 0
    said = capsys.readouterr().out
    assert "it replaces the report of rep-00000000 there, another config of study rep: give each its own " \
           "report_dir to keep both" in said
    assert report.main(args) == 0  # its own report again: nothing to say
    assert "replaces" not in capsys.readouterr().out
    # read from the report's own intro, as written: not only from the stand-in above
    assert report._study_reported_in(tmp_path / "rep") == report_data.load(done.args).selection.optuna_study


def test_a_report_moves_its_files_in_under_a_lock_of_the_folder(done, tmp_path, monkeypatch):
    """Two reports of one study name written at once (two configs' commands ending together) mixed their
    files, one's report.html beside the other's report.md; each now moves its files in holding the folder."""
    import fcntl
    import os

    folder = tmp_path / "reports" / "rep"
    held, replace = [], os.replace

    def checked_replace(src, dst):
        other = os.open(folder, os.O_RDONLY)  # another process's open of the folder
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(other)
        return replace(src, dst)

    monkeypatch.setattr(report.os, "replace", checked_replace)
    assert report.main([*done.args, f"report_dir={tmp_path / 'reports'}"]) == 0
    assert len(held) >= 5 and all(held)
    fcntl.flock(fd := os.open(folder, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released after
    os.close(fd)


def test_unwritable_report_dir_exits_2_and_writes_nothing(done, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("a file where a folder is needed")
    assert report.main([*done.args, f"report_dir={afile}"]) == 2
    err = capsys.readouterr().err
    assert f"error: report_dir='{afile}'" in err and "is not a writable folder" in err
    assert afile.read_text() == "a file where a folder is needed" and list(tmp_path.iterdir()) == [afile]


@pytest.mark.parametrize("store", ["missing", "an empty file"])  # MLflow would create its schema in either
def test_missing_store_exits_2_and_creates_none(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if store == "an empty file":
        (tmp_path / "mlflow.db").touch()
    assert report.main(["study=smoke", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert [(p.name, p.stat().st_size) for p in tmp_path.iterdir()] == ([] if store == "missing" else [("mlflow.db", 0)])


def test_an_empty_optuna_storage_is_read_as_none_and_left_empty(done, tmp_path):
    shutil.copy(done.tmp / "mlflow.db", tmp_path / "mlflow.db")
    (tmp_path / "optuna.db").touch()
    data = report_data.load(["experiment=rep", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert data.trials.empty and "no Optuna storage" in data.optuna_note
    assert (tmp_path / "optuna.db").stat().st_size == 0


@pytest.mark.parametrize("key", ["tracking.uri", "study.storage"])
def test_a_store_that_is_no_sqlite_database_exits_2(key, done, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    args = [*done.args, f"{key}=sqlite:///{text}"]
    assert report.main(args) == 2
    assert f"{key}='sqlite:///{text}': {text} is not an SQLite database" in capsys.readouterr().err
    assert text.read_text() == "not a database\n" and sorted(tmp_path.iterdir()) == [text]


@pytest.mark.parametrize("stage", ["load", "write"])
def test_a_tracking_server_lost_while_reporting_is_one_line_and_exit_1(stage, done, monkeypatch, capsys):
    def gone(*args, **kwargs):
        raise MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/search failed\nTraceback")

    monkeypatch.setattr(report, stage, gone)
    assert report.main(done.args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: MLflow tracking failed (API request to http://127.0.0.1:5000") and \
        "Traceback" not in err, err


def test_help_documents_the_selection(capsys):
    assert report.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "study=NAME" in out and "experiment=NAME" in out and "run=RUN_ID" in out and "likelihoods" in out


@pytest.mark.parametrize("mean, ci, text", [
    (416.954, np.nan, "416.95"), (5088.89, np.nan, "5088.9"), (115407.3, np.nan, "115407"), (3.0, np.nan, "3"),
    (0.00123, np.nan, "0.001230"), (416.954, 0.5, "416.95 ± 0.50"), (5088.89, 12.3, "5089 ± 12"),
    (0.98896, 0.0, "0.98896 ± 0")])
def test_numbers_keep_their_digits_with_or_without_an_interval(mean, ci, text):
    """One seed has no interval: five significant digits, never e-notation or 4-digit rounding. Seeds that
    agree have one of width 0, which must not read as one seed."""
    assert report_tables.format_mean(mean, ci) == text


SEARCH_STUDY = "study:\n  n_trials: 2\n  search_space:\n    train.lr: {low: 0.0001, high: 0.01, log: true}\n"


@pytest.mark.parametrize("states, note", [
    (["failed", "complete", "complete"], ""),  # the failed trial was replaced: nothing left to train
    (["failed", "complete"], "Not finished: 1 search trial(s) still to draw"),
    (["complete", "running"], "Not finished: 1 running."),
])
def test_a_search_trial_cut_short_is_replaced_not_trained_again(states, note, tmp_path):
    (tmp_path / "search.yaml").write_text(SEARCH_STUDY)
    cfg = config.load(study=str(tmp_path / "search.yaml"))
    trials = pd.DataFrame({"trial": range(len(states)), "state": states,
                           "variant": [f"lr={0.001 * (i + 1)} seed=0" for i in range(len(states))]})
    data = SimpleNamespace(trials=trials, runs=None, selection=SimpleNamespace(cfg=cfg))
    assert report_data.unfinished_note(data).startswith(note) if note else report_data.unfinished_note(data) == ""


def test_a_report_that_cannot_be_written_leaves_the_last_one_whole(done, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert report.main([*done.args, f"report_dir={out}"]) == 0
    before = {p.name: p.read_bytes() for p in (out / "rep").iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "render_html", disk_full)  # after report.md and the plots are written
    assert report.main([*done.args, f"report_dir={out}"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (out / "rep").iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == ["rep"]  # no temporary folder left


@pytest.mark.parametrize("a, b", [([1.0, 1.5, 1.7, 2.0], [3.0, 4.0, 6.0]), ([5.0, 5.1], [5.0, 7.0, 9.0, 4.0])])
def test_the_distance_between_two_rows_has_welchs_interval(a, b):
    diff, half = report_tables.welch_ci(a, b)
    interval = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert diff == pytest.approx(np.mean(b) - np.mean(a))
    assert (diff - half, diff + half) == pytest.approx((interval.low, interval.high))
    assert math.isnan(report_tables.welch_ci([1.0], b)[1])  # one seed: no interval


def test_the_summary_ranks_the_likelihoods_of_each_protocol_and_names_the_rest(done):
    data = report_data.load(done.args)
    ranking = report_tables.ranking_table(data.runs, report_tables.family_table(data.runs))
    # only rows that are likelihoods of the data, with a completed run: laplace on binary values and the
    # gaussian_learned that diverged in every trial are not ranked
    assert set(zip(ranking.protocol, ranking.family)) == {
        ("binarized-static", "bernoulli"), ("8bit-dequantized", "gaussian"), ("8bit-dequantized", "discretized_logistic")}
    complete = done.children[done.children["tags.state"] == "complete"]
    nll = {f: runs["metrics.test_iwae_nll"].to_numpy() for f, runs in complete.groupby("tags.family")}
    eight_bit = ranking[ranking.protocol == "8bit-dequantized"].set_index("family")
    first, second = sorted(["gaussian", "discretized_logistic"], key=lambda f: nll[f].mean())
    assert (eight_bit.loc[first, "rank"], eight_bit.loc[second, "rank"]) == (1, 2)
    assert eight_bit.loc[first, "scale"] == "pmf of 8-bit pixels"
    interval = stats.ttest_ind(nll[second], nll[first], equal_var=False).confidence_interval(0.95)
    behind, half = eight_bit.loc[second, "behind"], eight_bit.loc[second, "behind_ci"]
    assert (behind - half, behind + half) == pytest.approx((interval.low, interval.high))
    assert eight_bit.loc[first, "behind"] == 0 and math.isnan(eight_bit.loc[first, "behind_ci"])
    speeds = eight_bit.samples_per_s
    assert eight_bit.speed_ratio.to_dict() == pytest.approx((speeds / speeds.max()).to_dict())
    md = (done.folder / "report.md").read_text(encoding="utf-8")
    summary = md.split("## Summary: which likelihood, and what it costs")[1].split("## 1.")[0]
    assert "### binarized-static: pmf of binarized pixels" in summary
    assert "Lowest IWAE NLL: bernoulli, " in summary and "nothing else here is on this scale" in summary
    assert ("Not ranked — not a likelihood of the data: laplace; not a likelihood of the data and diverged in "
            "every trial: gaussian_learned (0/2 complete).") in summary
    assert "### 8bit-dequantized: pmf of 8-bit pixels" in summary and f"Lowest IWAE NLL: {first}, " in summary
    assert f"the next, {second}, is " in summary
    csv = pd.read_csv(done.folder / "tables.csv")
    assert set(csv[csv.table == "0 ranking"].family) == set(ranking.family)


def test_the_iwae_images_are_those_the_runs_had(done):
    data = report_data.load(done.args)
    assert (data.runs.iwae_images == 20).all()
    setting = report_tables.configuration(data.runs)
    data.runs["iwae_images"] = 13.0  # a test split smaller than eval.iwae_examples=20
    assert "IWAE with k = 8 on the first 13 test images" in report._trained(setting, data.runs)
    data.runs["iwae_images"] = np.where(data.runs.family == "bernoulli", 13.0, 20.0)  # two datasets' splits
    assert "IWAE with k = 8 on at most the first 20 test images" in report._trained(setting, data.runs)


def test_a_slow_rows_speed_vs_the_fastest_keeps_two_significant_figures(done):
    data = report_data.load(done.args)
    ranking = report_tables.ranking_table(data.runs, report_tables.family_table(data.runs))
    ranking["speed_ratio"] = [0.014, 0.41, 1.0]  # at one decimal, 0.014 read 0.0×
    assert list(report_tables.display_ranking(ranking)["speed vs fastest"]) == ["0.014×", "0.41×", "1.0×"]


def test_curves_of_a_numeric_factor_are_in_its_order_each_in_a_colour_of_its_own(tmp_path, monkeypatch):
    latents = ["2", "5", "10", "20", "50"]
    runs = pd.DataFrame({"run_id": latents, "family": "bernoulli", "protocol": "binarized-static", "comparable": True,
                         "bounded": True, "state": "complete", "params.model.latent_dim": latents})
    curves = pd.DataFrame({"run_id": latents, "epoch": 1, "val_elbo": [-1.0, -2.0, -3.0, -4.0, -5.0]})
    drawn = []
    monkeypatch.setattr(report_plots, "_save", lambda fig, path: drawn.extend(fig.axes[0].lines) or path)
    report_plots.plot_curves(runs, curves, ["model.latent_dim"], tmp_path / "c.png")
    assert [line.get_label() for line in drawn] == [f"bernoulli latent_dim={v}" for v in latents]
    assert len({line.get_color() for line in drawn}) == 5  # 2 and 10, 5 and 20 alike before


@pytest.mark.parametrize("factors", [[], ["likelihood.min_scale", "model.latent_dim"]])
def test_the_curves_legends_are_below_their_panels_inside_the_figure_and_apart(tmp_path, monkeypatch, factors):
    """With eight families in a panel, matplotlib's "best" corner had covered the top curve, the best
    family's; then two columns of two-factor labels ran past the figure's edges and over each other."""
    families = ["continuous_bernoulli", "gaussian", "gaussian_learned", "gaussian_shared", "laplace",
                "laplace_learned", "discretized_logistic", "gaussian_optimal"]
    runs = pd.DataFrame({"run_id": [f"{f}-{p}" for p in ("a", "b") for f in families], "family": families * 2,
                         "protocol": ["8bit-dequantized"] * 8 + ["binarized-dynamic"] * 8, "comparable": True,
                         "bounded": True, "state": "complete", "params.likelihood.min_scale": "0.001",
                         "params.model.latent_dim": "20"})
    curves = pd.DataFrame({"run_id": np.repeat(runs.run_id, 2), "epoch": np.tile([1, 2], 16),  # 2 epochs
                           "val_elbo": np.repeat(-1000.0 * np.arange(1, 17), 2) + np.tile([0.0, 1.0], 16)})
    placed, ticks = [], []

    def measure(fig, path):
        fig.draw_without_rendering()
        placed.extend((ax.get_legend().get_window_extent(), ax.get_window_extent(), fig.bbox) for ax in fig.axes)
        ticks.extend(t for ax in fig.axes for t in ax.get_xticks())
        return path

    monkeypatch.setattr(report_plots, "_save", measure)
    report_plots.plot_curves(runs, curves, factors, tmp_path / "c.png")
    assert len(placed) == 2
    for legend, panel, figure in placed:
        assert legend.y1 < panel.y0  # wholly below the plotting area
        assert figure.x0 <= legend.x0 and legend.x1 <= figure.x1 and legend.y0 >= figure.y0
    assert not placed[0][0].overlaps(placed[1][0])
    assert ticks and all(t == round(t) for t in ticks)  # epochs: no tick at 1.5


def test_each_family_is_drawn_in_a_colour_and_a_marker_of_its_own(tmp_path, monkeypatch):
    """Colour alone does not tell families apart in grey scale or with a colour-vision deficiency."""
    families = [*likelihoods.NAMES, "a_family_of_another_version"]  # runs of a family since renamed
    runs = pd.DataFrame({"run_id": families, "family": families, "protocol": "8bit-dequantized",
                         "comparable": True, "bounded": True, "state": "complete"})
    curves = pd.DataFrame({"run_id": families, "epoch": 1, "val_elbo": -1.0})
    drawn = []
    monkeypatch.setattr(report_plots, "_save", lambda fig, path: drawn.extend(fig.axes[0].lines) or path)
    report_plots.plot_curves(runs, curves, [], tmp_path / "c.png")
    assert len(drawn) == len(families) == len({line.get_marker() for line in drawn})
    assert len({line.get_color() for line in drawn}) == len(drawn)


@pytest.mark.parametrize("epochs", [1, 3])
def test_a_short_studys_curves_tick_each_epoch(epochs, tmp_path, monkeypatch):
    """One epoch had ticks at 0.95, 0.96 … and none at 1."""
    runs = pd.DataFrame({"run_id": ["a"], "family": "bernoulli", "protocol": "binarized-static", "comparable": True,
                         "bounded": True, "state": "complete"})
    curves = pd.DataFrame({"run_id": "a", "epoch": range(1, epochs + 1), "val_elbo": -1.0})
    ticks = []
    monkeypatch.setattr(report_plots, "_save", lambda fig, path: ticks.extend(fig.axes[0].get_xticks()) or path)
    report_plots.plot_curves(runs, curves, [], tmp_path / "c.png")
    assert list(ticks) == list(range(1, epochs + 1))


@pytest.mark.parametrize("epochs, said", [("1", "trained 1 epoch in batches"), ("2", "trained 2 epochs in batches")])
def test_the_report_says_what_one_epoch_a_run_means_for_its_speeds(epochs, said):
    setting = pd.DataFrame({"key": ["train.epochs", "data.limit"], "value": [epochs, "0"]})
    text = report._trained(setting, pd.DataFrame({"iwae_images": [100.0]}))
    assert said in text and (report.ONE_EPOCH in text) == (epochs == "1")


def test_a_diverged_runs_curve_ends_at_its_last_finite_value_and_one_with_none_is_named(done, tmp_path):
    data = report_data.load(done.args)
    diverged = data.runs[data.runs.state == "diverged"]
    ended_nan, never_finite = diverged.run_id.iloc[0], diverged.run_id.iloc[1]
    curves = data.curves[data.curves.run_id != never_finite]
    last = curves[curves.run_id == ended_nan].iloc[[-1]]
    assert np.isfinite(last.val_elbo).all()
    nan_rows = pd.DataFrame({"run_id": [ended_nan, never_finite], "epoch": [last.epoch.item() + 1, 1],
                             "val_elbo": [np.nan, np.nan]})
    data = dataclasses.replace(data, curves=pd.concat([curves, nan_rows], ignore_index=True))
    crosses = []
    save = report_plots._save

    def keep_crosses(fig, path):
        if path.name == "val_elbo.png":
            crosses.extend(line.get_xydata()[0] for ax in fig.axes for line in ax.lines if line.get_marker() == "x")
        return save(fig, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report_plots, "_save", keep_crosses)
        report.write(data, tmp_path)
    assert len(crosses) == 1  # the run that has finite values, at its last one
    assert tuple(crosses[0]) == (last.epoch.item(), pytest.approx(last.val_elbo.item()))
    trial = diverged.trial.iloc[1]
    assert f"Not drawn, with no finite validation ELBO: gaussian_learned (trial {trial:.0f}, diverged)." in \
        (tmp_path / "report.md").read_text(encoding="utf-8")


def test_the_data_protocols_table_says_what_each_protocol_feeds_the_families():
    runs = pd.DataFrame({"protocol": ["8bit-raw", "8bit-dequantized", "binarized-static"],
                         "dataset": "digits", "data_source": "sklearn",
                         "params.data.binarize": ["none", "none", "static"],
                         "params.data.dequantize": ["False", "True", "True"]})
    table = report._protocols(runs).set_index("protocol").dequantization
    assert table["8bit-raw"] == "none: densities see k/255; 8-bit pmfs see the pixel values k"
    assert table["8bit-dequantized"].startswith("densities see (k+u)/256")
    assert table["binarized-static"] == "n/a (binary pixels)"


def test_reconstructions_wrap_into_lines_of_readable_width(done, tmp_path):
    # 3 binarized rows and 2 8-bit rows, at most 2 panels a line: lines of 2 + 1 and of 2, 3.2 x 1.8 inches each
    family = report_tables.family_table(report_data.load(done.args).runs)
    path = report_plots.plot_artifacts(family, "reconstructions.png", tmp_path / "r.png", per_line=2)
    assert Image.open(path).size == (2 * 320, 3 * 180)
    assert Image.open(done.folder / "reconstructions.png").size == (3 * 320, 2 * 180)  # 5 a line by default


def test_the_throughput_plot_shows_its_whole_axis_label(done, tmp_path):
    data = report_data.load(done.args)
    data.runs["params.train.beta"] = np.where(data.runs["params.train.seed"] == "0", "0.5", "2.0")  # longer rows
    figures = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report_plots, "_save", lambda fig, path: figures.append(fig) or path)
        report_plots.plot_throughput(report_tables.family_table(data.runs), tmp_path / "throughput.png")
    (fig,) = figures
    fig.draw_without_rendering()
    (ax,) = fig.axes
    label = ax.xaxis.label.get_window_extent()
    assert fig.bbox.x0 <= label.x0 and label.x1 <= fig.bbox.x1 and fig.bbox.y0 <= label.y0, label
    assert "completed seeds" in ax.get_xlabel()


def test_the_summary_ranks_each_factor_value_as_a_row_of_its_own(done):
    data = report_data.load(done.args)
    data.runs["params.train.beta"] = np.where(data.runs["params.train.seed"] == "0", "0.5", "2.0")
    family = report_tables.family_table(data.runs)
    ranking = report_tables.ranking_table(data.runs, family)
    eight_bit = ranking[ranking.protocol == "8bit-dequantized"]
    assert len(eight_bit) == 4 and list(eight_bit["rank"]) == [1, 2, 3, 4]
    assert list(eight_bit.test_iwae_nll) == sorted(eight_bit.test_iwae_nll)
    assert eight_bit.behind_ci.isna().all()  # one seed per row: no interval
    text = " ".join(str(content) for _, content in report._summary_section(family, ranking, []))
    assert "the configurations (family and factor values) whose numbers" in text
    first = eight_bit.iloc[0]
    assert f"Lowest IWAE NLL: {first.family} (train.beta={first['train.beta']:g}), " in text
    assert "behind (no interval: fewer than 2 completed seeds)" in text


def _summary(data) -> str:
    family = report_tables.family_table(data.runs)
    ranking = report_tables.ranking_table(data.runs, family)
    searched = [k for k in report_tables.searched_keys(data.runs) if k in report_tables.factor_columns(family)]
    return " ".join(str(content) for _, content in report._summary_section(family, ranking, searched))


def test_rows_with_another_iwae_estimate_are_ranked_apart(done):
    # as if eval.iwae_k were a grid key: another k is another bound, never ranked against the first
    data = report_data.load(done.args)
    data.runs["params.eval.iwae_k"] = np.where(data.runs.family == "gaussian", "8", "16")
    ranking = report_tables.ranking_table(data.runs, report_tables.family_table(data.runs))
    eight_bit = ranking[ranking.protocol == "8bit-dequantized"].set_index("family")
    assert list(eight_bit["rank"]) == [1, 1]
    assert eight_bit.loc["gaussian", "setting"] == "eval.iwae_k=8"
    assert "8bit-dequantized: pmf of 8-bit pixels (eval.iwae_k=16)" in _summary(data)


def test_rows_that_cannot_be_ranked_say_why(done):
    data = report_data.load(done.args)
    data.runs.loc[data.runs.family == "gaussian", "test_iwae_nll"] = np.nan  # e.g. logged by an older vaebench
    data.runs.loc[data.runs.family == "bernoulli", "state"] = "diverged"
    text = _summary(data)
    assert "no IWAE NLL logged: gaussian" in text
    assert report.NOTHING_RANKED in text  # binarized-static: the bernoulli diverged, laplace is no likelihood
    assert "not a likelihood of the data: laplace" in text and "diverged in every trial: bernoulli (0/2 complete)" in text


def test_a_search_history_draws_the_best_so_far_and_the_trials_not_completed_apart(tmp_path, monkeypatch):
    drawn = {}

    def keep(fig, path):
        (ax,) = fig.axes
        drawn.update({line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines})
        return path

    monkeypatch.setattr(report_plots, "_save", keep)
    table = pd.DataFrame({"trial": [0, 1, 2, 3, 4], "val_elbo": [-90.0, -95.0, -80.0, -70.0, -85.0],
                          "state": ["complete", "complete", "complete", "pruned", "complete"]})
    report_plots.plot_search_history(table, tmp_path / "search_history.png")
    assert drawn["completed trial"] == ([0, 1, 2, 4], [-90.0, -95.0, -80.0, -85.0])
    assert drawn["best so far"][1] == [-90.0, -90.0, -80.0, -80.0]  # the highest ELBO yet, a pruned one's not
    assert drawn["not completed (at its last epoch)"] == ([3], [-70.0])


def test_a_caption_and_cells_cannot_break_a_markdown_row_or_the_latex_compile():
    text = "against model.latent_dim: 5% & #1 | x"
    blocks = [("table", (text, pd.DataFrame({"reason": [text], "n": ["2"]})))]
    (row,) = [line for line in render.render_markdown(blocks).splitlines() if line.startswith("| against")]
    assert row.count(" | ") == 1, row  # the | inside the cell is escaped: two cells
    tex = render.render_latex(blocks)
    (caption,) = re.findall(r"\\caption\{(.*)\}", tex)
    assert caption == r"against model.latent\_dim: 5\% \& \#1 | x"
    assert r"latent\_dim: 5\% \& \#1" in tex.split("caption", 1)[1].split("\n", 1)[1]  # the cell too


def test_a_rows_reconstructions_come_from_a_completed_run_before_a_lower_seed_that_diverged(done):
    runs = report_data.load(done.args).runs
    bernoulli = runs.family == "bernoulli"
    runs.loc[bernoulli & (runs.seed == runs.seed.min()), "state"] = states.DIVERGED
    row = report_tables.family_table(runs).set_index(["protocol", "family"]).loc[("binarized-static", "bernoulli")]
    completed = runs[bernoulli & (runs.state == states.COMPLETE)]
    assert (row.example_run, row.example_state) == (completed.run_id.item(), states.COMPLETE)


@pytest.mark.parametrize("rank, behind, ci, verdict", [
    (2, 3.0, 2.5, "yes"), (2, 1.0, 2.5, report_tables.NOT_TOLD_APART),  # the interval excludes 0, or spans it
    (3, 1.0, math.nan, report_tables.NO_INTERVAL), (1, 0.0, math.nan, report_tables.NONE)])
def test_a_row_is_clearly_behind_only_where_its_interval_excludes_0(rank, behind, ci, verdict):
    row = pd.Series({"rank": rank, "behind": behind, "behind_ci": ci})
    assert report_tables.behind_text(row)[1] == verdict


def test_a_search_ranks_each_familys_configuration_best_on_validation(done):
    data = report_data.load(done.args)
    data.runs["params.study.search_space.train.lr.kind"] = "float"  # as MLflow has a search_space
    first = data.runs["params.train.seed"] == "0"
    data.runs["params.train.lr"] = np.where(first, "0.001", "0.003")
    # the best on validation is the worse on the test set: a choice made on the test set would take the other
    data.runs["val_elbo"] = np.where(first, data.runs.val_elbo + 100, data.runs.val_elbo)
    data.runs[report_tables.RANK_BY] = np.where(first, data.runs[report_tables.RANK_BY] + 100,
                                                data.runs[report_tables.RANK_BY])
    family = report_tables.family_table(data.runs)
    ranking = report_tables.ranking_table(data.runs, family)
    for name, chosen in ranking.set_index("family").iterrows():
        rows = family[(family.family == name) & (family.protocol == chosen.protocol)]
        assert chosen.val_elbo == rows.val_elbo.max() and str(chosen["train.lr"]) == "0.001"  # not on the test set
    assert ranking.groupby(["protocol", "family"]).size().eq(1).all()
    assert report.SEARCHED.format(keys="train.lr") in _summary(data)


def test_a_real_search_study_is_reported_with_its_choice_made_on_validation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "search.yaml").write_text(
        "study:\n  n_trials: 3\n  search_space:\n    train.lr: {low: 0.0003, high: 0.01, log: true}\n"
        "likelihood:\n  name: bernoulli\ndata:\n  binarize: static\n")
    assert run.main([f"study={tmp_path / 'search.yaml'}", *shrink_args(tmp_path), "report=true"]) == 0
    md = (tmp_path / "reports" / "search" / "report.md").read_text(encoding="utf-8")
    assert report.SEARCHED.format(keys="train.lr") in md
    ranking = pd.read_csv(tmp_path / "reports" / "search" / "tables.csv").query("table == '0 ranking'")
    assert len(ranking) == 1 and ranking.family.item() == "bernoulli"


def test_a_search_is_reported_best_trial_first_without_the_grids_variants(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "both.yaml").write_text(
        "study:\n  n_trials: 3\n  grids:\n    - train.beta: [1.0]\n  search_space:\n"
        "    train.lr: {low: 0.0003, high: 0.01, log: true}\n"
        "likelihood:\n  name: bernoulli\ndata:\n  binarize: static\n")
    args = [f"study={tmp_path / 'both.yaml'}", *shrink_args(tmp_path), "report=true"]
    assert run.main(args) == 0
    folder = tmp_path / "reports" / "both"
    search = pd.read_csv(folder / "tables.csv").query("table == '3 search'")
    cfg = config.load(args)
    trials = optuna.load_study(study_name=study.study_name(cfg), storage=study.storage_url(cfg)).get_trials()
    searched = [t for t in trials if t.user_attrs.get("kind") == "search"]
    assert sorted(search.trial) == sorted(t.number for t in searched)  # the grid variant's trial is not listed
    assert list(search.val_elbo) == sorted((t.value for t in searched), reverse=True)  # best first
    best = max(searched, key=lambda t: t.value)
    assert search.run_id.iloc[0] == best.user_attrs["mlflow_run_id"]
    md = (folder / "report.md").read_text(encoding="utf-8")
    assert (f"Best search trial: trial {best.number} (train.lr={best.params['train.lr']:.3g}), validation ELBO "
            f"{report_tables.format_mean(best.value)} nats (run {search.run_id.iloc[0]}). Of 3 search trials: "
            "3 complete.") in md
    assert (folder / "search_history.png").is_file() and "against its trial number, the best so far as a step line](search_history.png)" in md


def test_a_metric_that_some_completed_runs_lack_says_of_how_many_it_is_the_mean():
    """Runs of an older vaebench (before test_iwae_ess) beside new ones in a resumed study."""
    row = pd.Series({"test_iwae_ess": 4.7765, "test_iwae_ess_ci": np.nan, "test_iwae_ess_n": 1, "n_complete": 2})
    assert report_tables.mean_text(row, "test_iwae_ess") == "4.7765 (1 of 2 runs)"
    assert report_tables.mean_text(row.replace({2: 1}), "test_iwae_ess") == "4.7765"
    assert report_tables.mean_text(row.replace({4.7765: np.nan}), "test_iwae_ess") == "—"


def test_mlflows_stand_in_for_infinity_is_read_as_not_finite():
    """vaebench before 810c92e logged ±∞, which MLflow stores as ±1.8e308: not a number to average or print."""
    frame = pd.DataFrame({"metrics.test_iwae_gain": [1.7976931348623157e308, -1.7976931348623157e308, 2.5, np.nan]})
    assert report_data._metric(frame, "test_iwae_gain").isna().tolist() == [True, True, False, True]


def test_a_searchs_values_are_shown_whole_and_its_plot_only_with_an_elbo_to_draw(tmp_path):
    assert [report_tables.sampled_value(v) for v in ("1024", "0.0012345", "[400, 150]")] == ["1024", "0.00123",
                                                                                            "[400, 150]"]
    diverged = pd.DataFrame({"trial": [0, 1], "run_id": ["a", "b"], "state": ["diverged"] * 2,
                             "val_elbo": [np.nan, -np.inf], "train.batch_size": ["1024", "32"]})
    blocks = report._search_section(diverged, tmp_path)
    assert ("p", "No search trial has a finite validation ELBO to plot.") in blocks and not any(
        kind == "img" for kind, _ in blocks) and not (tmp_path / "search_history.png").exists()
    assert "No search trial has completed. Of 2 search trials: 2 diverged." in blocks[1][1]


def test_the_summary_names_the_rows_worse_than_a_uniform_pmf():
    """On the committed reference results: three densities on 8-bit pixels score above 8 bits/dim."""
    ranking = pd.read_csv(Path(__file__).resolve().parents[1] / "reports/reference/likelihoods/tables.csv")
    ranking = ranking[ranking.table == "0 ranking"]
    eight_bit = ranking[ranking.scale == likelihoods.EIGHT_BIT_PMF]
    said = report._worse_than_uniform(eight_bit, [], likelihoods.EIGHT_BIT_PMF)
    worse = eight_bit[eight_bit.test_bpd > 8].family
    assert sorted(worse) == ["gaussian", "gaussian_shared", "laplace"]
    assert said.startswith(" Mean bits/dim above the 8 of a uniform pmf over the pixel values: ")
    assert said.endswith(" A dequantization bound can overstate the 8-bit NLL: the bound is above, the model may "
                         "not be.")
    for name in worse:  # these three are densities on dequantized pixels
        assert re.search(rf"\b{name} \([\d.]+ ± [\d.]+ bits/dim, a dequantization bound\)", said), said
    assert "discretized_logistic" not in said
    # the 8-bit pmf itself is never called a bound, also beside one
    pmf = eight_bit[eight_bit.family == "discretized_logistic"].assign(test_bpd=8.4)
    said = report._worse_than_uniform(pd.concat([pmf, eight_bit[eight_bit.family == "laplace"]]), [],
                                      likelihoods.EIGHT_BIT_PMF)
    assert re.search(r"discretized_logistic \(8\.[\d]+ ± [\d.]+ bits/dim\), laplace \(", said), said
    binary = ranking[ranking.scale == likelihoods.BINARIZED_PMF]
    assert report._worse_than_uniform(binary, [], likelihoods.BINARIZED_PMF) == ""  # 0.22 bits/dim < 1
