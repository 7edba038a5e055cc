"""The training loop on the offline digits data: learning, divergence handling, per-epoch metrics,
final test metrics and figures."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import platform
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from bench import config, figures, train
from bench.data import load
from bench.states import COMPLETE, DIVERGED
from models import likelihoods
from models.estimators import ElboTerms, IwaeEstimate, gaussian_kl

# Small but real runs: the whole digits training split, a narrower MLP than the default [400] to keep
# each run to a second or two on two CPU cores.
BASE = ["data.name=digits", "train.device=cpu", "model.hidden=[128]", "eval.iwae_k=16",
        "eval.iwae_examples=50", "eval.chunk=8"]
PROTOCOLS = {
    "bernoulli": ["likelihood.name=bernoulli", "data.binarize=static"],
    "bernoulli-dynamic": ["likelihood.name=bernoulli", "data.binarize=dynamic"],  # training data stay 8-bit
    "gaussian": ["likelihood.name=gaussian", "data.binarize=none"],
    "laplace": ["likelihood.name=laplace", "data.binarize=none"],
}
HISTORY_KEYS = {"train_elbo", "val_elbo", "train_recon", "train_kl", "samples_per_s", "ms_per_step",
                "peak_memory_mb"}


def make_cfg(*overrides: str) -> config.Config:
    return config.load([*BASE, *overrides])


@pytest.fixture(scope="module")
def short_runs():
    """One 5-epoch run per family, shared by the tests below (cached on first use)."""
    cache: dict[str, tuple[config.Config, train.TrainResult]] = {}

    def get(name: str):
        if name not in cache:
            cfg = make_cfg(*PROTOCOLS[name], "train.epochs=5")
            cache[name] = (cfg, train.train(cfg))
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_short_run_improves_the_validation_elbo(short_runs, name):
    _, result = short_runs(name)
    assert result.status == COMPLETE and result.reason == ""
    assert len(result.history) == 5
    val = [m["val_elbo"] for m in result.history]
    assert all(math.isfinite(v) for v in val)
    assert val[-1] > val[0], val


def test_history_has_every_per_epoch_metric(short_runs):
    _, result = short_runs("bernoulli")
    for epoch, metrics in enumerate(result.history, start=1):
        assert HISTORY_KEYS <= set(metrics), HISTORY_KEYS - set(metrics)
        assert "min_scale" not in metrics  # no learned scale (not an ∞, which MLflow would store as NaN)
        assert metrics["epoch"] == epoch
        assert metrics["samples_per_s"] > 0 and metrics["ms_per_step"] > 0 and metrics["peak_memory_mb"] > 0
        # ELBO = recon − KL, with KL ≥ 0, on the pmf of binarized pixels (≤ 0)
        assert metrics["train_elbo"] == pytest.approx(metrics["train_recon"] - metrics["train_kl"], rel=1e-6)
        assert metrics["train_kl"] >= 0 and metrics["train_elbo"] <= 0


@pytest.mark.skipif(not train.PROC.joinpath("clear_refs").exists(), reason="Linux's /proc/self/clear_refs")
def test_cpu_peak_memory_is_the_runs_own_not_the_processs():
    # A worker trains many runs: an earlier 512 MiB peak of the process must not show in this run's
    touched = torch.ones(2**27)  # 512 MiB, written
    del touched
    lifetime_mb = train.resource.getrusage(train.resource.RUSAGE_SELF).ru_maxrss / 2**10
    result = train.train(make_cfg(*PROTOCOLS["bernoulli"], "train.epochs=1"))
    assert 0 < result.history[0]["peak_memory_mb"] < lifetime_mb - 256


def test_cpu_peak_memory_without_proc_is_in_megabytes(monkeypatch, tmp_path):
    # Where there is no /proc (macOS), the peak is getrusage's, whose unit differs by system (bytes on
    # macOS, kB on Linux): a torch process holds a few hundred MB, not hundreds of GB or under 1 MB
    monkeypatch.setattr(train, "PROC", tmp_path / "no-proc")
    resident_mb = train.peak_memory_mb(torch.device("cpu"))
    assert 20 < resident_mb < psutil.virtual_memory().total / 2**20


def test_reported_elbo_is_on_the_run_measure(short_runs):
    # Gaussian on dequantized 8-bit data: every reported ELBO carries −D log 256 (density on [0,1] ->
    # lower bound on the 8-bit pmf), so the last val_elbo is evaluate()'s ELBO plus that offset.
    cfg, result = short_runs("gaussian")
    assert result.measure.comparable
    assert result.measure.nats_offset_per_pixel == pytest.approx(-math.log(256))
    data = result.data
    plain = train.evaluate(result.model, data.val, data.transform(result.model.likelihood.family, False),
                           seed=cfg.data.seed)
    assert result.history[-1]["val_elbo"] == pytest.approx(plain["elbo"] - data.dim * math.log(256), rel=1e-6)
    # at β = 1 the training objective is the ELBO, on the same measure
    assert cfg.train.beta == 1
    assert result.history[-1]["train_objective"] == pytest.approx(result.history[-1]["train_elbo"], rel=1e-6)


@pytest.mark.parametrize("name", ["bernoulli", "bernoulli-dynamic", "gaussian"])
def test_final_metrics(short_runs, name):
    cfg, result = short_runs(name)
    progress = []
    out = train.final_metrics(result, config.apply(cfg, {"eval.iwae_examples": 250}),
                              lambda done, total: progress.append((done, total)))
    assert progress == [(100, 250), (200, 250), (250, 250)]  # after each batch of the IWAE's images
    assert out["eval_s"] > 0 and out["eval_peak_memory_mb"] > 10
    for key in ("test_iwae_nll", "test_iwae_nll_se", "test_bpd", "anomaly_kl_noise",
                "active_units"):
        assert key in out and math.isfinite(out[key]), key
    d = result.data.dim
    assert out["test_bpd"] == pytest.approx(out["test_iwae_nll"] / (d * math.log(2)), rel=1e-12)
    # both are NLLs of a pmf (binarized, or 8-bit via dequantization): positive
    assert out["test_iwae_nll"] > 0 and out["test_iwae_nll_se"] > 0
    if name == "gaussian":  # a lower bound on the 8-bit pmf: no better than 8 bits uniform plus slack
        assert 0 < out["test_bpd"] < 16
    assert 0 <= out["active_units"] <= cfg.model.latent_dim and out["active_units"] == int(out["active_units"])
    assert out["anomaly_kl_noise"] >= 0 and "anomaly_kl_data" not in out  # the test images' KL is test_kl
    # the alarm is the 99th percentile of the KLs of training inputs, as training saw them (another
    # binarization or dequantization draw here: equal within a few per cent over the training set)
    as_trained = result.data.transform(result.model.likelihood.family, train=True)(result.data.train)
    assert as_trained.max() <= 1  # pixels, never raw 8-bit values
    kl_train = gaussian_kl(*result.model.encode(as_trained))
    assert out["anomaly_kl_train"] == pytest.approx(kl_train.mean().item(), rel=0.05)
    assert 0 <= out["anomaly_false_alarm_rate"] <= 1 and 0 <= out["anomaly_detection_rate"] <= 1
    assert out["iwae_k"] == cfg.eval.iwae_k
    assert out["test_iwae_gain"] > 0  # IWAE-k over the ELBO of the same images and samples


@pytest.mark.parametrize(("name", "offset_per_pixel"), [("bernoulli", 0.0), ("gaussian", -math.log(256))])
def test_final_metrics_put_the_iwae_estimates_on_the_runs_measure(short_runs, monkeypatch, name, offset_per_pixel):
    # known per-image estimates in place of the IWAE's: the NLL is their mean on the run's measure (a density
    # on dequantized pixels, −D log 256 to the 8-bit pmf), its s.e. over images std/√n, the MC s.e. √Σse²/n
    cfg, result = short_runs(name)
    given = []

    def known(model, x, k, chunk):
        log_px = -x.sum(1)  # (B,)
        given.append(log_px)
        return IwaeEstimate(log_px, torch.full_like(log_px, 0.5), log_px - 1.0, torch.arange(len(x)) + 1.0)

    monkeypatch.setattr(train, "iwae", known)
    out = train.final_metrics(result, cfg)
    log_px, d = torch.cat(given).double(), result.data.dim
    n = min(cfg.eval.iwae_examples, len(result.data.test))
    assert len(log_px) == n == out["iwae_images"]
    assert out["test_iwae_nll"] == pytest.approx(-(log_px.mean().item() + d * offset_per_pixel), rel=1e-6)
    assert out["test_iwae_nll_se"] == pytest.approx(log_px.std().item() / math.sqrt(n), rel=1e-5)
    assert out["test_iwae_mc_se"] == pytest.approx(0.5 / math.sqrt(n), rel=1e-6)  # √(n · 0.25) / n
    assert out["test_iwae_gain"] == pytest.approx(1.0, rel=1e-6)
    ess = torch.cat([torch.arange(len(g)) + 1.0 for g in given])
    assert out["test_iwae_ess"] == ess.median().item()  # of the images' effective sample sizes
    assert out["test_bpd"] == pytest.approx(out["test_iwae_nll"] / (d * math.log(2)), rel=1e-12)


def test_the_test_elbo_and_reconstruction_are_on_the_runs_measure(short_runs):
    """A density on dequantized pixels: its test ELBO beside the 8-bit pmfs' only with −D·log 256."""
    cfg, result = short_runs("gaussian")
    out = train.final_metrics(result, cfg)
    on_density = train.evaluate(result.model, result.data.test, result.data.transform(
        result.model.likelihood.family, train=False), seed=cfg.data.seed)
    offset = result.data.dim * math.log(256)
    assert out["test_elbo"] == pytest.approx(on_density["elbo"] - offset, rel=1e-6)
    assert out["test_recon"] == pytest.approx(on_density["recon"] - offset, rel=1e-6)


def test_the_anomaly_rates_are_of_the_inputs_they_name(short_runs):
    """Detection: noise images above the alarm (the training KLs' 99th percentile); false alarms: test
    images above it. Recomputed from the same seeded draws as final_metrics."""
    cfg, result = short_runs("gaussian")
    model, data, seed = result.model, result.data, cfg.data.seed
    out = train.final_metrics(result, cfg)
    eval_tf, train_tf = (data.transform(model.likelihood.family, train=t) for t in (False, True))
    with torch.no_grad(), torch.random.fork_rng():
        x_test = torch.cat(list(train.eval_inputs(data.test, eval_tf, train._Streams(data.test.device, seed))))
        torch.manual_seed(seed + 2)
        noise = eval_tf(torch.randint(0, 256, data.test.shape, dtype=torch.uint8))
        torch.manual_seed(seed + 3)
        alarm = gaussian_kl(*model.encode(train_tf(data.train))).quantile(0.99)
        flagged_noise = (gaussian_kl(*model.encode(noise)) > alarm).float().mean().item()
        flagged_test = (gaussian_kl(*model.encode(x_test)) > alarm).float().mean().item()
    assert out["anomaly_detection_rate"] == pytest.approx(flagged_noise)
    assert out["anomaly_false_alarm_rate"] == pytest.approx(flagged_test)


def test_final_metrics_count_the_active_units_by_their_posterior_means(short_runs, monkeypatch):
    """Units 0 and 1 have a mean that follows the image, the others a constant one; every log-variance
    varies: 2 active units (Burda et al. 2016, section 5.2)."""
    cfg, result = short_runs("gaussian")
    z = cfg.model.latent_dim
    varies = torch.tensor([1.0, 1.0] + [0.0] * (z - 2))
    monkeypatch.setattr(result.model, "encode", lambda x: (x[:, 28:28 + z] * varies, 10 * x[:, 28:28 + z] - 5))
    assert train.final_metrics(result, cfg)["active_units"] == 2


def _recon_one_kl_zero(x):
    return ElboTerms(torch.ones(x.shape[:-1]), torch.zeros(x.shape[:-1]), None)


def test_the_epoch_mean_counts_the_short_last_batch():
    """200 images in batches of 128: a mean over 256 (two full batches) or 128 would not be 1."""
    cfg = make_cfg("likelihood.name=bernoulli", "data.binarize=static", "train.batch_size=128")
    x = torch.zeros(200, 64, dtype=torch.uint8)
    metrics = train.train_epoch(train.build(cfg, 64), _recon_one_kl_zero, x, lambda k: k.float(), cfg)
    assert metrics["train_recon"] == 1.0 and metrics["train_elbo"] == 1.0


def test_an_evaluation_over_several_batches_is_the_splits_mean(monkeypatch):
    """Batches of 100, 100 and 50 images: the mean over the 250, not over a batch, nor of the batches' means."""
    cfg = make_cfg("likelihood.name=bernoulli", "data.binarize=static")
    x = (torch.arange(250 * 64) % 2).view(250, 64).to(torch.uint8)
    x[:, 0] = torch.arange(250) % 2  # images of different sums
    monkeypatch.setattr(train, "EVAL_BATCH", 100)
    monkeypatch.setattr(train, "elbo_terms", lambda model, x: ElboTerms(x.sum(1), torch.zeros(len(x)), None))
    out = train.evaluate(train.build(cfg, 64), x, lambda k: k.float(), seed=0)
    assert out["recon"] == pytest.approx(x.float().sum(1).mean().item(), rel=1e-6)


def test_each_stacked_variant_keeps_its_own_largest_log_p():
    """The divergence check of each variant reads its own images' largest log p(x|z)."""
    recon = torch.tensor([[-5.0, -7.0], [-1.0, -2.0]])  # (N = 2 variants, B = 2 images)
    rows, _ = train.run_steps(lambda x: ElboTerms(recon, torch.zeros_like(recon), None), [torch.zeros(2, 2, 3)],
                              lambda b: b)
    assert [row[2] for row in rows] == [-5.0, -1.0]


@pytest.mark.parametrize("name", ["bernoulli-dynamic", "gaussian"])  # dequantization noise: gaussian
def test_the_iwae_batching_changes_only_the_iwae_samples(short_runs, name):
    # every other draw has a seed of its own: the same noise images, dequantization and training
    # binarization for every variant, however many numbers the IWAE drew before them
    cfg, result = short_runs(name)
    out = train.final_metrics(result, cfg)
    other = train.final_metrics(result, config.apply(cfg, {"eval.chunk": 3}))
    for key in ("test_elbo", "anomaly_kl_train", "anomaly_kl_noise", "anomaly_detection_rate",
                "anomaly_false_alarm_rate", "active_units"):
        assert other[key] == out[key], key
    assert other["test_iwae_nll"] != out["test_iwae_nll"]  # other samples of z
    assert abs(other["test_iwae_nll"] - out["test_iwae_nll"]) < 5 * math.hypot(out["test_iwae_mc_se"],
                                                                             other["test_iwae_mc_se"])


def test_every_model_of_a_dataset_is_evaluated_on_the_same_dequantized_inputs(monkeypatch):
    # the inputs are drawn before any z: the latent size (how many numbers each batch's z takes) must
    # not move the noise of the batches after the first
    cfg = make_cfg(*PROTOCOLS["gaussian"])
    data = load(cfg.data, torch.device("cpu"))
    monkeypatch.setattr(train, "EVAL_BATCH", 50)
    seen = {}
    for latent in (2, 20):
        model = train.build(config.apply(cfg, {"model.latent_dim": latent}), data.dim)
        inputs, encode = [], model.encode
        model.encode = lambda x, inputs=inputs, encode=encode: (inputs.append(x.clone()), encode(x))[1]
        train.evaluate(model, data.val, data.transform(model.likelihood.family, train=False), seed=cfg.data.seed)
        seen[latent] = torch.cat(inputs)
    assert len(seen[2]) == len(data.val) > 50  # several batches
    assert not torch.equal(seen[2], data.val.float() / 255)  # dequantized: noise was drawn
    assert torch.equal(seen[2], seen[20])


def test_a_training_objective_has_no_bits_per_dim():
    # A σ-VAE "density" (σ fitted to each image) on 8-bit data is not a code length of the data
    cfg = make_cfg("likelihood.name=gaussian_optimal", "data.binarize=none", "train.epochs=1")
    result = train.train(cfg)
    assert not result.measure.comparable
    out = train.final_metrics(result, cfg)
    assert not {"test_bpd", "test_iwae_nll", "test_iwae_nll_se", "test_iwae_mc_se"} & set(out)  # no NLL of the data
    assert math.isfinite(out["test_iwae_objective"]) and out["test_iwae_objective_se"] > 0
    assert out["test_iwae_objective_mc_se"] >= 0


def test_learned_gaussian_on_binary_data_diverges_without_raising():
    # A density on {0, 1} pixels with a learned σ is unbounded: σ → 0 on the always-black corners
    # (the AEVB write-up's learned-σ loss ran to −1342 and kept falling). The run must end as
    # "diverged" with the reason recorded, not raise and not "complete".
    cfg = make_cfg("likelihood.name=gaussian_learned", "data.binarize=static", "train.epochs=20",
                   "train.lr=1e-3")
    result = train.train(cfg)
    assert result.status == DIVERGED
    assert "collapsed" in result.reason and "unbounded" in result.reason
    assert len(result.history) < 20  # stopped at the epoch it was detected
    last = result.history[-1]
    assert last["min_scale"] < cfg.train.scale_collapse * result.data.quantum
    # the objective climbs every epoch, and the best image's log p per pixel is already above 0,
    # the supremum of any pmf of binary pixels: the number is not a likelihood of the data
    train_elbo = [m["train_elbo"] for m in result.history]
    assert all(b > a for a, b in itertools.pairwise(train_elbo)), train_elbo
    assert last["max_log_p_per_pixel"] > 0
    assert not result.measure.comparable


@pytest.mark.parametrize("backward", config.BACKWARDS)
def test_nan_loss_ends_the_run_as_diverged(monkeypatch, backward):
    owner, name = {"manual": (train.ManualGradient, "step"), "autograd": (train, "elbo_terms")}[backward]
    real = getattr(owner, name)

    def nan_terms(*args):
        terms = real(*args)
        terms.recon = terms.recon * float("nan")
        return terms

    monkeypatch.setattr(owner, name, nan_terms)
    result = train.train(make_cfg(*PROTOCOLS["gaussian"], "train.epochs=3", "data.limit=200",
                                  f"train.backward={backward}"))
    assert result.status == DIVERGED and "non-finite" in result.reason
    assert "train_elbo" in result.reason
    assert len(result.history) == 1


def test_absurd_learning_rate_ends_the_run_as_diverged():
    result = train.train(make_cfg(*PROTOCOLS["gaussian"], "train.epochs=3", "data.limit=200",
                                  "train.lr=1e30"))
    assert result.status == DIVERGED and "non-finite" in result.reason


@pytest.mark.parametrize("name", [n for n, f in likelihoods.FAMILIES.items() if f.learned_scale])
def test_a_collapsed_learned_scale_is_divergence_where_the_objective_can_run_away(name):
    cfg = make_cfg(f"likelihood.name={name}", "data.binarize=none", "train.scale_collapse=0.01")
    lik = config.likelihood_of(cfg)
    quantum = 1 / 255
    healthy = {"val_elbo": -1.0, "max_log_p_per_pixel": -10.0, "min_scale": 0.02 * quantum}
    collapsed = {**healthy, "min_scale": 0.005 * quantum}
    raw, dequantized = lik.measure(False, dequantized=False), lik.measure(False, dequantized=True)
    assert train.divergence(healthy, lik, cfg, quantum, raw) == ""
    if lik.bounded:  # a pmf's scale may shrink: its log p cannot pass 0
        assert lik.family.is_pmf and train.divergence(collapsed, lik, cfg, quantum, raw) == ""
        return
    assert "learned scale collapsed" in train.divergence(collapsed, lik, cfg, quantum, raw)
    # On dequantized pixels a density's objective is bounded in expectation (a likelihood of the data):
    # a scale that dips there at a high learning rate recovers (the per-pixel Laplace at lr 0.1, seed 0,
    # on the digits with hidden [64], latent 8, batch 64: 1.7e-6 in epoch 1, 0.02 in epoch 2, complete
    # after 12 with the other seeds' ELBO).
    # The σ-VAE's σ, fitted to the very image it scores, is not such a likelihood: its check stays.
    assert (train.divergence(collapsed, lik, cfg, quantum, dequantized) == "") == dequantized.comparable
    assert dequantized.comparable == (name != "gaussian_optimal")


def test_after_training_a_non_finite_test_metric_is_divergence_but_not_a_standard_error_of_one_sample():
    assert train.evaluation_divergence(True, {"test_elbo": -90.0, "test_iwae_nll": 85.0}) == ""
    # eval.iwae_k=1: the Monte-Carlo s.e. cannot be estimated from one weight (NaN by design)
    assert train.evaluation_divergence(True, {"test_elbo": -90.0, "test_iwae_mc_se": math.nan}) == ""
    assert train.evaluation_divergence(True, {"test_elbo": math.nan, "test_iwae_nll": math.inf}) == (
        "non-finite test metrics: test_elbo=nan, test_iwae_nll=inf")
    assert "test_iwae_mc_se=inf" in train.evaluation_divergence(True, {"test_iwae_mc_se": math.inf})
    assert "non-finite model parameters" in train.evaluation_divergence(False, {})


def test_log_p_above_a_bounded_supremum_is_divergence():
    # A bounded family whose log p per pixel exceeds its supremum means a bug or a numerical blow-up.
    cfg = make_cfg(*PROTOCOLS["gaussian"])
    lik = train.likelihoods.get("gaussian")
    measure = lik.measure(binarized=False, dequantized=True)
    metrics = {"train_elbo": -10.0, "max_log_p_per_pixel": lik.supremum_per_pixel + 1e-3}
    assert "above the supremum" in train.divergence(metrics, lik, cfg, 1 / 256, measure)
    metrics["max_log_p_per_pixel"] = lik.supremum_per_pixel  # attaining it is fine
    assert train.divergence(metrics, lik, cfg, 1 / 256, measure) == ""


def _assert_png_not_blank(path):
    assert path.is_file() and path.suffix == ".png"
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG" and img.width > 8 and img.height > 8
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert pixels.std() > 1.0, f"{path.name} is blank"


def test_figures_for_a_2d_latent_include_the_manifold(tmp_path):
    cfg = make_cfg(*PROTOCOLS["bernoulli"], "model.latent_dim=2", "train.epochs=2", "data.limit=300")
    result = train.train(cfg)
    paths = figures.save_all(result, tmp_path / "fig")
    assert {p.name for p in paths} == {"reconstructions.png", "samples.png", "manifold.png", "elbo_curve.png"}
    for p in paths:
        _assert_png_not_blank(p)
    with Image.open(tmp_path / "fig" / "manifold.png") as img:  # 20 x 20 decoded 8x8 images
        assert img.size == (20 * 8, 20 * 8)


def test_figures_without_a_2d_latent_have_no_manifold(short_runs, tmp_path):
    _, result = short_runs("gaussian")
    paths = figures.save_all(result, tmp_path / "fig")
    assert {p.name for p in paths} == {"reconstructions.png", "samples.png", "elbo_curve.png"}
    assert not (tmp_path / "fig" / "manifold.png").exists()
    for p in paths:
        _assert_png_not_blank(p)


def test_the_reconstructions_are_the_decoder_means_at_the_posterior_means(short_runs, tmp_path):
    """The grid's bottom row, image by image: decoded from z = E_q[z] (not a draw, nor log σ²)."""
    _, result = short_runs("gaussian")
    path = figures.reconstruction_grid(result, tmp_path / "reconstructions.png")
    model, data, (h, w) = result.model, result.data, result.data.image_shape
    with torch.no_grad():
        x = data.transform(model.likelihood.family, train=False)(data.test[:8])
        expected = model.mean_image(model.encode(x)[0]).clamp(0, 1).reshape(8, h, w).numpy()
    with Image.open(path) as img:
        grid = np.asarray(img.convert("L"), dtype=np.float64) / 255  # cells of h x w, 1 pixel apart
    for i in range(8):
        cell = grid[h + 2 : 2 * h + 2, 1 + i * (w + 1) : 1 + i * (w + 1) + w]
        assert np.abs(cell - expected[i]).max() <= 1 / 255, i


def test_a_cpu_training_step_flushes_subnormal_floats():
    """Training drives float32 values below 1.2e-38, where x86 arithmetic is ~100× slower; on a CPU the
    step reads and writes them as 0 (bench.train.flush_subnormals)."""
    torch.set_flush_denormal(False)  # as a fresh process starts
    subnormal = torch.tensor([1e-39], dtype=torch.float32)
    assert (subnormal * 1.0).item() > 0
    cfg = make_cfg(*PROTOCOLS["bernoulli"])
    data = load(cfg.data, torch.device("cpu"))
    train.make_step(train.build(cfg, data.dim), cfg)
    assert (subnormal * 1.0).item() == 0.0


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                    reason="x86's flush mode, set on OpenMP's threads through torch's libgomp (Linux wheels)")
def test_a_stop_while_the_openmp_threads_are_set_up_is_raised_not_dropped():
    # the call runs Python in a ctypes callback, where an exception is printed and dropped: a SIGTERM at a
    # trial's start (when the step sets up its threads) let the study train on and exit 0
    assert train._libgomp() is not None  # torch's own OpenMP: the callback path is the one taken
    with pytest.raises(KeyboardInterrupt):
        train._on_every_openmp_thread(lambda: os.kill(os.getpid(), signal.SIGINT))


def test_subnormals_are_flushed_on_the_intra_op_threads_started_before_the_step_too():
    """x86 keeps the mode per thread: OpenMP's worker threads, started by a parallel operation before the
    step was built (loading the data does), must flush subnormals too, not only the thread that asked.
    In a fresh process: the test session's own threads have long started."""
    code = (
        "import torch\n"
        "from bench.train import flush_subnormals\n"
        "torch.set_num_threads(2)\n"
        "torch.randn(1000, 1000).exp()  # OpenMP's worker thread starts here\n"
        "subnormal = torch.full((1 << 20,), 1 << 20, dtype=torch.int32).view(torch.float32)  # 1.5e-39 each\n"
        "kept = lambda: int(((subnormal * 1.0).view(torch.int32) != 0).sum())  # bits: a float compare would flush\n"
        "before = kept()\n"
        "flush_subnormals(torch.device('cpu'))\n"
        "print(before, kept())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert [int(n) for n in out.stdout.split()] == [1 << 20, 0]  # every element: both threads' shares


def test_the_cuda_graph_is_captured_for_a_full_batch_not_the_short_last_one(monkeypatch):
    # Which calls warm up, get captured, replay or run eagerly, with torch.cuda's graph API faked so that
    # this runs on a CPU (tests/test_gpu.py runs the real thing). Epochs of 3 full batches and a short
    # one: the 4th call is the short batch, and must neither be captured nor count as a warm-up.
    calls = []

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            calls.append("replay")

    @contextlib.contextmanager
    def context(*args, **kwargs):
        yield

    for name, fake in {"Stream": Stream, "current_stream": Stream, "stream": context, "CUDAGraph": Graph,
                       "graph": context}.items():
        monkeypatch.setattr(torch.cuda, name, fake)

    def step(x):
        calls.append(len(x))
        return ElboTerms(x.sum(1), x.sum(1), None)

    graphed = train.CudaGraphStep(step)
    for _ in range(3):
        for n in (64, 64, 64, 8):
            graphed(torch.ones(n, 2))
    warmups, capture = [64] * train.CudaGraphStep.WARMUP, [64, "replay"]  # captured, then replayed on it
    assert calls == [*warmups, 8, *capture, "replay", "replay", 8, *["replay"] * 3, 8]
    assert graphed.static_x.shape == (64, 2)


@pytest.mark.parametrize("epochs, median", [([900.0, 10.0, 30.0, 20.0], 20.0), ([900.0, 10.0], 10.0), ([5.0], 5.0),
                                            ([900.0, math.nan, 10.0, 30.0], 20.0)])
def test_a_runs_speed_is_its_median_epoch_after_the_first(epochs, median):
    assert train.median_epoch(epochs) == median  # the first also pays for setting up
    assert math.isnan(train.median_epoch([]))



def test_a_ctrl_c_in_the_openmp_callback_outside_a_study_is_raised_once_it_returns():
    # the speed benchmarks and `train` called from Python set flush-to-zero on each OpenMP thread through a
    # ctypes callback, which prints and drops an exception raised inside it: the Ctrl-C was lost
    torch.ones(256, 256) @ torch.ones(256, 256)  # torch's OpenMP team started
    assert train._libgomp() is not None  # the path with the callback (PyPI's torch for Linux ships libgomp)
    sent = []

    def interrupted_inside() -> None:
        if threading.current_thread() is threading.main_thread() and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # bytecodes, at which Python runs the handler
                pass

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train._on_every_openmp_thread(interrupted_inside)
        assert sent and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
